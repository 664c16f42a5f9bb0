"""Matrix products on Hopper tensor cores (sm_90a): y = x @ W^T for any number of tokens, with
the layer's epilogue fused (bias, a gated activation over W's two row halves, a residual add).

    plan = plan_gemm("bf16", n=28672, k=4096, gated="silu")
    plan.key       -> 'gemm_n28672_k4096_bf16_silu_bn256s4_sm90a'
    plan.source()  -> CUDA C

The small-token kernel (codegen/gemv.py) serves decode; this one is for prefill-sized M, where
a product is bound by the tensor cores. A CTA computes a 128 x BN tile of x W^T (BN rows of W:
gated, BN / 2 gate rows and the same BN / 2 up rows, so act(gate) * up is formed in registers)
with three warpgroups, the structure of the Hopper attention prefill (templates/cuda/
hopper.cuh.jinja is the shared toolkit): a producer warpgroup copies 64-wide K slices of the x
and W tiles by cp.async into a ring of STAGES buffers in the 128-byte swizzle layout the wgmma
descriptors read and signals each on a "full" mbarrier; two consumer warpgroups (64 rows each)
run wgmma with both operands from shared memory, keep one k-slice of MMAs in flight and hand
each buffer back on its "empty" mbarrier. The epilogue goes from the accumulators to memory.

Two options, off by default until measured (benchmarks/NOTES.md, "Hopper GEMM: TMA loads and a
persistent schedule"):
    tma=True         one producer thread loads each stage by TMA (cp.async.bulk.tensor) from
                     tensor maps the launcher encodes (runtime/tma.py; the kernel takes them by
                     value instead of x's and W's pointers); the box's 128-byte swizzle is the
                     layout the wgmma descriptors read and rows / columns outside the tensors
                     arrive as zeros.
    persistent=True  (needs tma) one CTA an SM walks the tiles in `tile_order`; the ring runs on
                     across tiles, so the loads of the next tile overlap this tile's epilogue.
    groups=G         (needs persistent) a grouped product over G weights [G, N, K] (a mixture of
                     experts' gate/up or down): x's rows sorted by group, group g's rows
                     offsets[g] .. offsets[g + 1] - 1 (int32 offsets [G + 1], made on the device
                     by the kernel before: read by the kernel, not the host, so the launch is
                     graph-safe); y's row j = epilogue(x[j] @ W[g]^T). Each CTA first sums the
                     groups' row tiles into shared tables (one warp, a shuffle scan), then walks
                     the tiles group by group, each group's in `tile_order`; a group's last row
                     tile reads the next group's rows and stores only its own.
    cluster=2        (needs persistent) CTA pairs (thread-block clusters of 2) walk tiles of
                     256 rows, each CTA its 128; each copies half of the pair's W tile by TMA
                     multicast into both CTAs' shared memory, so W's tile leaves L2 once a pair;
                     a stage is refilled once both CTAs' consumers released it. The grid is twice
                     the clusters the device can hold at once (the launcher asks the driver).
                     Measured 1.27 x slower than without (benchmarks/NOTES.md: coupling the two
                     rings costs ~30 %, the multicast gains ~3 %): an option, off.
    tma_store=True   (needs persistent, not cluster nor residual: the residual's loads beside the
                     staging writes spilled gated tiles at BN 256; output columns a multiple of 8)
                     the epilogue through shared memory: each consumer warpgroup writes its 64 x
                     BNO outputs into its half of a staging tile (the 128-byte swizzle layout, so
                     the writes are free of bank conflicts) and one of its threads hands them to
                     TMA stores (cp.async.bulk.tensor, bulk groups; the map's bounds clip rows past
                     M and columns past NOUT); the warpgroup goes on to the next tile's MMAs while
                     the copy engine writes. The staging tile costs a stage of the ring at BN 256.
                     Grouped: a warpgroup whose 64 rows pass its group's end stores from the registers.
    fp8=True         (needs tma_store; K a multiple of 16) W8A8 on the e4m3 tensor cores: x
                     and W in float8_e4m3fn with float32 scales per token (xscale [M]) and per W row
                     (wscale [N]); a stage row is 128 bytes of 128 k, the wgmma k32; the scales are
                     applied to the f32 sums before the epilogue (runtime/quant.fp8_gemm). The sums are
                     the tensor cores' own (cuBLAS's use_fast_accum): their error grows with K.
                     Grouped: x's rows sorted by group, their scales in that order; W's scales of the
                     stacked [G N, K] W (blocks: N a multiple of 128, so a group has whole blocks).
    fp8_scales       (fp8) "token": the above. "k128": x with one scale per token and 128 k (xscale
                     [M, KB], KB = ceil(K / 128): the small-token kernel's numerics), W per row; each
                     128-k slice's sums start from zero and are added, scaled, into f32 totals (the
                     promotion DeepSeek-V3 describes: f32 accuracy whatever K). "k128_blocks": the same
                     with W's scales per 128 x 128 block (wscale [ceil(N / 128), KB], DeepSeek-V3's).
                     Both hold two accumulator sets: BN 128 only (gated: NOUT a multiple of 64, so
                     the up rows of a tile lie in one W block).
    tail_split=P     (needs persistent; not cluster nor groups) the last round's tiles split along K: where
                     the tiles are T = F G + R on a G-CTA grid (G the SMs; F whole rounds, 0 < R <= G / 2),
                     each of the last R tiles is cut into S = min(G / R, P, KT / TAIL_MIN) parts of its k
                     slices, so the R S <= G parts run at once instead of R whole tiles on R SMs while the
                     others idle (8B gate/up at 4096 rows: 3584 tiles of 128 x 256 on 132 SMs, 27 rounds
                     and 20 tiles: the 28th round ran a whole tile on 20 SMs). Every tile's part p covers
                     the same k slices, so the parts running at once share x's and W's slices in L2 as a
                     round of whole tiles does (a stream-K share of the tail at any k offset was measured
                     1.1-2.6 x slower than the whole tiles there on an H100: benchmarks/NOTES.md). A
                     part's f32 sums go to its slot of the workspace `part` and the tile's last part to
                     count (`counts`, a counter a tail tile, incremented after a fence) sums the slots in
                     part order (deterministic) and runs the epilogue, resetting the counter for the next
                     launch; nothing waits on another CTA. The grid is G whatever the tiles (CTAs without
                     work return), so a product of fewer tiles than G / 2 splits too. Workspace:
                     `workspace(sms)`.
    skew=L           (needs persistent; not cluster nor the k128 scalings) consumer warpgroup 2 starts its first
                     tile once warpgroup 1 has issued L k slices (a named barrier, once). Both read the
                     same ring stages, so the lag stays (each runs alone at the tensor cores' full rate
                     while the other is in its epilogue, and their MMAs share them otherwise): the one's
                     epilogue runs under the other's MMAs, as a ping-pong schedule's does, at the price of
                     L stages of the ring's slack (a stage is refilled once the later warpgroup is done
                     with it). L < stages.
Not yet here: 4-bit weights on this path (the small-token kernel and the decode-range GEMM have them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from .abi import TENSOR_MAP_CTYPE, Arg, KernelABI, SharedLayout
from .gemv import _TYPES, ProductPlan, check_product, product_args
from .render import read_template, render

__all__ = ["GemmPlan", "plan_gemm", "tile_order", "tail_items", "pick_bn", "BM", "BN_COST", "MAX_GROUPS"]

BM = 128                 # rows (tokens) per CTA: two consumer warpgroups of 64
BK = 64                  # K per stage: one 128-byte swizzle row
SHARED_LIMIT = 227 * 1024
# A persistent grid walks bands of W's column tiles whose rows fit in this much L2 (H100 / H200:
# 50 MB), so a band stays resident while every row tile of x passes it.
L2_BAND_BYTES = 24 << 20
MAX_GROUPS = 1024        # a grouped product's groups (its shared tables: 8 bytes a group)
FP8_SCALES = ("token", "k128", "k128_blocks")
MAX_TAIL_PARTS = 16      # tail_split's most parts a tile (the last one reads the others' slots)
TAIL_MIN = 4             # tail_split's fewest k slices a part (a part's slot costs a tile's f32 sums)


# Time of a tile per column of W, relative to BN 256 (a 128 x 128 tile reads 1.5 x the shared-
# memory bytes a 128 x 256 one does per MMA, and pays its prologue and epilogue over half the
# work): a guess of the planner until the sweep (benchmarks/bench_gemm.py --bn) measures it.
BN_COST = {256: 1.0, 192: 1.04, 128: 1.1}
GATED_BN = (128, 256)    # a gated tile's BN / 2 output columns: whole 64-column boxes of the TMA store


def pick_bn(m: int, n_out: int, gated: bool, sms: int, widths: tuple[int, ...] = tuple(BN_COST)) -> int:
    """The tile width for an M x n_out product on `sms` multiprocessors: the BN whose rounds of
    tiles (one CTA an SM) cost least, a round of BN-wide tiles costing BN_COST[bn] * bn / 256.
    BN 256 leaves a third of the SMs idle for a whole round where the tiles are a few more than
    a multiple of the SMs (8B qkv at 1024 tokens: 192 tiles, 1.45 rounds); 128 halves the tile."""
    def cost(bn: int) -> float:
        tiles = -(-m // BM) * -(-n_out // (bn // 2 if gated else bn))
        return -(-tiles // sms) * BN_COST[bn] * bn / 256
    return min((bn for bn in widths if not gated or bn in GATED_BN), key=lambda bn: (cost(bn), -bn))


def tile_order(t: int, tiles_m: int, tiles_n: int, band: int) -> tuple[int, int]:
    """(row tile, column tile) of the persistent grid's t-th tile: bands of `band` column tiles
    (the last one narrower), each walked a row tile at a time with its columns fastest, so the
    CTAs in flight share x's row tiles and the band's W rows stay in L2. The kernel computes the
    same formula (lf_gemm_tile in templates/cuda/gemm_wgmma.cu.jinja)."""
    b, r = divmod(t, band * tiles_m)
    width = min(band, tiles_n - b * band)
    return r // width, b * band + r % width


def tail_items(tiles: int, grid: int, max_parts: int, kt: int) -> list[list[tuple[int, int, int]]]:
    """The persistent walk with a split tail (GemmPlan.tail_split), as the kernel computes it
    (lf_tail_item in templates/cuda/gemm_wgmma.cu.jinja): each CTA's work items in order, an item
    (tile, first k slice, end k slice). Whole rounds of tiles, then the rest's tiles cut into `parts`."""
    whole = tiles // grid * grid
    rest = tiles - whole
    parts = max(1, min(grid // rest, max_parts, kt // TAIL_MIN)) if rest else 1
    walks = []
    for c in range(grid):
        items = []
        for item in range(c, whole + rest * parts, grid):
            if item < whole:
                items.append((item, 0, kt))
            else:
                u = item - whole
                p = u % parts
                items.append((whole + u // parts, p * kt // parts, (p + 1) * kt // parts))
        walks.append(items)
    return walks


@dataclass(frozen=True, kw_only=True)
class GemmPlan(ProductPlan):
    family: ClassVar[str] = "gemm"
    arch: str = "sm_90a"
    bn: int = 256                # W rows per CTA tile (the wgmma N)
    stages: int = 4
    producer_regs: int = 40
    consumer_regs: int = 232
    tma: bool = False            # x and W by TMA from tensor maps (the module's docstring)
    persistent: bool = False     # one CTA an SM walking tile_order (needs tma)
    groups: int = 0              # a grouped product over [groups, N, K] weights (needs persistent)
    cluster: int = 1             # 2: CTA pairs sharing W's tile by TMA multicast (needs persistent)
    tma_store: bool = False      # the epilogue by TMA stores from a shared staging tile (the module's docstring)
    fp8: bool = False            # x and W in e4m3 with f32 scales per token and per W row (needs tma_store)
    fp8_scales: str = "token"    # "token" | "k128" | "k128_blocks" (the module's docstring)
    tail_split: int = 0          # the last round's tiles cut into at most this many K parts (0: off)
    skew: int = 0                # k slices warpgroup 1 runs ahead of warpgroup 2 (0: off)

    def __post_init__(self):
        check_product(self, "gemm", ("n", "k", "bn", "stages"))
        if self.persistent and not self.tma:
            raise ValueError("gemm: the persistent schedule needs tma=True (the cp.async producer is one tile's)")
        if self.cluster not in (1, 2) or (self.cluster == 2 and not self.persistent):
            raise ValueError(f"gemm: cluster must be 1, or 2 with the persistent schedule, got {self.cluster}")
        if self.groups:
            if not self.persistent or not 1 <= self.groups <= MAX_GROUPS:
                raise ValueError(f"gemm: groups needs the persistent schedule and 1 to {MAX_GROUPS} groups, "
                                 f"got {self.groups} (persistent={self.persistent})")
            if self.bias or self.residual:
                raise ValueError("gemm: a grouped product takes no bias or residual (its rows are sorted by group)")
        if self.tma_store and (not self.persistent or self.cluster > 1 or self.residual or self.n_out % 8):
            raise ValueError("gemm: tma_store needs the persistent schedule without clusters or a residual, and "
                             f"output columns a multiple of 8 (16-byte rows for the map), got n_out {self.n_out}")
        if self.fp8 and (not self.tma_store or self.k % 16
                         or (self.groups and self.fp8_scales == "k128_blocks" and self.n % 128)):
            raise ValueError("gemm: fp8 needs tma_store, K a multiple of 16 (16-byte e4m3 rows), and grouped with "
                             f"128 x 128 W blocks N a multiple of 128 (whole blocks a group), got K {self.k}, N {self.n}")
        if self.fp8_scales not in FP8_SCALES or (self.fp8_scales != "token" and not self.fp8):
            raise ValueError(f"gemm: fp8_scales must be one of {FP8_SCALES} (with fp8), got {self.fp8_scales!r}")
        if self.fp8_scales != "token" and (self.bn != 128 or (self.gated and self.n_out % 64)):
            raise ValueError(f"gemm: fp8_scales {self.fp8_scales!r} holds two accumulator sets: bn 128 only (got "
                             f"{self.bn}), and gated a multiple of 64 outputs (got {self.n_out})")
        if self.fp8 and self.bn == 256 and self.k <= 2 * BK:
            # one k-slice: NVRTC 13.0 spills the f16 bias epilogue of BN 256 (24 bytes); BN 128 serves it
            raise ValueError(f"gemm: fp8 at K {self.k} (one 128-k slice) takes bn <= 192, got bn 256")
        if self.tail_split and (not 2 <= self.tail_split <= MAX_TAIL_PARTS or not self.persistent
                                or self.cluster > 1 or self.groups):
            raise ValueError(f"gemm: tail_split takes 2 to {MAX_TAIL_PARTS} parts and the persistent schedule "
                             f"without clusters or groups, got {self.tail_split}")
        if self.skew and (not 0 < self.skew < self.stages or not self.persistent or self.cluster > 1
                          or self.fp8_scales != "token"):
            raise ValueError(f"gemm: skew takes 1 to stages - 1 ({self.stages - 1}) slices and the persistent "
                             f"schedule without clusters or the k128 scalings, got {self.skew}")
        if self.bn not in (64, 128, 192, 256) or self.stages < 2 or (self.gated and self.bn == 192):
            raise ValueError(f"gemm: bn must be 64, 128, 192 (not gated) or 256 and stages >= 2, got {self.bn}, "
                             f"{self.stages}{' gated' if self.gated else ''}")
        if self.arch != "sm_90a":
            raise ValueError(f"gemm: the kernel uses sm_90a's wgmma and setmaxnreg, not {self.arch}")
        if 128 * (self.producer_regs + 2 * self.consumer_regs) > 65536:
            raise ValueError(f"gemm: register budgets {self.producer_regs}/{self.consumer_regs} exceed the SM's 64K")
        if self.shared_bytes > SHARED_LIMIT:
            raise ValueError(f"gemm: {self.shared_bytes} bytes of shared memory pass the {SHARED_LIMIT} a CTA can have")

    @property
    def bn_out(self) -> int:
        """Output columns per CTA tile."""
        return self.bn // 2 if self.gated else self.bn

    @property
    def key(self) -> str:
        parts = ["gemm", f"n{self.n}", f"k{self.k}", self.dtype, *self.epilogue_key]
        parts.append(f"bn{self.bn}s{self.stages}")
        if self.tma:
            parts.append("tma")
        if self.persistent:
            parts.append(f"persist{self.band}")
        if self.groups:
            parts.append(f"g{self.groups}")
        if self.cluster > 1:
            parts.append(f"c{self.cluster}")
        if self.tma_store:
            parts.append("st")
        if self.tail_split:
            parts.append(f"ts{self.tail_split}")
        if self.skew:
            parts.append(f"sk{self.skew}")
        if self.fp8:
            parts.append({"token": "f8", "k128": "f8k", "k128_blocks": "f8b"}[self.fp8_scales])
        parts.append(self.arch.replace("_", ""))
        return "_".join(parts)

    @property
    def tiles_n(self) -> int:
        return -(-self.n_out // self.bn_out)

    @property
    def band(self) -> int:
        """Column tiles per band of the persistent schedule (tile_order)."""
        return max(1, min(self.tiles_n, L2_BAND_BYTES // (self.bn * self.k * (1 if self.fp8 else 2))))

    @property
    def tma_boxes(self) -> dict[str, tuple[int, int]]:
        """(rows, columns) of the box each tensor map copies: x's 128 rows, W's BN rows (gated:
        BN / 2, copied twice, gate rows then up rows), 64 columns (one 128-byte swizzle row); with
        tma_store, out's boxes of a warpgroup's 64 rows."""
        kb = 2 * BK if self.fp8 else BK   # (e4m3: 128 one-byte columns a box row)
        boxes = {"x": (BM, kb), "w": (self.bn // 2 if self.gated or self.cluster > 1 else self.bn, kb)}
        if self.tma_store:
            boxes["out"] = (64, BK)
        return boxes

    @property
    def shared_layout(self) -> SharedLayout:
        """The x and W stages (1024-byte aligned: the swizzle reads address bits 7-9), then the
        staging tile of the TMA stores (tma_store), the full / empty mbarriers."""
        return _layout(self.stages, self.bn, self.bn_out, self.groups, self.tma_store, bool(self.tail_split))

    @property
    def shared_bytes(self) -> int:
        return self.shared_layout.bytes + 1024   # the kernel aligns its base up to 1024 bytes

    def workspace(self, sms: int) -> tuple[int, int]:
        """(floats of `part`, ints of `counts`) of a tail_split plan on a grid of `sms` CTAs: a slot of
        128 x BN sums a part (a CTA one at most), a counter a tail tile (zero before the first launch; the
        kernel leaves them zero). Calls sharing them must be ordered (one stream)."""
        return (sms * BM * self.bn, sms) if self.tail_split else (0, 0)

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "n": self.n, "k": self.k, "gated": self.gated, "bias": self.bias,
                "residual": self.residual, "n_out": self.n_out, "tile": [BM, self.bn, BK], "stages": self.stages,
                **({"tma": True} if self.tma else {}), **({"band": self.band} if self.persistent else {}),
                **({"groups": self.groups} if self.groups else {}), **({"cluster": self.cluster} if self.cluster > 1 else {}),
                **({"tma_store": True} if self.tma_store else {}), **({"fp8": self.fp8_scales} if self.fp8 else {}),
                **({"tail_split": self.tail_split} if self.tail_split else {}),
                **({"skew": self.skew} if self.skew else {})}


def _layout(stages: int, bn: int, bn_out: int, groups: int, tma_store: bool, tail: bool = False) -> SharedLayout:
    tables = ((("gtile", 4 * (groups + 1)), ("goff", 4 * (groups + 1))) if groups else ())
    tables += (("flag", 16),) if tail else ()   # the tail part's "last to count" for its CTA
    staging = (("sC", BM * bn_out * 2),) if tma_store else ()
    return SharedLayout((("sA", stages * BM * BK * 2), ("sB", stages * bn * BK * 2), *staging,
                         ("bars", 8 * 2 * stages), *tables), align=1024)


@functools.lru_cache(maxsize=256)
def _abi(plan: GemmPlan) -> KernelABI:
    args = product_args(plan, (Arg("xscale", "const float* __restrict__", "input"),
                               Arg("wscale", "const float* __restrict__", "input")) if plan.fp8 else ())
    if plan.tma:   # x and W come as tensor maps (runtime/tma.py encodes them from the tensors)
        args[:2] = [Arg("x_map", TENSOR_MAP_CTYPE, "tmap", "x"), Arg("w_map", TENSOR_MAP_CTYPE, "tmap", "w")]
    if plan.tma_store:   # out by TMA stores: its map in out's place (M stays: the tiles' count); a
        # grouped product keeps out too, after its map (its groups' last rows: register stores)
        at = next(i for i, a in enumerate(args) if a.name == "out")
        args[at:at + 1] = [Arg("out_map", TENSOR_MAP_CTYPE, "tmap", "out"), *((args[at],) if plan.groups else ())]
    c = plan.cluster   # SMS: the device's multiprocessors (cluster 2: twice the clusters it holds at once)
    if plan.groups:   # M: every group's rows; a group's row tiles are at most cdiv(its rows, BM c)
        args.append(Arg("offsets", "const int* __restrict__", "input"))
        tiles = f"(cdiv(M, {BM * c}) + {plan.groups}) * {plan.tiles_n}"
        return KernelABI(name=plan.kernel_name, args=tuple(args),
                         grid=(f"min(SMS, {tiles})" if c == 1 else f"min(SMS, {c} * {tiles})",),
                         block=(384,), shared_bytes=plan.shared_bytes, problem=("M", "SMS"))
    if plan.tail_split:   # every SM a CTA (a tail of fewer tiles than SMs splits over them)
        args += [Arg("part", "float* __restrict__", "workspace"), Arg("counts", "int* __restrict__", "workspace")]
        return KernelABI(name=plan.kernel_name, args=tuple(args), grid=("SMS",), block=(384,),
                         shared_bytes=plan.shared_bytes, problem=("M", "SMS"))
    if plan.persistent:   # SMS: the device's multiprocessors
        tiles = f"cdiv(M, {BM * c}) * {plan.tiles_n}"
        return KernelABI(name=plan.kernel_name, args=tuple(args),
                         grid=(f"min(SMS, {tiles})" if c == 1 else f"min(SMS, {c} * {tiles})",),
                         block=(384,), shared_bytes=plan.shared_bytes, problem=("M", "SMS"))
    return KernelABI(name=plan.kernel_name, args=tuple(args),
                     grid=(f"cdiv({plan.n_out}, {plan.bn_out})", f"cdiv(M, {BM})"), block=(384,),
                     shared_bytes=plan.shared_bytes, problem=("M",))


@functools.lru_cache(maxsize=256)
def _render(plan: GemmPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    out_bf16 = mma == "bf16"
    if plan.fp8:
        mma = "e4m3"
    return render("cuda/gemm_wgmma.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, N=plan.n, K=plan.k,
                  NOUT=plan.n_out, BN=plan.bn, STAGES=plan.stages, GATED=plan.gated, BIAS=plan.bias,
                  RESIDUAL=plan.residual, smem=plan.shared_layout.offsets, PRODUCER_REGS=plan.producer_regs,
                  CONSUMER_REGS=plan.consumer_regs, wgmma_ops=[{"n": plan.bn, "a": "ss", "t": mma}], tma=plan.tma,
                  PERSISTENT=plan.persistent, TILES_N=plan.tiles_n, BAND=plan.band, GROUPS=plan.groups,
                  CLUSTER=plan.cluster, cluster=plan.cluster, TMA_STORE=plan.tma_store, FP8=plan.fp8, OUT_BF16=out_bf16,
                  FP8_K128=plan.fp8 and plan.fp8_scales != "token", FP8_WBLOCKS=plan.fp8_scales == "k128_blocks",
                  TAIL_SPLIT=plan.tail_split, TAIL_MIN=TAIL_MIN, SKEW=plan.skew)


def plan_gemm(dtype: str, *, n: int, k: int, gated: str | None = None, bias: bool = False, residual: bool = False,
              arch: str = "sm_90a", bn: int | None = None, stages: int | None = None, tma: bool = False,
              persistent: bool = False, groups: int = 0, cluster: int = 1, tma_store: bool = False,
              fp8: bool = False, fp8_scales: str = "token", tail_split: int = 0, skew: int = 0) -> GemmPlan:
    """The Hopper plan of a product; bn and stages override the tile (128 x 256 x 64, 4 stages:
    192 KB of shared memory, one CTA an SM; 3 with tma_store's 64 KB staging tile); tma, persistent,
    groups, cluster, tma_store, fp8, fp8_scales, tail_split, skew: the module's docstring."""
    bn = (256 if fp8_scales == "token" else 128) if bn is None else bn
    if stages is None:   # as many as fit beside the staging tile and the group tables (at most 6)
        stages, bn_out = 6, bn // 2 if gated else bn
        tail = bool(tail_split)
        while stages > 2 and _layout(stages, bn, bn_out, groups, tma_store, tail).bytes + 1024 > SHARED_LIMIT:
            stages -= 1
    return GemmPlan(dtype=dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, arch=arch, bn=bn,
                    stages=stages, tma=tma, persistent=persistent, groups=groups, cluster=cluster, tma_store=tma_store,
                    fp8=fp8, fp8_scales=fp8_scales, tail_split=tail_split, skew=skew)
