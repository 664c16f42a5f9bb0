"""Decode-range matrix products on Hopper tensor cores (sm_90a): y = x @ W^T for up to 256 rows of
x, where the product is bound by reading W, with the layer's epilogue fused (bias, a gated
activation over W's two row halves, a residual add).

    plan = plan_gemm_stream("bf16", n=10576, k=2560, mt=64)
    plan.key       -> 'gemm_stream_n10576_k2560_bf16_mt64_r1w1s7c1a2_sm90a'
    plan_gemm_stream("bf16", n=28672, k=4096, mt=64, gated="silu", wtype="u4", group=128)

Why a second Hopper GEMM: codegen/gemm.py tiles x by 128 rows, so at 17-128 rows a tile is mostly
padding and the grid has one CTA per 128 or 256 columns of W (an 8B q/k/v at 64 rows: 24-48
CTAs on 132 SMs). Here the operands swap: W's rows are the wgmma M (64 a warpgroup's row block)
and x's rows its N (the token tile `mt`, every row of x in one tile), so no MMA work is padding
past a multiple of 8 rows; and the K loop is cut into equal shares over the grid (stream-K), so
every SM streams the same number of W bytes whatever N is.

Work: the product is tiles of BW = 64 rb cw rows of W (gated: BW / 2 gate rows and the same BW / 2
up rows, so act(gate) * up is formed in registers) times 64-wide K slices: U = tiles x KT units.
CTA c of the G-CTA grid takes units [c U / G, (c + 1) U / G) in tile-major order, so it works on
one or a few tiles, each over a contiguous run of K slices (a segment). A CTA is one producer
warp (one thread issues TMA copies of each unit's W box and x box into a ring of STAGES buffers,
signalling each on its "full" mbarrier) and cw consumer warpgroups (rb wgmma m64n<mt>k16 per k16
step, W from shared memory as A, x as B, f32 accumulators; each buffer handed back on its
"empty" mbarrier). A segment covering all of a tile's K goes to the epilogue directly; otherwise
its partial sums go to the CTA's slot of an f32 workspace, and the last of the tile's segments
to finish (a per-tile counter, incremented after a fence) adds the others' slots to its own
registers in CTA order (deterministic for a given grid) and runs the epilogue, resetting the
counter to zero for the next launch. Nothing waits on another CTA, so any grid size is safe.

It may be launched as a programmatic dependent launch (runtime/launch.pdl_enabled): the producer
issues W's copies of the first STAGES units before `griddepcontrol.wait` (W does not depend on
the kernel before), x's after it; the consumers wait before their first write (partial slots,
counters, the output), so a launch never touches the workspace while the one before still runs.

Quantised W (wtype "u4" with (scale, zero) pairs per group, "i8" with a scale a row): W is the A
operand, so it can come from registers. W is repacked once (runtime/quant.pack_stream_u4 / _i8)
into units of 256 k laid out as the consumer lanes read them (16 bytes a lane an atom of 64 k),
one bulk copy a unit (u4: with the unit's pairs); each lane converts its bytes with the small-token
kernel's conversions (gemv_quant.cuh.jinja) into the A fragments of 4 k16 steps, and wgmma's
register-A form multiplies them by x's atom from shared memory. Two register sets: one atom's
wgmma in flight while the next atom converts. i8's row scale multiplies the f32 sums in the
epilogue. At most 128 rows (two stages of 256 rows of x x 256 k would pass shared memory).

The workspace (runtime/linear.py allocates it): `part` f32 [G, 2, BW x mt] (a CTA has at most
two partial segments: its first tile's and its last's) and `counts` int32 [tiles], zero before
the first launch; the kernel leaves them zero. Calls sharing one workspace must be ordered (one
stream), as cuBLAS's workspace must.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from .abi import TENSOR_MAP_CTYPE, Arg, KernelABI, SharedLayout
from .gemv import _TYPES, ProductPlan, check_product, product_args, wtype_label
from .render import read_template, render

__all__ = ["StreamGemmPlan", "plan_gemm_stream", "pack_weight", "token_tile", "stream_units", "max_rows", "MAX_ROWS"]

BK = 64                  # K per atom: one 128-byte swizzle row (a unit is ka atoms)
SHARED_LIMIT = 227 * 1024
MAX_ROWS = 256           # the widest token tile (wgmma's largest N)
MT_CHOICES = (8, 16, 32, 64, 128, 256)


def max_rows(gated: str | None, wtype: str | None = None) -> int:
    """The most rows of x a plan takes: 256, or 128 gated (its two row blocks of 128 tokens already
    hold 128 f32 accumulators a thread) or quantised (two stages of 256 tokens x 256 k of x pass shared
    memory)."""
    return MAX_ROWS // 2 if gated or wtype else MAX_ROWS


def token_tile(rows: int) -> int:
    """The token tile (wgmma N) of a call with `rows` rows of x: the next of MT_CHOICES."""
    for mt in MT_CHOICES:
        if rows <= mt:
            return mt
    raise ValueError(f"gemm_stream: at most {MAX_ROWS} rows, got {rows}")


def stream_units(c: int, units: int, grid: int) -> tuple[int, int]:
    """Units [first, end) of CTA c in a grid of `grid` (the kernel's formula)."""
    return c * units // grid, (c + 1) * units // grid


@dataclass(frozen=True, kw_only=True)
class StreamGemmPlan(ProductPlan):
    family: ClassVar[str] = "gemm_stream"
    arch: str = "sm_90a"
    mt: int = 64                 # token tile: the wgmma N; the call's rows are at most mt
    rb: int = 1                  # 64-row blocks of W per consumer warpgroup (gated: 2, gate then up)
    cw: int = 2                  # consumer warpgroups
    stages: int = 6
    ctas: int = 1                # CTAs an SM: the grid is ctas x SMs (or the units, if fewer)
    ka: int = 1                  # 64-wide K atoms a unit (a TMA box of each operand an atom)
    packed: bool = False         # W repacked once (pack_weight) so each unit's W is one contiguous block
    wtype: str | None = None     # "u4": 4-bit W with (scale, zero) pairs per group; "i8": 8-bit W with one scale a
                                 # row, applied to the f32 sum (the mixed-input form below)
    group: int = 0               # u4: k per (scale, zero) pair (32, 64 or 128); i8: 0
    acqrel: bool = False         # a split tile's segments count in by thread 0 between one fence.acq_rel.gpu before
                                 # and one after its atomic, not by every thread's __threadfence (fence.sc.gpu)
                                 # twice (the template's ACQREL; acqrel_default; key suffix "ar")

    def __post_init__(self):
        check_product(self, "gemm_stream", ("n", "k", "mt", "rb", "cw", "stages", "ctas", "ka"))
        if self.arch != "sm_90a":
            raise ValueError(f"gemm_stream: the kernel uses sm_90a's wgmma and TMA, not {self.arch}")
        if self.mt not in MT_CHOICES:
            raise ValueError(f"gemm_stream: mt must be one of {MT_CHOICES}, got {self.mt}")
        if self.rb not in (1, 2) or self.cw not in (1, 2) or self.stages < 2 or self.ctas not in (1, 2):
            raise ValueError(f"gemm_stream: rb and cw must be 1 or 2, stages >= 2, ctas 1 or 2; got rb {self.rb}, "
                             f"cw {self.cw}, stages {self.stages}, ctas {self.ctas}")
        if self.ka not in (1, 2, 4):
            raise ValueError(f"gemm_stream: ka must be 1, 2 or 4, got {self.ka}")
        if self.wtype not in (None, "u4", "i8"):
            raise ValueError(f"gemm_stream: wtype must be None, 'u4' or 'i8', got {self.wtype!r}")
        if self.wtype == "u4" and (self.group not in (32, 64, 128) or self.k % self.group):
            raise ValueError(f"gemm_stream: u4 takes groups of 32, 64 or 128 k dividing K = {self.k}, got {self.group}")
        if self.wtype == "i8" and self.group:
            raise ValueError(f"gemm_stream: i8 takes one scale a row (group 0), got {self.group}")
        if self.wtype:
            if self.ka != 4 or not self.packed:
                raise ValueError(f"gemm_stream: {self.wtype} W is packed (runtime/quant.pack_stream_{self.wtype}) in "
                                 "units of 256 k (ka = 4)")
        elif self.group:
            raise ValueError(f"gemm_stream: a group size ({self.group}) needs wtype='u4'")
        if self.gated and self.rb != 2:
            raise ValueError("gemm_stream: a gated product needs rb = 2 (a gate and an up row block per warpgroup)")
        if self.ctas * self.shared_bytes > SHARED_LIMIT + 1024:
            raise ValueError(f"gemm_stream: {self.ctas} CTAs of {self.shared_bytes} bytes of shared memory pass the "
                             f"{SHARED_LIMIT} an SM has")
        if self.accumulators + self.fragment_regs + 40 > min(255, 65536 // (self.threads * self.ctas)):
            raise ValueError(f"gemm_stream: {self.accumulators} accumulators a thread do not fit {self.ctas} CTAs of "
                             f"{self.threads} threads an SM")

    @property
    def bw(self) -> int:
        """W rows per tile."""
        return 64 * self.rb * self.cw

    @property
    def bw_out(self) -> int:
        """Output columns per tile."""
        return self.bw // 2 if self.gated else self.bw

    @property
    def tiles(self) -> int:
        return -(-self.n_out // self.bw_out)

    @property
    def kt(self) -> int:
        """Units a tile (K slices of ka atoms)."""
        return -(-self.k // (BK * self.ka))

    @property
    def units(self) -> int:
        return self.tiles * self.kt

    @property
    def accumulators(self) -> int:
        return self.rb * self.mt // 2

    @property
    def fragment_regs(self) -> int:
        """u4: W's converted A fragments a consumer thread holds (two atoms of 4 k16 steps, each
        row block)."""
        return 2 * 4 * 4 * self.rb if self.wtype else 0

    @property
    def w_unit_bytes(self) -> int:
        """Bytes of W a unit copies: BW x 64 ka k in the dtype; u4: the packed nibbles (BW x 128)
        and the unit's (scale, zero) pairs (BW x 256 / group int32); i8: BW x 256 bytes."""
        if self.wtype == "u4":
            return self.bw * 128 + self.bw * (256 // self.group) * 4
        if self.wtype == "i8":
            return self.bw * 256
        return self.bw * BK * 2 * self.ka

    @property
    def threads(self) -> int:
        return 128 * self.cw + 32

    @property
    def key(self) -> str:
        parts = ["gemm_stream", f"n{self.n}", f"k{self.k}", self.dtype]
        if self.wtype:
            parts.append(wtype_label(self.wtype, self.group))
        parts += self.epilogue_key
        parts += [f"mt{self.mt}", f"r{self.rb}w{self.cw}s{self.stages}c{self.ctas}" + (f"a{self.ka}" if self.ka > 1 else "")
                  + ("p" if self.packed else "") + ("ar" if self.acqrel else ""),
                  self.arch.replace("_", "")]
        return "_".join(parts)

    @property
    def tma_boxes(self) -> dict[str, tuple[int, int]]:
        """(rows, columns) of the box each tensor map copies: x's mt rows, W's BW rows (gated:
        BW / 2, copied twice, gate rows then up rows), 64 columns."""
        return {"x": (self.mt, BK), "w": (self.bw // 2 if self.gated else self.bw, BK)}

    @property
    def shared_layout(self) -> SharedLayout:
        """The W and x stages (1024-byte aligned: the swizzle reads address bits 7-9), the full /
        empty mbarriers, the last-segment flag."""
        return SharedLayout((("sX", self.stages * self.mt * BK * 2 * self.ka), ("sW", self.stages * self.w_unit_bytes),
                             ("bars", 8 * 2 * self.stages), ("flag", 16)), align=1024)

    @property
    def shared_bytes(self) -> int:
        return self.shared_layout.bytes + 1024   # the kernel aligns its base up to 1024 bytes

    def workspace_floats(self, grid: int) -> int:
        """f32 elements of `part` for a grid of `grid` CTAs."""
        return grid * 2 * self.bw * self.mt

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "n": self.n, "k": self.k, "gated": self.gated, "bias": self.bias,
                "residual": self.residual, "n_out": self.n_out, "mt": self.mt, "tile": [self.bw, self.mt, BK],
                "stages": self.stages, "ctas_per_sm": self.ctas}


@functools.lru_cache(maxsize=256)
def _abi(plan: StreamGemmPlan) -> KernelABI:
    t = _TYPES[plan.dtype][0]   # i8: the row scales after W (the u4 pairs travel in W's packed units)
    args = product_args(plan, (Arg("wscale", f"const {t}* __restrict__", "input"),) if plan.wtype == "i8" else ())
    args[0] = Arg("x_map", TENSOR_MAP_CTYPE, "tmap", "x")
    if not plan.packed:   # packed: W stays a pointer (to pack_weight's layout)
        args[1] = Arg("w_map", TENSOR_MAP_CTYPE, "tmap", "w")
    args += [Arg("part", "float* __restrict__", "workspace"), Arg("counts", "int* __restrict__", "workspace")]
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=(f"min({plan.ctas} * SMS, {plan.units})",),
                     block=(plan.threads,), shared_bytes=plan.shared_bytes, problem=("M", "SMS"), pdl=True)


@functools.lru_cache(maxsize=256)
def _render(plan: StreamGemmPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    return render("cuda/gemm_stream.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, N=plan.n, K=plan.k,
                  NOUT=plan.n_out, MT=plan.mt, RB=plan.rb, CW=plan.cw, STAGES=plan.stages, CTAS=plan.ctas, KA=plan.ka, PACKED=plan.packed, WTYPE=plan.wtype, GROUP=plan.group,
                  W_UNIT=plan.w_unit_bytes,
                  GATED=plan.gated, BIAS=plan.bias, RESIDUAL=plan.residual, smem=plan.shared_layout.offsets,
                  ACQREL=plan.acqrel,
                  wgmma_ops=[{"n": plan.mt, "a": "rsk" if plan.wtype else "ss", "t": mma}], tma=True)


def acqrel_default() -> bool:
    """Whether a split tile's segments count in through thread 0's acquire-release fences (LAYERFORGE_STREAM_ACQREL=1;
    off). Every thread's __threadfence compiles to MEMBAR.SC.GPU (sequentially consistent, GPU scope), two a segment;
    CUTLASS's stream-K barrier is a CTA barrier, then one thread's fence.acq_rel.gpu and atomic. Its GPU tests pass;
    on an H100 (bench_gemv --quant, 8B at 32 / 64 / 128 rows, off and on twice in one run) it changed no product by
    more than the rounds' spread, so it stays off (benchmarks/NOTES.md, "The stream GEMM's fences")."""
    from .plan import env_switch
    return env_switch("LAYERFORGE_STREAM_ACQREL", False)


def plan_gemm_stream(dtype: str, *, n: int, k: int, mt: int, gated: str | None = None, bias: bool = False,
                     residual: bool = False, rb: int | None = None, cw: int | None = None, stages: int | None = None,
                     ctas: int | None = None, ka: int | None = None, packed: bool = False,
                     wtype: str | None = None, group: int = 0, arch: str = "sm_90a",
                     tuned: bool = True, acqrel: bool | None = None) -> StreamGemmPlan:
    """The plan of a product of at most `mt` rows (token_tile(rows)). The defaults are the H200
    sweep's most frequent winners (benchmarks/NOTES.md, "A decode-range Hopper GEMM"): one consumer
    warpgroup (rb 2 gated, else 1; u4: see below), 128 k a unit, one CTA an SM with as many stages as fit (at
    most 8; at least 2, with 64 k a unit where two stages of 128 k do not fit). Where no split field is given, a
    split the tuning tables measured faster for this problem (codegen/tuning.py) comes first; tuned=False: the
    rules alone. acqrel (None: acqrel_default()): how a split tile's segments count in."""
    acqrel = acqrel_default() if acqrel is None else acqrel
    if tuned and rb is None and cw is None and stages is None and ctas is None and ka is None and not packed:
        from .tuning import lookup
        split = lookup("gemm_stream", arch=arch, dtype=dtype, wtype=wtype, group=group, gated=gated, n=n, k=k,
                       bucket=mt)
        if split is not None:
            try:
                return StreamGemmPlan(dtype=dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, arch=arch,
                                      mt=mt, wtype=wtype, group=group, acqrel=acqrel,
                                      **(split | {"packed": bool(split["packed"])}))
            except ValueError:   # a split this problem's plan cannot take: the rules decide
                pass
    if wtype == "u4":   # the u4 sweep (bench_gemv --stream --quant, H200): two W row blocks a warpgroup past
        # 8192 k (8B down at 64 rows 27.1-27.3 us against 30.0-30.3), two consumer warpgroups gated at <= 64 rows
        # (gate/up + SwiGLU 44.2-44.4 against 46.5-46.8), where K is whole units of 256 (a partial last unit's
        # code puts three warpgroups' kernel past its 168 registers: NVRTC 13.0 spills, at 2000 x 1152)
        rb = 2 if rb is None and k >= 8192 else rb
        cw = 2 if cw is None and gated and mt <= 64 and k % 256 == 0 else cw
    rb = (2 if gated else 1) if rb is None else rb
    cw = 1 if cw is None else cw
    ctas = 1 if ctas is None else ctas

    if wtype:   # units of 256 k, W packed; the x atoms are most of a stage
        ka, packed = 4, True
        per_stage = mt * BK * 2 * 4 + 64 * rb * cw * (256 if wtype == "i8" else 128 + 4 * 256 // max(group, 1))
        stages = stages or max(2, min(8, ((SHARED_LIMIT + 1024) // ctas - 2048 - 64) // per_stage))

    def fit(a: int) -> int:
        return ((SHARED_LIMIT + 1024) // ctas - 2048 - 64) // ((64 * rb * cw + mt) * BK * 2 * a)

    if ka is None:
        ka = 2 if stages is None and fit(2) >= 2 or stages is not None and fit(2) >= stages else 1
    if stages is None:
        stages = max(2, min(8, fit(ka)))
    return StreamGemmPlan(dtype=dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, arch=arch, mt=mt, rb=rb,
                          cw=cw, stages=stages, ctas=ctas, ka=ka, packed=packed, wtype=wtype, group=group,
                          acqrel=acqrel)


def pack_weight(w, plan: StreamGemmPlan):
    """W [N, K] (torch) in a packed plan's layout: unit (tile, K slice) after unit, each its KA atoms
    of [BW rows][64 k] in the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)),
    gated tiles BW / 2 gate rows then the same up rows; rows past N and k past K are zeros."""
    import torch
    n, k = w.shape
    if (n, k) != (plan.n, plan.k):
        raise ValueError(f"gemm_stream: W is {tuple(w.shape)}, the plan's [{plan.n}, {plan.k}]")
    tiles, bw, kp = plan.tiles, plan.bw, plan.kt * BK * plan.ka
    if plan.gated:
        half = bw // 2
        g = torch.zeros(tiles * half, kp, dtype=w.dtype, device=w.device)
        u = torch.zeros_like(g)
        g[:plan.n_out, :k] = w[:plan.n_out]
        u[:plan.n_out, :k] = w[plan.n_out:]
        full = torch.cat([g.view(tiles, half, kp), u.view(tiles, half, kp)], 1)
    else:
        full = torch.zeros(tiles * bw, kp, dtype=w.dtype, device=w.device)
        full[:n, :k] = w
        full = full.view(tiles, bw, kp)
    t = full.view(tiles, bw, kp // 64, 8, 8).permute(0, 2, 1, 3, 4)          # [tile, atom, row, chunk, 8]
    r = torch.arange(bw, device=w.device).view(bw, 1) % 8
    src = (torch.arange(8, device=w.device).view(1, 8) ^ r)                  # chunk stored at c comes from c ^ r
    t = torch.gather(t, 3, src.view(1, 1, bw, 8, 1).expand(tiles, kp // 64, bw, 8, 8))
    return t.contiguous().view(-1)
