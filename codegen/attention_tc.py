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

Head dims: any multiple of 16 from 32 to 256, for q/k and (on its own, as DeepSeek's MLA
prefill's 192 / 128) for the values. 64, 128 and 256 with values of the head dim fill whole
128-byte shared-memory rows, which the XOR swizzle needs; other head dims (80, 96 for Phi-3
and GPT-NeoX-20B, 160, 192) and value dims of their own take the padded kernel: Q/K tile
rows of padded_dim(HD), V rows of padded_dim(HDV), the padding never loaded nor read, and
their own tile candidates (padded_candidates; the padding costs shared memory).

kv_dtype="fp8_e4m3" (head dims 64, 128, 256): the K/V tiles are copied as e4m3 bytes (half
the bytes of bf16, still 16-byte cp.async) into STAGES staging buffers, and each tile is
widened once, exactly, into a bf16/f16 tile in shared memory before mma.sync (the sm_80 path on every arch; sm_89/sm_90 fp8
mma, which would skip the widening, is not used yet). K's per-head scale folds into the score
scale, V's into the output normalisation.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from ..dsl.program import Layer
from ..dsl.types import DType
from . import ops
from .abi import TENSOR_MAP_CTYPE, Arg, KernelABI, SharedLayout
from .attention import (SWIZZLED_HEAD_DIMS, TC_HEAD_DIMS, AttentionPlan, cache_args, check_attention_layer,
                        check_kv_dtype, check_specialisable, extra_args, folds, hook_context, output_args,
                        tile_page_entries)
from .block_mask import BlockMaskPlan, block_mask_split, mask_heads, needs_block_mask
from .distance_terms import distance_term
from .plan import CompileFn, env_switch, layer_key, spill_free
from .render import read_template, render
from .row import LoweringError

MODES = ("prefill", "decode")
DISTANCE_TABLE_BYTES = 8192   # the most shared memory a tile's distance table takes (two buffers: 16 KB)


def distance_table_shape(term, group: int, keys: int, rows: int) -> tuple[int, int] | None:
    """(heads, distances) of a tile's distance table for `rows` packed query rows (GROUP heads a
    position) and `keys` keys: the most distances a tile spans; None past DISTANCE_TABLE_BYTES."""
    shape = (group if term.heads else 1, keys + (rows - 1) // group + 1)
    return shape if 4 * shape[0] * shape[1] <= DISTANCE_TABLE_BYTES else None


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    wm: int        # warps along query rows
    wn: int        # warps along keys (each its own softmax state)
    mt: int        # m16 row tiles per warp
    bnw: int       # keys per warp per tile
    stages: int    # K/V shared-memory buffers
    min_blocks: int
    qreg: bool = True   # Q fragments in registers for the whole loop (else re-read from shared memory)
    ksub: int = 0       # keys per softmax step within a warp's bnw (0: all bnw at once)
    sunroll: int = 0    # unroll of the S = Q K^T loop over head-dim steps (0: 2 for 64-key steps, else full)

    @property
    def label(self) -> str:
        return (f"w{self.wm}x{self.wn}m{self.mt}n{self.bnw}s{self.stages}{'q' if self.qreg else ''}"
                f"{f'b{self.min_blocks}' if self.min_blocks > 2 else ''}"
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


def padded_dim(d: int) -> int:
    """A shared-memory tile's row (elements) for head dim d: whole 128-byte lines, as the
    swizzle needs (64, 128, 256 as they are; 80 and 96 take 128, 160 and 192 take 192)."""
    return -(-d // 64) * 64


def loader_lanes(hd: int, hdv: int) -> int:
    """Threads that load a K/V row of the padded kernels: its 16-byte chunks (K's or V's, the
    more), rounded up to a power of two so that a pass of the CTA covers whole rows."""
    return 1 << (max(hd, hdv) // 8 - 1).bit_length()


def tile_candidates(mode: str, head_dim: int, group: int, v_head_dim: int | None = None,
                    kv_dtype: str | None = None) -> list[TileConfig]:
    """Tile shapes to try, best first. Wider key tiles amortise the per-tile work (barrier,
    row maxima, rescale) but hold more score registers; the first that compiles without
    register spills for the block at hand is used (hooks such as soft-capping or ALiBi cost
    registers too). v_head_dim: the value head dim (None: head_dim); kv_dtype: the cache's
    storage (an e4m3 cache's decode shapes are their own: benchmarks/bench_decode_tiles.py --kv fp8)."""
    dv = v_head_dim or head_dim
    if dv != head_dim or head_dim not in SWIZZLED_HEAD_DIMS:
        return padded_candidates(mode, head_dim, dv, group)
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
    n16 = [TileConfig(wm=1, wn=4, mt=mt, bnw=16, stages=3, min_blocks=2, qreg=q) for q in (True, False)]
    if kv_dtype and head_dim == 128 and mt == 1 and fp8_wide_default():
        # (LAYERFORGE_FP8_DECODE_WIDE=1) e4m3 at D 128: 32 keys a warp (128-key tiles, 100 KB, 2 CTAs an SM)
        # amortise a tile's fixed work over twice the keys. H200, GQA 32/8 (bench_decode_tiles --kv fp8, graph us, n16 -> n32): 64 x 4096 178.2 ->
        # 167.7, 16 x 1024 24.4 -> 22.9, 64 x 512 38.3 -> 37.7, 8 x 4096 and 1 x 32768 within 0.3 %.
        return [TileConfig(wm=1, wn=4, mt=1, bnw=32, stages=3, min_blocks=2, qreg=True)] + n16
    return n16


def many_ctas_tile(head_dim: int, group: int, v_head_dim: int | None = None,
                   kv_dtype: str | None = None) -> TileConfig | None:
    """The decode tile for grids the default tile cannot hold in one wave (more CTAs, tokens x KV heads x row
    blocks, than SMs x its min_blocks), or None where no such tile was measured. Over an e4m3 cache at D 128 the
    default (128-key tiles, 2 CTAs an SM) runs 64 sequences' 512 CTAs in two waves; 2 warps of 16 keys, 4 stages, 4
    CTAs an SM (36 KB) holds them in one. bench_decode_tiles --kv fp8, graph us, default -> this tile: H200 64 x 4096
    143.8 -> 140.0 (1.76x -> 1.80x the bf16 decode), 64 x 512 34.4 -> 31.9; H100 64 x 4096 201.7 -> 200.0. Where the
    default fits one wave it loses (H200 16 x 1024 21.2 -> 31.6, 1 x 4096 16.2 -> 19.6), hence the runtime's
    choice by the grid (runtime/attention.PagedAttention). LAYERFORGE_DECODE_MANY=0 turns it off.
    A bf16 / f16 cache at D128 (on by default; LAYERFORGE_DECODE_MANY_BF16=0 turns it off): 2 warps of 16 keys, 3
    stages, 4 CTAs an SM beside the default's 4 warps, 2 an SM. H100, bench_decode_tiles --default-only (the module,
    graph us, off -> on): 64 x 512 62.8 -> 61.7, 48 x 2048 151.0 -> 149.7, 40 x 1024 76.1 -> 74.6, 64 x 4096 368.9 ->
    368.0; 32 x 4096 and 16 x 1024 unchanged (one wave: the default); its GPU tests and compute-sanitizer clean."""
    dv = v_head_dim or head_dim
    if head_dim != 128 or dv != 128 or group > 16 or not env_switch("LAYERFORGE_DECODE_MANY", True):
        return None
    if kv_dtype and fp8_wide_default():
        return TileConfig(wm=1, wn=2, mt=1, bnw=16, stages=4, min_blocks=4, qreg=True)
    if not kv_dtype and env_switch("LAYERFORGE_DECODE_MANY_BF16", True):
        return TileConfig(wm=1, wn=2, mt=1, bnw=16, stages=3, min_blocks=4, qreg=True)
    return None


def block_many_tile(layer: Layer, kv_dtype: str | None) -> TileConfig | None:
    """many_ctas_tile for an attention block's head dims and GQA group (None where it has none)."""
    spec = layer.function.outputs[0].arg
    return many_ctas_tile(int(spec.head_dim), int(spec.num_q_heads) // int(spec.num_kv_heads), int(spec.v_head_dim),
                          kv_dtype)


PADDED_PREFILL_SHARED = 100 * 1024   # the padded prefill tiles' shared memory at most (the 128 tiles': 96 KB)


def padded_candidates(mode: str, hd: int, hdv: int, group: int) -> list[TileConfig]:
    """Tile shapes for the padded kernels (a head dim but 64/128/256, or a value dim of its own),
    best first, the last the safest. Registers a thread holds across the key loop: O is
    MT * HDV / 2, a step's scores MT * KW / 2, Q in registers MT * HD / 4; the head dims the
    swizzle pads (80 -> 128, 160 -> 192) cost shared memory, which bounds the prefill tiles."""
    hdp, hdvp = padded_dim(hd), padded_dim(hdv)
    if mode == "decode":   # as 64/128: one m16 row tile (two for groups past 16 where O fits), 64 keys
        mt = 1 if group <= 16 or hdv > 128 else 2
        stages, blocks = (3, 2) if max(hdp, hdvp) <= 128 else (2, 1)
        return [TileConfig(wm=1, wn=4, mt=mt, bnw=16, stages=stages, min_blocks=blocks, qreg=q) for q in (True, False)]
    out = []
    # (row tiles, keys, keys a softmax step, S unroll, Q in registers), widest first
    for mt, bnw, ksub, unroll, qreg in ((2, 64, 0, 0, True), (2, 64, 0, 0, False), (2, 64, 0, 1, False),
                                        (2, 64, 32, 0, False), (2, 32, 0, 0, False), (1, 64, 0, 0, False),
                                        (1, 32, 0, 0, False), (1, 16, 0, 0, False)):
        regs = mt * hdv // 2 + mt * (ksub or bnw) // 2 + (mt * hd // 4 if qreg else 0)
        for stages in (3, 2):
            c = TileConfig(wm=4, wn=1, mt=mt, bnw=bnw, stages=stages, min_blocks=2, qreg=qreg, ksub=ksub,
                           sunroll=unroll)
            smem = 2 * c.rows * hdp + 2 * stages * c.keys * (hdp + hdvp)
            whole_passes = c.keys % (c.threads // loader_lanes(hd, hdv)) == 0
            # past 192 held registers a tile spills for sure (the compiles decide among the rest)
            if regs <= 192 and smem <= PADDED_PREFILL_SHARED and whole_passes:
                out.append(c)
                break
    # (empty only past 256, where the plan's checks say why): the smallest tile stands in
    return out or [TileConfig(wm=4, wn=1, mt=1, bnw=16, stages=2, min_blocks=2, qreg=False)]


@dataclass(frozen=True, kw_only=True)
class TCAttentionPlan(AttentionPlan):
    family: ClassVar[str] = "tc_attention"
    layer: Layer
    arch: str
    page_size: int = 16
    mode: str = "prefill"
    tiles: TileConfig | None = None   # None: the first of tile_candidates (plan_tc_attention chooses)
    kv_dtype: str | None = None       # "fp8_e4m3": e4m3 cache with per-head scales
    fp8_cvt: bool = False             # fp8 on sm_89+: e4m3 pairs widened by the hardware's cvt to f16, the products
    #                                   in f16 (bf16 q scaled into f16 by a power of two); see fp8_cvt_default
    fp8_raw: bool = False             # fp8 without fp8_cvt: e4m3 widened without the multiply (x 2^-120 in bf16, 2^-8
    #                                   in f16), the powers of two folded into q, P and the scales; see fp8_raw_default
    fp8_vcvt: bool = False            # fp8_raw on sm_89+ with V's pairs widened by the hardware's cvt (exact f16) and
    #                                   P V in f16: K's widening stays on the integer pipe, V's moves to the
    #                                   conversion unit; see fp8_vcvt_default
    fp8_kcvt: bool = False            # fp8_raw on sm_89+ the other way round: K's pairs by the hardware's cvt (no
    #                                   gather: a pair is two channels) and Q K^T in f16 (bf16 q as f16 times
    #                                   2^-qe), V by integer ops; see fp8_kcvt_default
    fp8_kwords: bool = False          # with fp8_kcvt: K's fragments as one 32-bit word a key and 16 channels (q's
    #                                   channel pairs permuted in shared memory to match); see fp8_kwords_default
    fold: bool = False                # no score hook, a positive constant scale: 2^(s scale2 - m) as one FFMA a score
    heads_first: bool = False         # decode: grid x walks (chunk, split, KV head), the KV head fastest (see
    #                                   heads_first_default)
    top_rows: bool = False            # decode: a CTA whose rows fit the m16 tile's first 8 (one token of <= 8 heads
    #                                   a KV head) skips rows 8-15's softmax, their P zeros (see top_rows_default)
    tma: bool = False                 # decode over an e4m3 cache (sm_90): whole K/V tiles as TMA boxes, each warp's
    #                                   lane 0 issuing its share, where the plan can take them (uses_tma; see
    #                                   decode_tma_default)
    mask_bits: bool = dataclasses.field(default_factory=lambda: tc_mask_bits_default())
    #                                   a mask whose per-score test reads tables at the key (packed documents' ids):
    #                                   the test made once a tile as bits, on the tiles the mask does not hold on whole
    #                                   (mask_split; LAYERFORGE_TC_MASK_BITS=0: per score, on every tile)
    many: bool = False                # decode: the plan of grids past one wave of the default tile (many_ctas_tile),
    #                                   the module's second decode kernel; a pack's "decode_many" entry. Not in the
    #                                   key: the tile's label tells the two apart

    def __post_init__(self):
        if self.heads_first and self.mode != "decode":
            raise ValueError("heads_first is a decode grid (prefill CTAs of one KV head share its K/V tiles in L2)")
        if self.top_rows and self.mode != "decode":
            raise ValueError("top_rows skips the second half of a decode tile's one m16 row tile")
        if self.many and self.mode != "decode":
            raise ValueError("many is a decode plan (the grids past one wave of the default decode tile)")
        if self.fp8_cvt and not fp8_cvt_applies(self.arch, self.kv_dtype):
            raise ValueError(f"fp8_cvt needs an fp8 cache on sm_89 or newer (kv_dtype {self.kv_dtype}, {self.arch})")
        if self.fp8_raw and (self.kv_dtype is None or self.fp8_cvt):
            raise ValueError("fp8_raw widens an fp8 cache's bytes with integer ops: it needs kv_dtype and not fp8_cvt")
        if self.fp8_vcvt and not (self.fp8_raw and fp8_cvt_applies(self.arch, self.kv_dtype)):
            raise ValueError(f"fp8_vcvt widens V by the hardware's cvt beside fp8_raw's K: it needs fp8_raw on sm_89 or "
                             f"newer ({self.arch}, fp8_raw {self.fp8_raw})")
        if self.fp8_kcvt and not (self.fp8_raw and not self.fp8_vcvt and fp8_cvt_applies(self.arch, self.kv_dtype)):
            raise ValueError(f"fp8_kcvt widens K by the hardware's cvt beside fp8_raw's V: it needs fp8_raw on sm_89 or "
                             f"newer and not fp8_vcvt (both is fp8_cvt) ({self.arch}, fp8_raw {self.fp8_raw})")
        if self.fp8_kwords and not self.fp8_kcvt:
            raise ValueError("fp8_kwords reads K's words for the hardware's cvt: it needs fp8_kcvt")

    @property
    def key(self) -> str:
        return layer_key(self.layer, f"p{self.page_size}", *self.kv_suffix, f"tc{self.mode}", self.config.label,
                         *(("cvt",) if self.fp8_cvt else ()),
                         *(("raw",) if self.fp8_raw else ()), *(("vcvt",) if self.fp8_vcvt else ()),
                         *(("kcvt",) if self.fp8_kcvt else ()), *(("kw",) if self.fp8_kwords else ()),
                         *(("f",) if self.fold else ()),
                         *(("hf",) if self.heads_first else ()), *(("t8",) if self.skips_top_rows else ()),
                         *(("tma",) if self.uses_tma else ()), *(("mb",) if self.mask_split else ()),
                         self.arch.replace("_", ""))

    @property
    def mask_split(self) -> bool:
        """With mask_bits, where the mask's per-score test reads a table at the key (codegen/mask_terms.py): each
        thread makes the test of its scores of a tile the mask does not hold on whole once, as bits, each key's table
        reads once for all its rows and each row's once. Without it the test is a select beside every score, its
        reads made on full tiles too."""
        return self.mask_bits and self.block_mask and block_mask_split(self.layer) is not None

    @property
    def uses_tma(self) -> bool:
        """tma where the plan can take it: a decode over an e4m3 cache on sm_90+ at head dim 64 or 128 (a K/V row
        one 128- or 64-byte swizzle row, the layout lf_st8 reads), tiles of whole pages or within one page (a tile's
        rows are boxes of min(PAGE, BN) >= 8 keys), no tile skipped by a mask's classes."""
        c = self.config
        box = min(self.page_size, c.keys)
        return (self.tma and self.mode == "decode" and self.kv_dtype is not None
                and int(self.arch.removeprefix("sm_").rstrip("af")) >= 90
                and int(self.spec.head_dim) in (64, 128)   # (an e4m3 cache's value dim is the head dim: supports)
                and (self.page_size % c.keys == 0 or c.keys % self.page_size == 0) and box >= 8
                and not hook_context(self.layer).get("tile_lines"))

    @property
    def tma_box(self) -> tuple[int, int]:
        """(keys, columns) of a TMA box of the caches (uses_tma): min(PAGE, BN) rows of one head's HD bytes."""
        return min(self.page_size, self.config.keys), int(self.spec.head_dim)

    @property
    def skips_top_rows(self) -> bool:
        """top_rows where the tile has it: one m16 row tile (WM = MT = 1; groups past 16 take two)."""
        return self.top_rows and self.config.wm == 1 and self.config.mt == 1

    @property
    def config(self) -> TileConfig:
        return self.tiles or tile_candidates(self.mode, int(self.spec.head_dim), self.group,
                                             int(self.spec.v_head_dim), self.kv_dtype)[0]

    @property
    def block_mask(self) -> bool:
        """The prefill kernel of a mask that reads tables at positions walks the key tiles a
        block-mask pre-pass lists (codegen/block_mask.py)."""
        return self.mode == "prefill" and needs_block_mask(self.layer)

    def block_mask_plan(self) -> BlockMaskPlan:
        """The pre-pass for this kernel's tiling."""
        return BlockMaskPlan(layer=self.layer, arch=self.arch, rows=self.config.rows, keys=self.config.keys)

    @property
    def distance_table(self) -> tuple[int, int] | None:
        """(heads, distances) of the prefill kernel's per-tile table of the score's distance term
        (codegen/distance_terms.py): one column per query head of a KV head where the term reads
        h, BN + (BM - 1) // GROUP + 1 distances (the most a tile spans); None without a term, or
        where the table would pass DISTANCE_TABLE_BYTES (many heads a KV head: MQA)."""
        term = distance_term(self.spec.score) if self.mode == "prefill" else None
        if term is None:
            return None
        return distance_table_shape(term, self.group, self.config.keys, self.config.rows)

    @property
    def page_entries(self) -> int:
        """Pages a key tile spans at most."""
        return tile_page_entries(self.config.keys, self.page_size)

    @property
    def shared_layout(self) -> SharedLayout:
        """Q, the K/V stages, and a ring of 2 * stages tiles' page-table entries (fp8: the K/V
        stages are e4m3, after the page entries). Rows of Q and K tiles are the head dim padded
        to whole 128-byte lines, V's the value dim (padded_dim)."""
        c, hd = self.config, int(self.spec.head_dim)
        hdp, hdvp = padded_dim(hd), padded_dim(int(self.spec.v_head_dim))
        rel = self.distance_table
        if self.kv_dtype:   # the warps' merge (WN > 1) reuses all of it: padded to its size
            bufs = (("sQ", 2 * c.rows * hd), ("sPg", 4 * 2 * c.stages * self.page_entries),
                    ("sK8", c.stages * c.keys * hd), ("sV8", c.stages * c.keys * hd),
                    *((("sRel", 2 * 4 * rel[0] * rel[1]),) if rel else ()))
            merge = 4 * (c.wn * c.rows * hd + 2 * c.wn * c.rows) if c.wn > 1 else 0
            # TMA: stages 1024-byte aligned (the swizzle reads address bits 7-9), the stages' mbarriers past the
            # merge's bytes (never written over while they are in use)
            align = 1024 if self.uses_tma else 128
            bars = (("bars", 8 * c.stages),) if self.uses_tma else ()
            return SharedLayout(bufs + (("pad", max(0, merge - SharedLayout(bufs, align=align).bytes)), *bars),
                                align=align)
        return SharedLayout((("sQ", 2 * c.rows * hdp), ("sK", 2 * c.stages * c.keys * hdp),
                             ("sV", 2 * c.stages * c.keys * hdvp), ("sPg", 4 * 2 * c.stages * self.page_entries),
                             *((("sRel", 2 * 4 * rel[0] * rel[1]),) if rel else ())))

    @property
    def shared_bytes(self) -> int:
        # (TMA: the kernel aligns its base up to 1024 bytes)
        return self.shared_layout.bytes + (1024 if self.uses_tma else 0)

    def main_abi(self) -> KernelABI:
        return chunked_abi(self, self.config.rows, self.config.threads, self.shared_bytes,
                           block_mask=self.block_mask, kv_dtype=self.kv_dtype, heads_first=self.heads_first,
                           tma=self.uses_tma)

    def describe(self) -> dict[str, Any]:
        c = self.config
        kv = {"kv_dtype": self.kv_dtype} if self.kv_dtype else {}
        return {**super().describe(), **kv, "mode": "decode_many" if self.many else self.mode,
                "tiles": {"rows": c.rows, "keys": c.keys, "warps": [c.wm, c.wn], "stages": c.stages}}

    def source(self) -> str:
        return _render(self)


def chunked_abi(plan: AttentionPlan, rows: int, threads: int, shared_bytes: int, *,
                block_mask: bool = False, kv_dtype: str | None = None, tma: bool = False,
                heads_first: bool = False, items: int = 1, queue: bool = False) -> KernelABI:
    """The main kernel of a plan over query chunks (this template's and attention_wgmma's): a CTA
    per (query chunk, block of `rows` packed rows, KV head x split). block_mask: it walks the
    lists of the block-mask pre-pass (runtime BlockMask); kv_dtype: the cache's storage (fp8);
    tma: TMA tensor maps of the caches last (k_map, v_map: [pages x PAGE, HKV x D] views).
    heads_first: grid x is (query chunk, split, KV head) with the KV head fastest, so that the CTAs
    running at once read every KV head of a token's cache rows, not one head of many sequences.
    items: row blocks a CTA takes (attention_wgmma's pairs: grid y is the row blocks / items, rounded up).
    queue: the CTAs take the grid's places from a work queue (attention_wgmma's persist): at most `sms` of them (the
    device's SMs, a problem size), with the grid's sizes as arguments (chunks, max_q_len) and the queue's counter
    (`work`: one int, zero between launches; the kernel sets it back)."""
    dims = tuple(Arg(n, "int", "dim") for n in ("max_pages", "num_pages", "num_seqs", "num_splits", "num_tokens"))
    if block_mask:
        dims += (Arg("bm_num", "const int* __restrict__", "input"), Arg("bm_idx", "const int* __restrict__", "input"),
                 Arg("bm_rows", "int", "dim"), Arg("bm_cols", "int", "dim"))
    args = (*cache_args(plan.layer.dtype, kv_dtype), Arg("cu_q", "const int* __restrict__", "input"),
            Arg("q_seq", "const int* __restrict__", "input"),
            Arg("q_pos_arr", "const int* __restrict__", "input", "q_pos"), *output_args(plan.layer.dtype), *dims,
            *extra_args(plan.layer))
    if tma:
        args += (Arg("k_map", TENSOR_MAP_CTYPE, "tmap", "k_map"), Arg("v_map", TENSOR_MAP_CTYPE, "tmap", "v_map"))
    # (query chunks, row blocks of the longest chunk, KV heads x splits)
    grid = ("chunks", f"cdiv(max_q_len * {plan.group}, {rows})", f"{int(plan.spec.num_kv_heads)} * num_splits")
    if items > 1:
        grid = (grid[0], f"cdiv({grid[1]}, {items})", grid[2])
    if queue:
        args += (Arg("chunks", "int", "dim"), Arg("max_q_len", "int", "dim"),
                 Arg("work", "int* __restrict__", "workspace"))
        return KernelABI(name=plan.kernel_name, args=args, grid=(f"min({' * '.join(grid)}, sms)", "1", "1"),
                         block=(threads,), shared_bytes=shared_bytes,
                         problem=("chunks", "max_q_len", "num_splits", "sms"))
    if heads_first:
        grid = (f"chunks * {int(plan.spec.num_kv_heads)} * num_splits", grid[1], "1")
    return KernelABI(name=plan.kernel_name, args=args, grid=grid, block=(threads,), shared_bytes=shared_bytes,
                     problem=("chunks", "max_q_len", "num_splits"))


def supports(head_dim: int, v_head_dim: int, kv_dtype: str | None = None) -> bool:
    """Whether this kernel has a specialisation for these head dims (q/k, value) and cache:
    multiples of 16 from 32 to 256 over a bf16/f16 cache; 64, 128, 256 equal to the value
    dim over an fp8 one (its staging tiles assume whole 128-byte rows)."""
    if kv_dtype:
        return head_dim == v_head_dim and head_dim in SWIZZLED_HEAD_DIMS
    return head_dim in TC_HEAD_DIMS and v_head_dim in TC_HEAD_DIMS


def pick_mode(max_q_len: int, group: int) -> str:
    """The tile shape for a call whose longest query chunk has `max_q_len` tokens: decode (one
    m16 row tile, warps along keys) while a chunk's rows (tokens x grouped heads) fit in one
    m16 tile, prefill past that."""
    return "prefill" if max_q_len * group > 16 else "decode"


@functools.lru_cache(maxsize=128)
def _render(plan: TCAttentionPlan) -> str:
    spec = plan.spec
    dtype = plan.layer.dtype
    hd = check_specialisable(plan.layer, "tensor-core attention", head_dims=TC_HEAD_DIMS, value_dim=True)
    hdv = int(spec.v_head_dim)
    if not supports(hd, hdv, plan.kv_dtype):   # the e4m3 staging tiles assume whole 128-byte rows
        raise LoweringError(f"{plan.layer.name}: tensor-core attention over an {plan.kv_dtype} cache takes head "
                            f"dims 64, 128, 256 equal to the value dim, not head dim {hd} (value dim {hdv}); "
                            f"the CUDA-core kernel (kernel='simt') reads it at other head dims equal to the value dim")
    padded = hdv != hd or hd not in SWIZZLED_HEAD_DIMS
    c = plan.config
    rel = plan.distance_table
    kw = c.ksub or c.bnw
    # a warp's key slice starts at k0 + kw0, a multiple of KW's lowest power of two: the mask's kv_pos // 2^j and
    # % 2^j split over it (lf_mask_kt)
    ctx = hook_context(plan.layer, distance_table=rel is not None, key_tile=kw & -kw)
    if plan.block_mask:   # the pre-pass classifies the tiles
        ctx.update(tile_lines=None, tile_true=None, tile_false=None)
    if c.wn > 1:   # the warps' partial results are merged in the Q and K/V buffers
        need = 4 * (c.wn * c.rows * hdv + 2 * c.wn * c.rows)
        assert need <= plan.shared_bytes, (need, c)
    return render(
        "cuda/attention_tc.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name, plan_key=plan.key,
        signature=plan.abi.signature, merge_signature=plan.kernels[1].signature, smem=plan.shared_layout.offsets,
        common=read_template("cuda/common.cuh"), T=ops.STORAGE_TYPE[dtype],
        MMA_T="bf16" if dtype is DType.bf16 and not plan.fp8_cvt else "f16", FP8_CVT=plan.fp8_cvt, FP8_RAW=plan.fp8_raw,
        FP8_VCVT=plan.fp8_vcvt, FP8_KCVT=plan.fp8_kcvt, FP8_KWORDS=plan.fp8_kwords,
        FOLD=plan.fold and folds(ctx), HEADS_FIRST=plan.heads_first, TOP_ROWS=plan.skips_top_rows,
        MASK_BITS=plan.mask_split, KEEPW=((c.ksub or c.bnw) // 4 + 31) // 32,
        TMA=plan.uses_tma, BOXR=plan.tma_box[0], wgmma_ops=(),
        EARLY_PAGES=not plan.block_mask and not ctx.get("lows"), HD=hd, HQ=int(spec.num_q_heads), padded=padded,
        HDV=hdv, HDP=padded_dim(hd), HDVP=padded_dim(hdv), CPRL=loader_lanes(hd, hdv),
        HKV=int(spec.num_kv_heads), GROUP=plan.group, PAGE=plan.page_size, NPG=plan.page_entries, WM=c.wm, WN=c.wn, MT=c.mt,
        BNW=c.bnw, KW=c.ksub or c.bnw, SUNROLL=c.sunroll or (2 if (c.ksub or c.bnw) >= 64 else None), STAGES=c.stages, MIN_BLOCKS=c.min_blocks, QREG=c.qreg,
        block_mask=plan.block_mask, BM_HEADS=mask_heads(plan.layer) if plan.block_mask else 1,
        RELH=rel[0] if rel else None, RELW=rel[1] if rel else None,
        fp8=plan.kv_dtype is not None, KT="unsigned char" if plan.kv_dtype else ops.STORAGE_TYPE[dtype],
        SWZ="lf_st8" if plan.kv_dtype else "lf_swz", fp8_helpers=read_template("cuda/fp8.cuh") if plan.kv_dtype else "",
        **ctx)


def tc_mask_bits_default() -> bool:
    """Whether the tensor-core kernels test a mask reading tables at the key once a tile as bits
    (TCAttentionPlan.mask_bits); LAYERFORGE_TC_MASK_BITS=0 tests it beside every score."""
    return env_switch("LAYERFORGE_TC_MASK_BITS", True)


def fp8_wide_default() -> bool:
    """Whether e4m3 decode plans at D128 try 128-key tiles first (tile_candidates): measured faster on an H200
    (64 x 4096 178.2 -> 167.7 us; with K by the cvt as words and the top rows skipped 146.8, benchmarks/NOTES.md);
    LAYERFORGE_FP8_DECODE_WIDE=0 turns it off."""
    return env_switch("LAYERFORGE_FP8_DECODE_WIDE", True)


def fp8_cvt_applies(arch: str, kv_dtype: str | None) -> bool:
    """The hardware e4m3 conversion (cvt.rn.f16x2.e4m3x2) exists from sm_89."""
    return kv_dtype is not None and int(arch.removeprefix("sm_").rstrip("af")) >= 89


def fold_default() -> bool:
    """Whether tensor-core plans fold the scale into the exponent's FFMA (TCAttentionPlan.fold) where it
    applies (attention_wgmma.folds). Off: measured no faster on an H200 (the document mask's kernel 0.509 ->
    0.506 ms, benchmarks/NOTES.md); LAYERFORGE_TC_FOLD=1 turns it on."""
    return env_switch("LAYERFORGE_TC_FOLD", False)


def fp8_cvt_default() -> bool:
    """Whether plans over an fp8 cache on sm_89+ take TCAttentionPlan.fp8_cvt: off until measured on a GPU
    (benchmarks/NOTES.md, its prediction); LAYERFORGE_FP8_KV_CVT=1 turns it on, for the runtime's plans and
    the pack build alike."""
    return env_switch("LAYERFORGE_FP8_KV_CVT", False)


def fp8_raw_default() -> bool:
    """Whether plans over an fp8 cache (without fp8_cvt) take TCAttentionPlan.fp8_raw
    (LAYERFORGE_FP8_KV_RAW=0 / 1)."""
    return env_switch("LAYERFORGE_FP8_KV_RAW", True)


def fp8_vcvt_default() -> bool:
    """Whether fp8_raw plans on sm_89+ take TCAttentionPlan.fp8_vcvt (V by the hardware's cvt, P V in f16): off
    until measured on a GPU (benchmarks/NOTES.md); LAYERFORGE_FP8_KV_VCVT=1 turns it on."""
    return env_switch("LAYERFORGE_FP8_KV_VCVT", False)


def fp8_kcvt_default() -> bool:
    """Whether fp8_raw plans on sm_89+ (without fp8_vcvt) take TCAttentionPlan.fp8_kcvt (K by the hardware's cvt,
    Q K^T in f16): on for decode, measured on an H200 with fp8_kwords and top_rows (the e4m3 decode at 64 x 4096 168.1
    -> 146.8 us, benchmarks/NOTES.md; prefill over an e4m3 cache keeps the integer widening, not measured with it);
    LAYERFORGE_FP8_KV_KCVT=0 turns it off; plan_tc_attention(..., fp8_kcvt=True) asks for it in prefill."""
    return env_switch("LAYERFORGE_FP8_KV_KCVT", True)


def fp8_kwords_default() -> bool:
    """Whether fp8_kcvt plans take TCAttentionPlan.fp8_kwords (K's fragments as 32-bit words): on, measured with
    fp8_kcvt (benchmarks/NOTES.md); LAYERFORGE_FP8_KV_KWORDS=0 turns it off."""
    return env_switch("LAYERFORGE_FP8_KV_KWORDS", True)


def top_rows_default() -> bool:
    """Whether decode plans take TCAttentionPlan.top_rows (rows 8-15 of the row tile skipped where no query row
    lies there): on, measured on an H200 (bf16 decode 0.3-1.5 % faster, benchmarks/NOTES.md);
    LAYERFORGE_DECODE_TOP_ROWS=0 turns it off."""
    return env_switch("LAYERFORGE_DECODE_TOP_ROWS", True)


def decode_tma_default() -> bool:
    """Whether decode plans over an e4m3 cache take TCAttentionPlan.tma (whole K/V tiles as TMA boxes from each warp's
    lane 0, where uses_tma says the plan can): off until measured on a GPU (benchmarks/NOTES.md, its prediction);
    LAYERFORGE_DECODE_TMA=1 turns it on, for the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_DECODE_TMA", False)


def heads_first_default() -> bool:
    """Whether decode plans take TCAttentionPlan.heads_first (LAYERFORGE_DECODE_HEADS_FIRST=0 / 1)."""
    return env_switch("LAYERFORGE_DECODE_HEADS_FIRST", True)


def plan_tc_attention(layer: Layer, arch: str, *, page_size: int = 16, mode: str = "prefill",
                      tiles: TileConfig | None = None, compile_fn: CompileFn | None = None,
                      kv_dtype: str | None = None, fp8_cvt: bool = False, fold: bool = False,
                      heads_first: bool = False, fp8_raw: bool | None = None,
                      fp8_vcvt: bool | None = None, fp8_kcvt: bool | None = None,
                      fp8_kwords: bool | None = None, top_rows: bool | None = None,
                      tma: bool | None = None, many: bool = False) -> TCAttentionPlan:
    """The tensor-core plan of an attention block. Without `tiles`, the first of
    `tile_candidates` that compiles without register spills (through `compile_fn`; without
    one, or when it cannot compile, the last candidate, which is the safest). kv_dtype
    "fp8_e4m3": over an e4m3 cache with per-head scales; fp8_cvt: with the hardware's e4m3
    conversion and f16 products where the arch has it (sm_89+; ignored elsewhere); fp8_raw / fp8_vcvt / fp8_kcvt
    (None: their defaults): K and V widened by integer ops, or V or K by the hardware's cvt (sm_89+); heads_first: the
    decode grid's order (TCAttentionPlan.heads_first; ignored for prefill); top_rows, tma (None: their defaults):
    TCAttentionPlan's, decode only (tma over an e4m3 cache, where the plan can take it: uses_tma); many: the decode plan
    of grids past one wave of the default tile, on many_ctas_tile (a ValueError where the block has none; `tiles`
    must be None), the other options as the decode's."""
    heads_first = heads_first and mode == "decode"
    top_rows = mode == "decode" and (top_rows_default() if top_rows is None else top_rows)
    tma = mode == "decode" and kv_dtype is not None and (decode_tma_default() if tma is None else tma)
    fp8_cvt = fp8_cvt and fp8_cvt_applies(arch, kv_dtype)
    fp8_raw = kv_dtype is not None and not fp8_cvt and (fp8_raw_default() if fp8_raw is None else fp8_raw)
    fp8_vcvt = fp8_raw and fp8_cvt_applies(arch, kv_dtype) and (fp8_vcvt_default() if fp8_vcvt is None else fp8_vcvt)
    fp8_kcvt = (fp8_raw and not fp8_vcvt and fp8_cvt_applies(arch, kv_dtype)
                and (fp8_kcvt_default() and mode == "decode" if fp8_kcvt is None else fp8_kcvt))   # (measured for decode)
    fp8_kwords = fp8_kcvt and (fp8_kwords_default() if fp8_kwords is None else fp8_kwords)
    fold = fold and folds(hook_context(layer))   # (only where it applies: one key for the plain kernel)
    check_attention_layer(layer, page_size)
    check_kv_dtype(layer, kv_dtype)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    major = int(arch.removeprefix("sm_").rstrip("af")) // 10
    if major < 8:
        raise LoweringError(f"{layer.name}: tensor-core attention needs sm_80 or newer, not {arch}")
    options = dict(layer=layer, arch=arch, page_size=page_size, mode=mode, kv_dtype=kv_dtype, fp8_cvt=fp8_cvt,
                   fp8_raw=fp8_raw, fp8_vcvt=fp8_vcvt, fp8_kcvt=fp8_kcvt, fp8_kwords=fp8_kwords, fold=fold,
                   heads_first=heads_first, top_rows=top_rows, tma=tma)
    limit = ops.shared_limit(arch)
    if many or tiles is not None:
        tile = block_many_tile(layer, kv_dtype) if many else tiles
        if many and (mode != "decode" or tiles is not None or tile is None):
            raise ValueError(f"{layer.name}: no decode tile for grids past one wave here (mode {mode}, kv_dtype "
                             f"{kv_dtype}, tiles {tiles}): many_ctas_tile")
        plan = TCAttentionPlan(tiles=tile, many=many, **options)
        if plan.shared_bytes > limit:
            raise ValueError(f"{layer.name}: the {mode} tile {tile.label} takes {plan.shared_bytes} bytes of shared "
                             f"memory, past the {limit} a CTA has on {arch}")
        plan.source()
        return plan
    spec = layer.function.outputs[0].arg
    candidates = tile_candidates(mode, int(spec.head_dim), int(spec.num_q_heads) // int(spec.num_kv_heads),
                                 int(spec.v_head_dim), kv_dtype)
    # the candidates whose shared memory the arch holds, in order; the last of them is the fallback where none
    # compiles without spills. Where it holds none (sm_86 / sm_89 / sm_120: 99 KB a CTA), the same tiles with
    # fewer stages, then with half the key warps (wn), each as deep as fits
    plans = [p for p in (TCAttentionPlan(tiles=c, **options) for c in candidates) if p.shared_bytes <= limit]
    if not plans:
        shallow = [dataclasses.replace(c, wn=wn, stages=st) for c in candidates
                   for wn in sorted({c.wn, max(1, c.wn // 2)}, reverse=True)
                   for st in range(c.stages - (wn == c.wn), 1, -1)]
        plans = list({p.key: p for p in (TCAttentionPlan(tiles=c, **options) for c in shallow)
                      if p.shared_bytes <= limit}.values())
    if not plans:
        raise LoweringError(f"{layer.name}: no tensor-core {mode} tile fits the {limit} bytes of shared memory a CTA "
                            f"has on {arch}")
    for plan in plans:
        plan.source()
        if plan is plans[-1] or spill_free(plan, compile_fn):
            return plan
    raise AssertionError("unreachable")
