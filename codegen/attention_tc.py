"""Attention blocks -> a tensor-core flash-attention kernel over a paged KV cache.

    plan = plan_tc_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"),
                             arch="sm_90", page_size=16, mode="prefill")
    plan.key -> 'llama_attn_d128_hkv8_hq32_bf16_p16_tcprefill_sm90'

One template (templates/cuda/attention_tc.cu.jinja), two tile shapes:
  prefill: 4 warps along the query rows (32 rows each, 16 for head dim 256), one softmax
           state per row, K/V tiles of 32-64 keys;
  decode:  one m16 row tile (a token's query heads, padded) and 4 warps along the keys,
           each with its own softmax state, merged at the end; used when a query chunk has
           few rows (decode, short chunks).
The hooks (score, mask, bounds, RoPE) are the same as the paged CUDA-core kernel's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..dsl.program import Layer
from ..dsl.types import DType
from . import ops
from .attention import AttentionPlanNames, check_attention_layer, check_specialisable, hook_context
from .plan import layer_key
from .render import read_template, render
from .row import LoweringError

MODES = ("prefill", "decode")


@dataclass(frozen=True)
class TileConfig:
    wm: int        # warps along query rows
    wn: int        # warps along keys (each its own softmax state)
    mt: int        # m16 row tiles per warp
    bnw: int       # keys per warp per tile
    stages: int    # K/V shared-memory buffers
    min_blocks: int
    qreg: bool = True   # Q fragments in registers for the whole loop (else re-read from shared memory)
    fold: bool = False  # fold the scale into the exponential when it is a positive constant and no score hook
    ksub: int = 0       # keys per softmax step within a warp's bnw (0: all bnw at once)
    sunroll: int = 0    # unroll of the S = Q K^T loop over head-dim steps (0: 2 for 64-key steps, else full)

    @property
    def label(self) -> str:
        return (f"w{self.wm}x{self.wn}m{self.mt}n{self.bnw}s{self.stages}{'q' if self.qreg else ''}"
                f"{'f' if self.fold else ''}{f'b{self.min_blocks}' if self.min_blocks > 2 else ''}"
                f"{f'k{self.ksub}' if self.ksub and self.ksub != self.bnw else ''}"
                f"{f'u{self.sunroll}' if self.sunroll else ''}")

    @property
    def threads(self) -> int:
        return self.wm * self.wn * 32

    @property
    def rows(self) -> int:
        return self.wm * self.mt * 16

    @property
    def keys(self) -> int:
        return self.wn * self.bnw


def tile_candidates(mode: str, head_dim: int, group: int) -> list[TileConfig]:
    """Tile shapes to try, best first. Wider key tiles amortise the per-tile work (barrier,
    row maxima, rescale) but hold more score registers; the first that compiles without
    register spills for the block at hand is used (hooks such as soft-capping or ALiBi cost
    registers too)."""
    if mode == "prefill":
        if head_dim == 256:
            return [TileConfig(wm=4, wn=1, mt=1, bnw=32, stages=2, min_blocks=2, qreg=False),
                    TileConfig(wm=4, wn=1, mt=1, bnw=16, stages=2, min_blocks=2, qreg=False)]
        if head_dim == 128:   # 64-key tiles: S loop unrolled by 2, or not (fewer registers), or in
            # two softmax steps of 32 keys (fewer live scores); then narrower tiles
            return [TileConfig(wm=4, wn=1, mt=2, bnw=b, stages=2, min_blocks=2, qreg=False, ksub=k, sunroll=u)
                    for b, k, u in ((64, 0, 0), (64, 0, 1), (64, 32, 0), (48, 0, 0), (32, 0, 0))]
        return [TileConfig(wm=4, wn=1, mt=2, bnw=64, stages=3, min_blocks=2),
                TileConfig(wm=4, wn=1, mt=2, bnw=32, stages=3, min_blocks=2)]
    # decode: Q fragments in registers where they fit, else re-read from shared memory
    mt = 1 if group <= 16 else 2
    if head_dim == 256:   # O of two m16 row tiles would take all 256 registers: groups > 16 take 2 row blocks
        return [TileConfig(wm=1, wn=4, mt=1, bnw=16, stages=2, min_blocks=1, qreg=q) for q in (True, False)]
    return [TileConfig(wm=1, wn=4, mt=mt, bnw=16, stages=3, min_blocks=2, qreg=q) for q in (True, False)]


@dataclass(frozen=True)
class TCAttentionPlan(AttentionPlanNames):
    layer: Layer
    arch: str
    page_size: int = 16
    mode: str = "prefill"
    tiles: TileConfig | None = None   # None: the first of tile_candidates (plan_tc_attention chooses)

    @property
    def key(self) -> str:
        return layer_key(self.layer, f"p{self.page_size}", f"tc{self.mode}", self.config.label,
                         self.arch.replace("_", ""))

    @property
    def group(self) -> int:
        return int(self.spec.num_q_heads) // int(self.spec.num_kv_heads)

    @property
    def config(self) -> TileConfig:
        return self.tiles or tile_candidates(self.mode, int(self.spec.head_dim), self.group)[0]

    @property
    def page_entries(self) -> int:
        """Pages a key tile spans at most (tiles start at multiples of their width)."""
        bn, page = self.config.keys, self.page_size
        return 1 if page % bn == 0 else (bn // page if bn % page == 0 else (bn - 1) // page + 2)

    @property
    def shared_bytes(self) -> int:
        c, hd = self.config, int(self.spec.head_dim)
        # Q, K/V stages, and a ring of 2 * stages tiles' page entries
        return 2 * (c.rows * hd + 2 * c.stages * c.keys * hd) + 4 * 2 * c.stages * self.page_entries

    def source(self) -> str:
        return _render(self)


@functools.lru_cache(maxsize=128)
def _render(plan: TCAttentionPlan) -> str:
    spec = plan.spec
    dtype = plan.layer.dtype
    hd = check_specialisable(plan.layer, "tensor-core attention")
    c = plan.config
    ctx = hook_context(plan.layer)
    fold = c.fold and not ctx["has_score"] and ctx["scale_const"] is not None and ctx["scale_const"] > 0
    if c.wn > 1:   # the warps' partial results are merged in the Q and K/V buffers
        need = 4 * (c.wn * c.rows * hd + 2 * c.wn * c.rows)
        assert need <= plan.shared_bytes, (need, c)
    return render(
        "cuda/attention_tc.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name, plan_key=plan.key,
        common=read_template("cuda/common.cuh"), T=ops.STORAGE_TYPE[dtype],
        MMA_T="bf16" if dtype is DType.bf16 else "f16", HD=hd, HQ=int(spec.num_q_heads),
        HKV=int(spec.num_kv_heads), GROUP=plan.group, PAGE=plan.page_size, NPG=plan.page_entries, WM=c.wm, WN=c.wn, MT=c.mt,
        BNW=c.bnw, KW=c.ksub or c.bnw, SUNROLL=c.sunroll or (2 if (c.ksub or c.bnw) >= 64 else None), STAGES=c.stages, MIN_BLOCKS=c.min_blocks, QREG=c.qreg, FOLD=fold, **ctx)


def plan_tc_attention(layer: Layer, arch: str, *, page_size: int = 16, mode: str = "prefill",
                      tiles: TileConfig | None = None, cache=None) -> TCAttentionPlan:
    """The tensor-core plan of an attention block. Without `tiles`, the first of
    `tile_candidates` that compiles without register spills (NVRTC, through `cache`)."""
    check_attention_layer(layer, page_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    major = int(arch.removeprefix("sm_").rstrip("a")) // 10
    if major < 8:
        raise LoweringError(f"{layer.name}: tensor-core attention needs sm_80 or newer, not {arch}")
    if tiles is not None:
        plan = TCAttentionPlan(layer, arch, page_size, mode, tiles)
        plan.source()
        return plan
    spec = layer.function.outputs[0].arg
    candidates = tile_candidates(mode, int(spec.head_dim), int(spec.num_q_heads) // int(spec.num_kv_heads))
    for c in candidates:
        plan = TCAttentionPlan(layer, arch, page_size, mode, c)
        plan.source()
        if c is candidates[-1] or _spill_free(plan, cache):
            return plan
    raise AssertionError("unreachable")


def _spill_free(plan: TCAttentionPlan, cache=None) -> bool:
    """Compile (through the kernel cache, so a build or a second call pays nothing) and read
    ptxas' spill report. With compiling at run time disabled, a candidate that is not in the
    cache was not the one a build chose."""
    from ..runtime.cache import KernelNotCachedError, default_cache
    from ..runtime.nvrtc import CompileOptions
    try:
        res = (cache or default_cache()).get_or_compile(plan.source(), plan.kernel_name, CompileOptions(plan.arch),
                                                        plan.key)
    except KernelNotCachedError:
        return False
    kr = res.resources.get(plan.kernel_name)
    return kr is not None and kr.spill_stores == 0 and kr.spill_loads == 0
