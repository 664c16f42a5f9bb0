"""Small-token matrix products (decode): y = x @ W^T for up to 64 tokens, with the epilogue of
the layer around it fused (bias, a gated activation over W's two row halves, a residual add).

    plan = plan_gemv("bf16", n=6144, k=4096, max_m=8, arch="sm_90")
    plan.key       -> 'gemv_n6144_k4096_m8_bf16_r1w4s4_sm90'
    plan.source()  -> CUDA C

At 1-16 tokens a product is bound by reading W (N x K elements, once), and cuBLAS reaches
2.2-3.8 TB/s of the H200's 4.25 at Llama shapes (issue 12's measurements). Each warp of the
kernel streams its share of the CTA's W rows (interleaved 64-wide K chunks) through its own ring
of STAGES chunks in shared memory by cp.async, so the bytes in flight cost no registers and the
SM keeps many CTAs resident; it computes on the tensor cores with the tokens on the narrow (n8)
side of m16n8k16, W rows on the wide one; the warps add their partial sums in shared memory,
where the epilogue runs. (The first kernel loaded W into registers: its bytes in flight were
bounded by the registers, i.e. by CTAs per SM, and it stayed at 0.76-0.82 of the copy ceiling.)
norm="rms": RMSNorm of x fused in the prologue, y = rstd[m] * sum_k (x[m, k] (gamma[k] + offset))
W[n, k]: the scale of a token factors out of its dot products, so each CTA adds up the token's
sum of squares from the x chunks it reads anyway, and the separate norm kernel (and its launch)
goes away.
Gated (SwiGLU / GeGLU): W holds the gate rows then the up rows ([2 F, K], as a fused gate/up
Linear does), and y[m, f] = act(gate[m, f]) * up[m, f] comes out without the [M, 2 F] round trip.

Weight-only quantised W (wtype, runtime/quant.py repacks checkpoints into these layouts once):
    "u4"  W[n, k] = (q - z) * s, q in 0..15: w int32 [N, K / 8], word j of row n holds
          k = 8 j + (0 2 4 6 1 3 5 7)[i] at bits 4 i (pair 2i, 2i + 1 at bits 4 i and 16 + 4 i: one
          lop3 makes a pair of T); wgroup int32 [N, GPAD]: per group of `group` k (32, 64, 128) the
          T pair (s, z) (z a whole number), rows padded with zeros to a multiple of 4 words.
    "i8"  W[n, k] = q * s, q int8 (symmetric): w int8 [N, K]; group 0: wscale T [N], one scale a
          row, applied in f32 to the sum (q is exact in T); group 32/64/128: wgroup as u4's, z = 0.
A 128-byte stage row of W is then 256 (u4) or 128 (i8) k, x has 4 or 2 rows a token, and each
lane converts the 16 bytes it reads to T in registers right before the mma (the instruction
counts are in templates/cuda/gemv_quant.cuh.jinja); the pairs reach shared memory by cp.async
with the chunk. One template: the ring, the reduction and the epilogue are the bf16 kernel's.

W8A8 (sm_89+): "f8e4m3"  W[n, k] = q * s, q float8_e4m3fn: w [N, K] bytes; wscale f32: group 0:
          [N], one scale a row (a per-tensor scale is repeated N times), applied after the sum;
          group 128: [ceil(N / 128), ceil(K / 128)], one per 128 x 128 block (DeepSeek-V3's
          weight_scale_inv), applied to each 128-k chunk's sums. x stays T in the ring (2 rows a
          token, as i8's) and each token is quantised to e4m3 per 128-k chunk in registers, scale
          amax / 448 (runtime/quant.quantize_fp8_rows; the template's loop says why per chunk);
          the products run on m16n8k32 e4m3 mma, 16 k of W a lane's 16-byte read (two mma).
          x_e4m3: x arrives quantised instead (runtime/quant.quantize_fp8_rows_cuda), e4m3 bytes
          [M, K] and f32 scales: x_group 0, one a token (the per-token W8A8 meaning, dsl/stdlib/
          quant.lf fp8_linear_per_token; W one scale a row), applied in the epilogue; x_group 128,
          one a token and 128 k (the same bytes and scales the in-register quantisation makes),
          copied into the stage with the chunk and applied to its sums. A token's 128 k are one
          128-byte row of the stage, its 16-byte pieces the mma's B fragments as they are.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from . import ops
from .abi import Arg, KernelABI
from .plan import KernelPlan, env_switch
from .render import read_template, render

__all__ = ["GemvPlan", "ProductPlan", "plan_gemv", "SharedMemoryError", "MAX_M", "GATED", "check_product", "product_args", "WTYPES", "GROUPS",
           "FP8_MIN_ARCH", "token_bucket", "COMPACT_X_WTYPES", "xshare_split", "xshare_default"]

MAX_M = 64


class SharedMemoryError(ValueError):
    """A plan's rings pass the shared memory a CTA can have on its arch (codegen/ops.shared_limit)."""

GATED = ("silu", "gelu", "gelu_tanh")
_TYPES = {"bf16": ("__nv_bfloat16", "bf16"), "f16": ("__half", "f16")}
WTYPES = {"u4": 4, "i8": 2, "f8e4m3": 2}   # weight type -> 128-byte x rows a token per chunk (k per chunk / 64)
GROUPS = {"u4": (32, 64, 128), "i8": (0, 32, 64, 128), "f8e4m3": (0, 128)}   # k per scale (0: one scale a W row)
FP8_MIN_ARCH = 89                # the e4m3 mma.sync and cvt: sm_89 (Ada) and newer
QUANT_SHARED_BUDGET = 160 * 1024  # the default stages of a quantised plan keep a CTA under this (sm_80: 163 KB)
# u4 / i8 on sm_90: the H200 sweep at 16 rows (benchmarks/NOTES.md, "u4 / i8 at 16 rows: the sweep's splits") chose
# narrow products' 2 x 8 warps at 192-196 KB, one CTA an SM, over the 96-98 KB split two CTAs an SM
QUANT_SHARED_BUDGET_SM90 = 200 * 1024
# u4 at 1, 2 or 4 tokens: plans of max_m 1, 2, 4 whose stages hold that many x rows, not the n8 tile's 8
# (at one token x's padding was 47 % of a u4 stage: shared memory that bounds the warps and stages an SM holds);
# LAYERFORGE_GEMV_COMPACT_X=0: the 8-row plans
# (i8 measured slower at one token: gate/up 32.2 -> 39.9 us; u4 faster: benchmarks/NOTES.md, "x's padding")
COMPACT_X_WTYPES = ("u4",)


# the shared-x layout's defaults (plan_gemv xshare; not measured yet: benchmarks/NOTES.md): 16 rows a warp, 4
# warps, 2 stages, and K split over enough CTAs that the grid holds XSHARE_CTAS of them (3 an SM of 132)
XSHARE_RT, XSHARE_WARPS, XSHARE_STAGES, XSHARE_CTAS = 1, 4, 2, 396
XSHARE_WARPS_SM = 16   # warps an SM the registers allow an ungated shared-x plan (min_blocks = this / warps)


def xshare_split(n: int, k: int, gated: str | None = None, rt: int = XSHARE_RT, warps: int = XSHARE_WARPS) -> int:
    """CTAs a u4 product's K is split over in the shared-x layout: about enough for XSHARE_CTAS CTAs in the grid,
    every CTA with at least 2 of K's 256-k chunks where K has 4 or more, and no CTA without chunks (the split is
    K's chunks over the chunks a CTA takes)."""
    blocks = -(-(n // 2 if gated else n) // (16 * rt * warps))
    chunks = -(-k // 256)
    want = max(1, min(-(-XSHARE_CTAS // blocks), chunks // 2 if chunks >= 4 else chunks))
    return -(-chunks // -(-chunks // want))


def xshare_default() -> bool:
    """Whether u4 products of 9-16 rows take the shared-x layout (LAYERFORGE_GEMV_XSHARE=1; off: measured slower on an
    H100, benchmarks/NOTES.md "u4's shared-x layout measured")."""
    return env_switch("LAYERFORGE_GEMV_XSHARE", False)


def compact_x_default() -> bool:
    """Whether u4 plans below 8 tokens hold only their tokens' x rows (LAYERFORGE_GEMV_COMPACT_X=0 / 1)."""
    return env_switch("LAYERFORGE_GEMV_COMPACT_X", True)


def token_bucket(rows: int, wtype: str | None = None) -> int:
    """max_m of the plan that serves `rows` tokens: 8, 16, 32 or 64; a u4 product (compact_x_default()) 1, 2
    or 4 below 8."""
    if wtype in COMPACT_X_WTYPES and rows < 8 and compact_x_default():
        return 1 << max(0, (rows - 1).bit_length())
    return 8 << max(0, (rows - 1).bit_length() - 3)


@dataclass(frozen=True, kw_only=True)
class ProductPlan(KernelPlan):
    """What every matrix-product plan has (GemvPlan, codegen/gemm.py's GemmPlan): y = x @ W^T
    with W [n, k] as torch.nn.Linear stores it, then the epilogue (bias, gated activation over
    W's two row halves, residual)."""
    dtype: str                   # "bf16" | "f16": x, W, bias, residual and y
    n: int                       # W's rows (gated: 2 x the output columns)
    k: int                       # the reduction length (W's columns), a multiple of 8
    gated: str | None = None     # None | "silu" | "gelu" (erf) | "gelu_tanh"
    bias: bool = False
    residual: bool = False

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.gated else self.n

    @property
    def epilogue_key(self) -> list[str]:
        """The epilogue's part of a plan key: the gated activation, "bias", "res"."""
        return [p for p, on in ((self.gated, self.gated), ("bias", self.bias), ("res", self.residual)) if on]


@dataclass(frozen=True, kw_only=True)
class GemvPlan(ProductPlan):
    family: ClassVar[str] = "gemv"
    max_m: int = 8               # tokens the kernel serves: 8, 16, 32 or 64 (n8 tiles of tokens)
    arch: str = "sm_90"
    norm: str | None = None      # None | "rms": RMSNorm of x (weight gamma [K], eps) in the prologue
    norm_offset: float = 0.0     # 0: x * gamma; 1: x * (1 + gamma) (Gemma)
    rt: int = 1                  # 16-column output tiles per CTA
    warps: int = 4               # warps per CTA, splitting K
    stages: int = 4              # 64-wide K chunks in each warp's shared-memory ring (u4: 256, i8: 128)
    wtype: str | None = None     # None: W in dtype; "u4" | "i8": weight-only quantised; "f8e4m3": W8A8 (module docstring)
    group: int = 0               # k per (scale, zero) pair of a quantised W; i8, f8e4m3: 0 = one scale a row
                                 # (f8e4m3 128: 128 x 128 blocks)
    experts: int = 0             # > 0: an expert product of a mixture-of-experts layer (module docstring)
    gather: bool = False         # experts: x's rows read through src (the tokens), not in the sorted order
    fixed: int = 0               # experts: the last `fixed` of them read W from a second stack (w_fixed:
                                 # a shared expert cut into slices of the routed experts' size)
    compact: bool = False        # experts: grid y spans min(experts, rows) CTAs, CTA y the expert active[y]
                                 # (the permutation's list of experts with rows): no CTAs of empty experts
    ldw: int = 0                 # elements between W's rows (0: K); unquantised W of one product only: W a
                                 # view of a wider buffer (runtime/lora.py's K-extended storage)
    x_e4m3: bool = False         # f8e4m3: x arrives quantised, e4m3 bytes [M, K] and f32 scales xscale (the
                                 # module docstring)
    x_group: int = 0             # x_e4m3: k per x scale, 0 (one a token, xscale [M]; W one scale a row) or 128
                                 # (xscale [M, ceil(K / 128)], applied per chunk)
    xshare: int = 0              # u4: 0, or the shared-x layout with K split over this many CTAs (grid y): the
                                 # CTA's warps own different W rows (16 rt each) and stage x once a chunk
                                 # together (the template's XSHARE; > 1: part / counts workspace)
    min_blocks: int = 1          # xshare: CTAs an SM the registers must allow (__launch_bounds__'s second number)

    def __post_init__(self):
        check_product(self, "gemv", ("n", "k", "rt", "warps", "stages"))
        if self.max_m not in (8, 16, 32, 64) and not (self.wtype in COMPACT_X_WTYPES and self.max_m in (1, 2, 4)):
            raise ValueError(f"gemv: max_m must be 8, 16, 32 or 64 (u4 also 1, 2 or 4), got {self.max_m!r} "
                             f"with wtype {self.wtype!r}")
        if self.stages < 2:
            raise ValueError(f"gemv: stages must be at least 2, got {self.stages}")
        if self.norm not in (None, "rms"):
            raise ValueError(f"gemv: norm must be None or 'rms', got {self.norm!r}")
        if self.norm_offset not in (0.0, 1.0):
            raise ValueError(f"gemv: norm_offset must be 0 or 1, got {self.norm_offset!r}")
        if self.shared_bytes > ops.shared_limit(self.arch):
            raise SharedMemoryError(f"gemv: {self.shared_bytes} bytes of shared memory (rings of {self.warps} warps x "
                             f"{self.stages} stages) pass the {ops.shared_limit(self.arch)} a CTA can have on "
                             f"{self.arch}")
        if self.wtype is None and self.group:
            raise ValueError(f"gemv: a group size ({self.group}) needs a quantised wtype")
        if self.wtype is not None:
            if self.wtype not in WTYPES:
                raise ValueError(f"gemv: wtype must be one of {sorted(WTYPES)} or None, got {self.wtype!r}")
            if self.group not in GROUPS[self.wtype]:
                raise ValueError(f"gemv: {self.wtype} group size must be one of {GROUPS[self.wtype]}, got {self.group!r}")
            if self.group and self.k % self.group:
                raise ValueError(f"gemv: the group size {self.group} must divide K = {self.k}")
            if self.wtype == "f8e4m3" and ops.arch_number(self.arch) < FP8_MIN_ARCH:
                raise ValueError(f"gemv: f8e4m3 runs the fp8 tensor-core mma of sm_89 and newer, not {self.arch}")
            if self.k % self.piece_k:
                raise ValueError(f"gemv: {self.wtype} K = {self.k} must be a multiple of {self.piece_k} "
                                 f"(rows of 16-byte pieces of W)")
        if ops.arch_number(self.arch) < 80:
            raise ValueError(f"gemv: the kernel uses sm_80 tensor-core instructions, not {self.arch}")
        if not isinstance(self.experts, int) or isinstance(self.experts, bool) or self.experts < 0:
            raise ValueError(f"gemv: experts must be a non-negative int, got {self.experts!r}")
        if self.gather and not self.experts:
            raise ValueError("gemv: gather reads x through an expert product's src: it needs experts > 0")
        if not isinstance(self.fixed, int) or isinstance(self.fixed, bool) or not 0 <= self.fixed <= self.experts:
            raise ValueError(f"gemv: fixed must be an int in [0, experts], got {self.fixed!r}")
        if self.compact and not self.experts:
            raise ValueError("gemv: compact lists an expert product's experts: it needs experts > 0")
        if self.fixed and self.wtype:
            raise ValueError("gemv: a second (shared) expert stack is served with unquantised weights only")
        if self.experts and (self.residual or self.norm):
            raise ValueError("gemv: an expert product has no residual or norm (the combine kernel adds the branches)")
        if self.x_group not in (0, 128) or self.x_group and not self.x_e4m3:
            raise ValueError(f"gemv: x_group (k per scale of x quantised beforehand) must be 0 or 128 with x_e4m3, "
                             f"got {self.x_group!r}")
        if self.x_e4m3 and (self.wtype != "f8e4m3" or self.group > self.x_group or self.norm or self.experts):
            raise ValueError("gemv: x_e4m3 (x quantised before the product) takes an f8e4m3 W (128 x 128 blocks only "
                             f"with x_group 128), no norm and no experts; got wtype {self.wtype!r} group {self.group} "
                             f"x_group {self.x_group}" + (", a norm" if self.norm else "")
                             + (", experts" if self.experts else ""))
        if isinstance(self.xshare, bool) or not isinstance(self.xshare, int) or self.xshare < 0:
            raise ValueError(f"gemv: xshare must be a non-negative int (CTAs K is split over), got {self.xshare!r}")
        if self.xshare and (self.wtype != "u4" or self.experts or self.norm or self.ldw):
            raise ValueError("gemv: xshare (x staged once a CTA) serves a u4 W of one product without a norm, got "
                             f"wtype {self.wtype!r}" + (", experts" if self.experts else "")
                             + (", a norm" if self.norm else "") + (", ldw" if self.ldw else ""))
        if isinstance(self.min_blocks, bool) or not isinstance(self.min_blocks, int) or not 1 <= self.min_blocks <= 32 \
                or self.min_blocks > 1 and not self.xshare:
            raise ValueError(f"gemv: min_blocks must be an int in 1..32, above 1 with xshare only, got {self.min_blocks!r}")
        if self.xshare > self.chunks:
            raise ValueError(f"gemv: xshare = {self.xshare} splits {self.chunks} chunks of K: at most that many CTAs")
        if isinstance(self.ldw, bool) or not isinstance(self.ldw, int) or self.ldw and (
                self.wtype or self.experts or self.ldw < self.k or self.ldw % 8):
            raise ValueError(f"gemv: ldw = {self.ldw!r} must be 0 or a multiple of 8 of at least K = {self.k}, for "
                             "an unquantised W of one product")

    @property
    def key(self) -> str:
        parts = ["gemv", f"n{self.n}", f"k{self.k}", f"m{self.max_m}", self.dtype]
        if self.wtype:
            parts.append(wtype_label(self.wtype, self.group) + (f"xk{self.x_group}" if self.x_group else
                                                                "xt" if self.x_e4m3 else ""))
        parts += self.epilogue_key
        if self.norm:
            parts.append(self.norm + ("1p" if self.norm_offset else ""))
        if self.experts:
            parts.append(f"e{self.experts}" + (f"f{self.fixed}" if self.fixed else "") + ("gx" if self.gather else "")
                         + ("a" if self.compact else ""))
        if self.ldw and self.ldw != self.k:
            parts.append(f"ldw{self.ldw}")
        parts.append(f"r{self.rt}w{self.warps}s{self.stages}" + (f"x{self.xshare}" if self.xshare else "")
                     + (f"b{self.min_blocks}" if self.min_blocks > 1 else ""))
        parts.append(self.arch.replace("_", ""))
        return "_".join(parts)

    @property
    def pdl(self) -> bool:
        """Launched as a programmatic dependent launch: on sm_90 and newer (griddepcontrol), where
        the weight stream of the first chunks starts while the kernel before still runs. Not an
        expert product: its CTAs read the permutation's offsets (made by the kernel before) first."""
        return ops.arch_number(self.arch) >= 90 and not self.experts

    @property
    def mt(self) -> int:
        """n8 token tiles of the mma (1, 2, 4 or 8)."""
        return max(1, self.max_m // 8)

    @property
    def xt(self) -> int:
        """Token rows a stage holds: max_m (1, 2 or 4 for u4 at few tokens: the tile's other columns
        read those rows again and are never stored), else the tiles' 8 MT."""
        return self.max_m if self.max_m < 8 else 8 * self.mt

    @property
    def xr(self) -> int:
        """128-byte x rows a token per chunk: the k of one 128-byte row of W over 64 (x in T), or 1 (x
        in e4m3 bytes: x_e4m3)."""
        return 1 if self.x_e4m3 else WTYPES.get(self.wtype, 1)

    @property
    def piece_k(self) -> int:
        """k in one 16-byte piece of a W row (u4 32, i8 and f8e4m3 16, T 8)."""
        return 8 * WTYPES.get(self.wtype, 1)

    @property
    def stage_bytes(self) -> int:
        """One chunk of a warp's ring: 128-byte rows of W (16 per tile), x (8 per token tile, XR
        rows each) and gamma (XR), then a quantised W's (scale, zero) words of the chunk (f8e4m3
        blocks: one f32 scale a W row)."""
        wrows = 16 * (2 if self.gated else 1) * self.rt
        pairs = wrows * (8 * self.piece_k // self.group) * 4 if self.group else 0   # a chunk: 8 pieces of W
        xscales = 4 * self.max_m if self.x_group else 0   # the chunk's scale of each token
        return 128 * (wrows + self.xr * (self.xt + (1 if self.norm else 0))) + pairs + xscales

    @property
    def shared_bytes(self) -> int:
        if self.xshare:   # a stage: x's rows once, then each warp's W rows and pairs
            w_stage = self.stage_bytes - 128 * self.xr * self.xt
            return self.stages * (128 * self.xr * self.xt + self.warps * w_stage)
        return self.warps * self.stages * self.stage_bytes

    @property
    def chunks(self) -> int:
        """K's chunks: 128-byte stage rows of W (u4 256 k, i8 / f8e4m3 128, T 64)."""
        bk = 128 if self.x_e4m3 else 64 * self.xr
        return -(-self.k // bk)

    @property
    def row_blocks(self) -> int:
        """CTAs along the output columns: 16 rt columns a CTA, or (xshare) 16 rt a warp."""
        return -(-self.n_out // (16 * self.rt * (self.warps if self.xshare else 1)))

    def workspace(self) -> tuple[int, int]:
        """(f32 partial sums, int counters) an xshare > 1 launch needs: a slice of every thread's sums for each CTA,
        one counter a row block (zero, and left zero by the kernel)."""
        if self.xshare <= 1:
            return 0, 0
        tiles = 2 * self.rt if self.gated else self.rt
        return self.row_blocks * self.xshare * tiles * self.mt * 4 * 32 * self.warps, self.row_blocks

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        d = {"dtype": self.dtype, "n": self.n, "k": self.k, "max_m": self.max_m, "gated": self.gated,
             "bias": self.bias, "residual": self.residual, "norm": self.norm, "norm_offset": self.norm_offset,
             "n_out": self.n_out}
        d |= {"experts": self.experts, "gather": self.gather, "fixed": self.fixed, "compact": self.compact} \
            if self.experts else {}
        return d | ({"wtype": self.wtype, "group": self.group} if self.wtype else {}) \
            | ({"x_e4m3": True, "x_group": self.x_group} if self.x_e4m3 else {})


def wtype_label(wtype: str, group: int) -> str:
    """A quantised W's part of a plan key: u4g128, i8ch (one scale a row), f8e4m3b128 (128 x 128 blocks)."""
    if not group:
        return f"{wtype}ch"
    return f"{wtype}{'b' if wtype == 'f8e4m3' else 'g'}{group}"



def check_product(plan, family: str, positive: tuple[str, ...]) -> None:
    """The checks every product plan (gemv, gemm) shares: dtype, positive sizes, K a multiple of
    8, the gated activation and its even row count."""
    if plan.dtype not in _TYPES:
        raise ValueError(f"{family}: dtype must be one of {sorted(_TYPES)}, got {plan.dtype!r}")
    for name in positive:
        v = getattr(plan, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{family}: {name} must be a positive int, got {v!r}")
    if plan.k % 8:
        raise ValueError(f"{family}: K = {plan.k} must be a multiple of 8 (rows of 16-byte vectors)")
    if plan.gated is not None and plan.gated not in GATED:
        raise ValueError(f"{family}: gated must be one of {GATED} or None, got {plan.gated!r}")
    if plan.gated and plan.n % 2:
        raise ValueError(f"{family}: a gated product needs an even number of rows (gate then up), got {plan.n}")


def product_args(plan, weights: tuple[Arg, ...] = ()) -> list[Arg]:
    """The arguments of a product kernel, in the order runtime/linear.launch_gemv passes them:
    x, W (then `weights`: a quantised W's scales), bias, residual, gamma, out, M, eps."""
    t = _TYPES[plan.dtype][0]
    wt = {None: t, "u4": "unsigned", "i8": "signed char", "f8e4m3": "unsigned char"}[getattr(plan, "wtype", None)]
    xt = "unsigned char" if getattr(plan, "x_e4m3", False) else t
    args = [Arg("x", f"const {xt}* __restrict__", "input"), Arg("w", f"const {wt}* __restrict__", "input"), *weights]
    norm = getattr(plan, "norm", None)
    for on, name in ((plan.bias, "bias"), (plan.residual, "residual"), (norm, "gamma")):
        if on:
            args.append(Arg(name, f"const {t}* __restrict__", "input"))
    args += [Arg("out", f"{t}* __restrict__", "output"), Arg("M", "int", "dim")]
    if norm:
        args.append(Arg("eps", "float", "scalar"))
    return args


@functools.lru_cache(maxsize=256)
def _abi(plan: GemvPlan) -> KernelABI:
    t = _TYPES[plan.dtype][0]
    scales = ((Arg("wscale", "const float* __restrict__", "input"),) if plan.wtype == "f8e4m3" else
              (Arg("wgroup", "const unsigned* __restrict__", "input"),) if plan.group else
              (Arg("wscale", f"const {t}* __restrict__", "input"),) if plan.wtype else ())
    if plan.x_e4m3:   # x's scales, one a token, after W's
        scales += (Arg("xscale", "const float* __restrict__", "input"),)
    args = product_args(plan, scales)
    if plan.fixed:     # the shared expert's slices, after the routed experts' W
        args.insert(2, Arg("w_fixed", f"const {t}* __restrict__", "input"))
    if plan.experts:   # the permutation: each expert's first sorted row, and the token of each sorted row
        args += [Arg("offsets", "const int* __restrict__", "input")]
        args += [Arg("src", "const int* __restrict__", "input")] if plan.gather else []
        args += [Arg("active", "const int* __restrict__", "input")] if plan.compact else []
    if plan.xshare > 1:   # the K split's partial sums and each row block's counter (the launcher's)
        args += [Arg("part", "float* __restrict__", "workspace"), Arg("counts", "int* __restrict__", "workspace")]
    experts = f"min({plan.experts}, rows)" if plan.compact else str(plan.experts)
    grid = (f"cdiv({plan.n_out}, {16 * plan.rt})",) + ((experts,) if plan.experts else ())
    if plan.xshare:
        grid = (str(plan.row_blocks), str(plan.xshare))
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=grid,
                     block=(32 * plan.warps,), shared_bytes=plan.shared_bytes,
                     problem=("rows",) if plan.compact else (), pdl=plan.pdl)


@functools.lru_cache(maxsize=256)
def _render(plan: GemvPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    return render("cuda/gemv.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, N=plan.n, K=plan.k,
                  NOUT=plan.n_out, RT=plan.rt, MT=plan.mt, XT=plan.xt, WARPS=plan.warps, STAGES=plan.stages,
                  GATED=plan.gated, BIAS=plan.bias, RESIDUAL=plan.residual, NORM=plan.norm is not None, PDL=plan.pdl,
                  NORM_OFFSET=f"{plan.norm_offset:.1f}", WTYPE=plan.wtype, GROUP=plan.group, XR=plan.xr,
                  X_E4M3=plan.x_e4m3, XGROUP=plan.x_group, PK=plan.piece_k, XSHARE=plan.xshare, SHARED_BYTES=plan.shared_bytes, MIN_BLOCKS=plan.min_blocks,
                  EXPERTS=plan.experts, GATHER=plan.gather, FIXED=plan.fixed, COMPACT=plan.compact, W_STRIDE=_w_stride(plan), S_STRIDE=_s_stride(plan), LDW=plan.ldw or plan.k,
                  XROW=("(long long)xrow_s[m]" if plan.gather else "(long long)(row0 + m)") if plan.experts
                  else "(long long)m")


def _w_stride(plan: GemvPlan) -> int:
    """Elements of the kernel's w pointer type one expert's W takes (u4: int32 words of 8 k)."""
    return plan.n * plan.k // (8 if plan.wtype == "u4" else 1)


def _s_stride(plan: GemvPlan) -> int:
    """Elements of one expert's scales: row scales [N], (scale, zero) words [N, GPAD], or f8e4m3
    128 x 128 block scales [ceil(N / 128), ceil(K / 128)]."""
    if plan.wtype == "f8e4m3" and plan.group:
        return -(-plan.n // 128) * -(-plan.k // 128)
    if plan.group:
        return plan.n * ((plan.k // plan.group + 3) // 4 * 4)
    return plan.n


def _tuned_plan(*, dtype: str, n: int, k: int, max_m: int, gated, wtype, group: int, arch: str, **rest):
    """The plan with the tuning table's split for this problem (codegen/tuning.py), or None where no table has one
    or the problem's plan cannot take it (then the rules decide)."""
    from .tuning import lookup
    split = lookup("gemv_x8" if rest.get("x_e4m3") else "gemv", arch=arch, dtype=dtype, wtype=wtype, group=group,
                   gated=gated, n=n, k=k, bucket=max_m)
    if split is None:
        return None
    try:
        return GemvPlan(dtype=dtype, n=n, k=k, max_m=max_m, gated=gated, arch=arch, wtype=wtype, group=group,
                        **split, **rest)
    except ValueError:
        return None


def plan_gemv(dtype: str, *, n: int, k: int, max_m: int = 8, gated: str | None = None, bias: bool = False,
              residual: bool = False, norm: str | None = None, norm_offset: float = 0.0, arch: str = "sm_90",
              rt: int | None = None, warps: int | None = None, stages: int | None = None, wtype: str | None = None,
              group: int = 0, experts: int = 0, gather: bool = False, fixed: int = 0,
              compact: bool = False, ldw: int = 0, x_e4m3: bool = False, x_group: int = 0,
              xshare: int = 0, min_blocks: int | None = None, tuned: bool = True) -> GemvPlan:
    """The plan for a product of at most `max_m` tokens (rounded up to 8, 16, 32 or 64); rt, warps
    and stages override the work split (benchmarks/bench_gemv.py sweeps them); wtype and group
    make W weight-only quantised, or W8A8 (f8e4m3; x_e4m3: x quantised per token beforehand; the
    module's docstring). xshare (u4): the shared-x layout with K over that many CTAs (xshare_split gives the
    default), its own defaults rt 1, 4 warps, 2 stages, and registers for 16 warps an SM where not gated
    (min_blocks; 128 a thread: 139 at 16 tokens would hold 12; gated, 16 warps spill). Where rt, warps and
    stages are not given, a split the tuning tables measured faster for this problem (codegen/tuning.py) comes
    before the rules below; tuned=False: the rules alone (what `layerforge tune` measures a table's splits against)."""
    if not 1 <= max_m <= MAX_M:
        raise ValueError(f"gemv: serves 1 to {MAX_M} tokens, got max_m = {max_m}")
    mt = token_bucket(max_m) // 8           # n8 token tiles: 1, 2, 4, 8
    bucket = token_bucket(max_m, wtype)     # the plan's max_m: 8 mt, or (u4) 1, 2, 4
    if xshare:
        warps = warps or XSHARE_WARPS
        if min_blocks is None:
            min_blocks = 1 if gated else max(1, XSHARE_WARPS_SM // warps)
        return GemvPlan(dtype=dtype, n=n, k=k, max_m=bucket, gated=gated, bias=bias, residual=residual, arch=arch,
                        rt=rt or XSHARE_RT, warps=warps, stages=stages or XSHARE_STAGES, wtype=wtype,
                        group=group, xshare=xshare, min_blocks=min_blocks)
    if tuned and rt is None and warps is None and stages is None and min_blocks is None and not experts \
            and wtype in (None, "u4", "i8", "f8e4m3"):
        # a split measured faster than the rules below for this exact problem (codegen/tuning.py; `layerforge tune`;
        # x quantised beforehand: the gemv_x8 family's)
        hit = _tuned_plan(dtype=dtype, n=n, k=k, max_m=bucket, gated=gated, bias=bias, residual=residual, norm=norm,
                          norm_offset=float(norm_offset), arch=arch, wtype=wtype, group=group, ldw=0 if ldw == k else ldw,
                          x_e4m3=x_e4m3, x_group=x_group)
        if hit is not None:
            return hit
    # defaults from the H200 sweep (benchmarks/NOTES.md, "Small-token products: shared-memory
    # rings"): 4 warps x 4 stages; a gated product of one token tile keeps more CTAs per SM with
    # 2 warps x 3 stages (8B gate/up 55.1 against 58.5 us), of two tiles 8 x 3 (59.0 / 60.3)
    dw, ds = {1: (2, 3), 2: (8, 3)}.get(mt, (4, 4)) if gated else (4, 4)
    drt = 1
    if wtype in ("u4", "i8"):
        # from the H200 sweep (benchmarks/NOTES.md, "Quantised work splits"; `bench_gemv --quant
        # --sweep`): shallow rings (2 stages, i8 ungated 3) keep more CTAs an SM; gated and wide
        # products 1 column tile x 4 warps, narrow ones (<= 4096 outputs: o, down) 2 x 8 warps
        # (8B u4 at one token: gate/up 0.48 -> 0.67 of copy, down 0.53 -> 0.64, o 0.40 -> 0.45)
        narrow = not gated and n <= 4096
        drt, dw = (2, 8) if narrow else (1, 4)
        ds = 3 if wtype == "i8" and not gated else 2
        if wtype == "u4" and mt == 2 and not narrow and ops.arch_number(arch) >= 90:
            # u4 at 9-16 rows (the same sweep, 8B at 16 rows): wide products 2 column tiles (qkv 12.1 -> 9.4 us),
            # gated ones 2 warps (gate/up 33.4 -> 31.2 us)
            drt, dw = (1, 2) if gated else (2, 4)
        if wtype == "u4" and bucket == 1 and narrow and k >= 8192 and ops.arch_number(arch) >= 90:
            # one token, long K (8B down): 16 warps, 2+ chunks each (the H200 sweep at one token: 9.6 -> 9.1 us)
            drt, dw = 2, 16
        budget = min(QUANT_SHARED_BUDGET_SM90 if ops.arch_number(arch) >= 90 else QUANT_SHARED_BUDGET,
                     ops.shared_limit(arch))
        # more tokens (x's rows a stage grow with them): fewer warps, then stages, then column
        # tiles, until the CTA fits the budget (sm_80 has 163 KB, sm_86 / sm_89 99 KB)
        for cand in ((drt, dw, ds), (drt, min(dw, 4), ds), (drt, min(dw, 4), 2), (1, min(dw, 4), 2), (1, 2, 2)):
            try:
                probe = GemvPlan(dtype=dtype, n=n, k=k, max_m=bucket, gated=gated, norm=norm, rt=rt or cand[0],
                                 warps=warps or cand[1], stages=stages or cand[2], wtype=wtype, group=group,
                                 arch=arch)
            except ValueError:   # past what a CTA can have
                continue
            if probe.shared_bytes <= budget:
                break
        drt, dw, ds = cand
    elif wtype is not None:
        # f8e4m3, from `layerforge tune` on an H100 (benchmarks/NOTES.md, "tuning the W8A8 path the layer runs"; the
        # Llama-3-8B and -70B products, every split against the old rule, 4 warps x as many stages (2-4) as fit):
        # 2 stages won nearly everywhere. x quantised in the kernel's registers (a norm prologue's path), at 9-16
        # rows: narrow products (<= 4096 outputs) 2 column tiles x 8 warps (8B o 11.4 -> 9.8 us, down 32.6 -> 24.3),
        # wide ones 4 x 8 (q/k/v 20.6 -> 13.8, lm_head 305 -> 182), gated 2 x 2 (gate/up 60.6 -> 46.1); at 1-8 rows
        # narrow 2 x 8, wide 1 x 4, gated 1 x 2; long K (the 70B products) 2 x 4 / 4 x 4, gated 2 x 8. Over x
        # quantised first (x_e4m3, the layer's default path) the old rule was up to 11 % behind the best split on the
        # 8B products and up to 19 % on the 70B ones, whose winners spread over 4 and 8 warps: 8 warps at 1-8 rows, 4
        # from 9, 2 column tiles where K >= 8192 (narrow products from 1 row). The rules checked against the old one,
        # same run: in-register 1.0-1.76x faster, x first 0.92-1.25x (NOTES; 0.92: f8b 8B q/k/v at 8 rows, tabled).
        narrow, long_k = not gated and n <= 4096, k >= 8192
        if x_e4m3:
            if gated:
                drt, dw = 1, (8 if mt == 1 else 4)
            elif narrow:
                drt, dw = (2, 8) if mt == 1 or long_k else (1, 4)
            elif long_k:
                drt, dw = (2, 8) if mt == 1 else (2, 4)
            else:
                drt, dw = (1, 8) if mt == 1 else (1, 4)
        elif gated:
            drt, dw = (2, 8) if long_k else (2, 2) if mt == 2 else (1, 2)
        elif narrow:
            drt, dw = 2, 8
        elif long_k:
            drt, dw = (2, 4) if mt == 1 else (4, 4)
        else:
            drt, dw = (4, 8) if mt == 2 else (1, 4)
        ds = 2
    rt = drt if rt is None else rt
    if min_blocks not in (None, 1):
        raise ValueError("gemv: min_blocks is the shared-x layout's (xshare)")
    fields = dict(dtype=dtype, n=n, k=k, max_m=bucket, gated=gated, bias=bias, residual=residual, norm=norm,
                  norm_offset=float(norm_offset), arch=arch, rt=rt, wtype=wtype, group=group, experts=experts,
                  gather=gather, fixed=fixed, compact=compact, ldw=0 if ldw == k else ldw, x_e4m3=x_e4m3,
                  x_group=x_group)
    # the split the rules chose, then (where the arch's shared memory cannot hold it: sm_86 / sm_89's 99 KB) fewer
    # stages, then half the warps, as far as the caller left them free
    w0, s0 = (dw if warps is None else warps), (ds if stages is None else stages)
    depths = range(s0, 1, -1) if stages is None else (s0,)
    widths = [w0]
    while warps is None and widths[-1] > 1:
        widths.append(widths[-1] // 2)
    error = None
    for w in widths:
        for d in depths:
            try:
                return GemvPlan(**fields, warps=w, stages=d)
            except SharedMemoryError as e:
                error = e
    raise error
