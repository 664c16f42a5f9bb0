"""Attention blocks -> a Hopper (sm_90a) prefill kernel: warpgroup MMAs, a producer warpgroup
and an mbarrier ring (templates/cuda/attention_wgmma.cu.jinja, on the toolkit in
templates/cuda/hopper.cuh.jinja).

    plan = plan_wgmma_attention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"),
                                page_size=16)
    plan.key -> 'llama_attn_d128_hkv8_hq32_bf16_p16_wgprefill_n128s3_sm90a'

Same ABI, hooks and split-KV merge as the tensor-core prefill kernel (codegen/attention_tc.py),
so the runtime launches either the same way. Compiled for sm_90a only (wgmma, setmaxnreg).

As the tensor-core prefill, a mask that reads tables at positions (document ids) walks the
key-tile lists of the block-mask pre-pass (codegen/block_mask.py) over this kernel's tiling
(`block_mask_plan()`), the mask tested once a tile as bits (codegen/mask_terms.py) with its
key-side table reads staged in shared memory; `supports()` makes it such blocks' default where
the staging fits (documents at D128 on an H100: 1.20x the mma.sync kernel, 1.23x Flex).

The score's distance term (T5 buckets, relative-bias tables: codegen/distance_terms.py) is
tabulated per tile in shared memory by default, one table per consumer warpgroup
(`distance_table=True`; at D128 the planner then takes n128s2, as 3 stages of 128 keys leave
no room for the tables). Measured on an H200 (B4 H32/8 S4096 D128 bf16, benchmarks/NOTES.md):
T5 1.76 ms with tables against 2.95 per score (1.67x), relative bias 1.76 against 3.06
(1.74x). `distance_table=False` keeps the per-score kernel (the term computed for every
score). Blocks without a distance term get the same plan either way.

WGTileConfig.overlap (off by default: not yet measured) runs each consumer's softmax under its
own P V as well: S of tile t and P V of tile t - 1 go out as two wgmma groups in one turn, P
into the other of two buffers, O rescaled after. plan_wgmma_attention(overlap=True) takes it
for the chosen tile shape where it compiles without spills (a distance term computed per
score spills: those blocks keep the plain schedule); the runtime asks for it under
LAYERFORGE_WGMMA_OVERLAP=1 (runtime/attention.py).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from ..dsl.program import Layer
from ..dsl.types import DType
from . import ops
from .abi import KernelABI, SharedLayout
from .attention import (AttentionPlan, check_attention_layer, check_specialisable, folds, hook_context,
                        tile_page_entries)
from .attention_tc import chunked_abi, distance_table_shape
from .block_mask import BlockMaskPlan, block_mask_split, mask_heads, needs_block_mask
from .distance_terms import distance_term
from .mask_tiles import local_tiles
from .plan import CompileFn, env_int, env_switch, layer_key, spill_free
from .render import read_template, render
from .row import LoweringError

ARCH = "sm_90a"
CONSUMERS = 2   # consumer warpgroups of 64 query rows, taking turns at the tensor cores (the template's NCW)
SHARED_LIMIT = 232448   # dynamic shared memory of a CTA on sm_90 (227 KB)
# WGTileConfig.lpt's launch order (templates/cuda/launch_order.jinja): sections of (chunk, z) pairs of at least
# LPT_CTAS CTAs (about a wave of an H100 / H200's 132 SMs, one CTA an SM) whose K / V rows fit in LPT_L2 bytes (of the
# 50 MB L2), each run level by level; launches whose X pairs hold that many keep the default order
LPT_CTAS = 128
LPT_L2 = 32 << 20


@dataclass(frozen=True, kw_only=True)
class WGTileConfig:
    bn: int               # keys per tile (the N of S = Q K^T)
    stages: int           # K/V shared-memory buffers (the mbarrier ring)
    producer_regs: int = 0       # 0: 40 with two consumers (56 / 224 spilled the T5 block's consumers; 24 / 240 the
    consumer_regs: int = 0       # producer), 32 / 160 with three (the SM's 64K registers over 512 threads; 24 spilled)
    overlap: bool = False        # the softmax under the consumer's own P V too (the template's OVERLAP)
    swizzle: int = 0             # shared tiles' swizzle bytes; 0: the widest whose column block divides both head dims
    tma: bool = False            # full K/V tiles by TMA boxes of a page run (WGMMAAttentionPlan.tma says where it applies)
    rope_step: bool = False      # RoPE on q: one precise sincos a thread, the rows after it by an exact step rotation
    fold: bool = False           # no score hook, a positive constant scale: 2^(s scale2 - m) as one FFMA a score
    kv_rings: bool = False       # (with TMA) K and V in rings of their own: K's stage free once S is in, V's after P V
    k_stages: int = 0            # with kv_rings: K's ring depth (0: stages)
    consumers: int = CONSUMERS   # consumer warpgroups of 64 query rows taking turns at the tensor cores (2 or 3)
    lpt: int = 0                 # >0: the launch order over sections of at least lpt CTAs (launch_order.jinja)
    rope_batch: bool = False     # with rope_step: a thread's q pairs all read before any is rotated and stored
    pairs: bool = False          # a CTA takes two row blocks of its chunk, the longer then the shorter (the
                                 # template's ITEMS = 2): half the CTAs, each with a causal block's mean work
    persist: bool = False        # one CTA an SM taking row blocks from a work queue in launch order until none is
                                 # left (the template's PERSIST): each next block's K / V loads go out under this one
    q_next: bool = False         # (with persist) each next row block's Q copies issued under this one's last P V and
                                 # epilogue, once its S products are in (the template's Q_NEXT)
    poly: int = 0                # the first `poly` of a row's BN / 8 key groups take 2^x on the FMA pipe (a
                                 # polynomial), the rest on the SFU (the template's POLY; 0: all on the SFU)
    late_pack: bool = False      # (with overlap) one P buffer: the softmax leaves p in S's registers and packs it
                                 # once the previous P V is done (the template's LATE_PACK): overlap in fewer registers
    chains: int = 1              # a row's max and sum over this many partial values joined as a tree (1, 2, 4, 8;
                                 # the template's CHAINS): dependent chains of BN / 4 / chains steps, not BN / 4
    staged_out: bool = False     # O out through the warpgroup's rows of Q's buffer in 16-byte stores, a row's chunks
                                 # by consecutive threads (the template's STAGED_OUT), not 4-byte stores from the
                                 # fragments; not with q_next (the next row block's Q copies land in that buffer)
    rope_regs: bool = False      # (with rope_batch, where it rotates in 16-byte runs) q's rotated columns read from
                                 # global memory into registers, rotated there and stored (the template's ROPE_REGS):
                                 # no copy wait, barrier or shared-memory read before the rotation; not with q_next
    tile_branch: bool = False    # (with overlap, a mask with full tiles) the full-tile branch around both rows'
                                 # softmax, not in each row (the template's TILE_BRANCH): the P V's wait stays after
                                 # the second row's exponentials (ptxas puts it early in its block); the softmax
                                 # rendered twice

    def __post_init__(self):
        if self.consumers not in (2, 3):
            raise ValueError(f"consumers is 2 or 3 warpgroups, not {self.consumers}")
        if not self.producer_regs:
            object.__setattr__(self, "producer_regs", self.default_regs[0])
        if not self.consumer_regs:
            object.__setattr__(self, "consumer_regs", self.default_regs[1])
        if self.k_stages and (self.k_stages < 2 or not self.kv_rings):
            raise ValueError(f"k_stages ({self.k_stages}) is K's own ring depth, >= 2, with kv_rings")
        if self.lpt < 0:
            raise ValueError(f"lpt is a section's CTAs (0: the default launch order), not {self.lpt}")
        if self.persist and self.pairs:
            raise ValueError("persist and pairs are two ways of giving a CTA several row blocks: take one")
        if self.q_next and not self.persist:
            raise ValueError("q_next loads the work queue's next row block's Q early: it needs persist")
        if self.late_pack and not self.overlap:
            raise ValueError("late_pack is a form of the overlap schedule: it needs overlap")
        if self.staged_out and self.q_next:
            raise ValueError("staged_out stages O in Q's buffer, where q_next copies the next row block's Q: take one")
        if self.tile_branch and not self.overlap:
            raise ValueError("tile_branch keeps the overlap schedule's P V wait after the softmax: it needs overlap")
        if self.rope_regs and (not self.rope_batch or self.q_next):
            raise ValueError("rope_regs is a form of rope_batch's rotation of the row block's own Q: it needs "
                             "rope_batch, and not q_next (which copies Q before the rotation)")
        if self.chains not in (1, 2, 4, 8):
            raise ValueError(f"chains is 1, 2, 4 or 8 partial values a row, not {self.chains}")
        if not 0 <= self.poly <= self.bn // 8:
            raise ValueError(f"poly is key groups of 8 of a {self.bn}-key tile, 0 .. {self.bn // 8}, not {self.poly}")
        if self.swizzle not in (0, 32, 64, 128):
            raise ValueError(f"swizzle must be 0 (native), 32, 64 or 128 bytes, not {self.swizzle}")
        # the SM's registers hold one CTA: 128 * producer + 128 * consumers * consumer
        if 128 * (self.producer_regs + self.consumers * self.consumer_regs) > 65536:
            raise ValueError(f"register budgets {self.producer_regs}/{self.consumer_regs} exceed the SM's 64K")

    @property
    def default_regs(self) -> tuple[int, int]:
        """The (producer, consumer) setmaxnreg budgets where none are given."""
        return (40, 232) if self.consumers == 2 else (32, 160)

    @property
    def label(self) -> str:
        regs = (self.producer_regs, self.consumer_regs)
        return (f"n{self.bn}s{self.stages}" + (f"c{self.consumers}" if self.consumers != CONSUMERS else "")
                + (f"g{regs[0]}x{regs[1]}" if regs != self.default_regs else "")
                + ("ov" if self.overlap else "") + ("z" if self.late_pack else "")
                + (f"w{self.swizzle}" if self.swizzle else "")
                + ("t" if self.tma else "") + ("r" if self.rope_step else "") + ("f" if self.fold else "")
                + ("kv" if self.kv_rings else "") + (f"k{self.k_stages}" if self.k_stages else "")
                + (("l" if self.lpt == LPT_CTAS else f"l{self.lpt}") if self.lpt else "") + ("p" if self.pairs else "")
                + ("b" if self.rope_batch else "") + ("q" if self.persist else "") + ("e" if self.q_next else "")
                + (f"x{self.poly}" if self.poly else "") + (f"y{self.chains}" if self.chains > 1 else "")
                + ("u" if self.staged_out else "") + ("i" if self.rope_regs else "")
                + ("j" if self.tile_branch else ""))

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)

    @property
    def rows(self) -> int:
        return 64 * self.consumers

    @property
    def keys(self) -> int:
        return self.bn


HEAD_DIMS = tuple(range(32, 257, 16))   # q/k and value head dims the kernel specialises (multiples of 16)
# where it is the sm_90 default prefill (supports()): every dim it specialises, value dims of their
# own included; measured 1.19-1.69 x the mma.sync kernel at 80 / 96 / 160 / 192 (H200, benchmarks/NOTES.md)
DEFAULT_HEAD_DIMS = HEAD_DIMS


def native_swizzle(head_dim: int, v_head_dim: int) -> int:
    """The widest swizzle (bytes) whose column block (swizzle / 2 elements) divides both head
    dims: 128 for multiples of 64, 64 for 96 / 160, 32 for 80 / 112 / 144 / 176 / ..."""
    return next(sw for sw in (128, 64, 32) if head_dim % (sw // 2) == 0 and v_head_dim % (sw // 2) == 0)


def tile_dims(head_dim: int, v_head_dim: int, swizzle: int = 0) -> tuple[int, int, int]:
    """(swizzle, HDP, HDVP): the shared tiles' swizzle and their Q/K and V rows in elements, the
    head dims rounded up to whole column blocks (equal to them at the native swizzle)."""
    sw = swizzle or native_swizzle(head_dim, v_head_dim)
    e = sw // 2
    return sw, -(-head_dim // e) * e, -(-v_head_dim // e) * e


def _stage_bytes(bn: int, hdp: int, hdvp: int) -> int:
    return 2 * bn * (hdp + hdvp)


def tile_candidates(head_dim: int, v_head_dim: int | None = None) -> list[WGTileConfig]:
    """Tile shapes, best first. Shared memory bounds BN x STAGES: Q (128 rows) plus STAGES
    K and V tiles must fit in 227 KB (with a distance table too: the planner skips those that
    do not); registers bound BN: S (BN / 2), P (BN / 4) and O (HDV / 2) per consumer thread."""
    dv = v_head_dim or head_dim
    if dv == head_dim and head_dim == 256:
        return [WGTileConfig(bn=64, stages=2)]
    if dv == head_dim and head_dim == 128:   # 3 stages of 128 keys: 225 KB; 2 stages leave the consumers waiting on each tile
        return [WGTileConfig(bn=128, stages=3), WGTileConfig(bn=128, stages=2), WGTileConfig(bn=64, stages=3)]
    if dv == head_dim and head_dim == 64:
        # three consumers first (192 rows a CTA; they take the plain schedule: the overlap one spills there), measured
        # on an H200 (benchmarks/NOTES.md): gpt2 0.373 -> 0.356 ms, llama GQA 0.772 -> 0.660, mistral 0.773 -> 0.670
        return [WGTileConfig(bn=128, stages=3, consumers=3), WGTileConfig(bn=128, stages=3), WGTileConfig(bn=64, stages=4)]
    # other dims: as many stages as fit (up to 3 of 128 keys, 4 of 64), 128-key tiles first where
    # O, S and P leave the consumers' registers room (O + S + P <= 176 a thread: D128's 160 runs
    # spill-free, D256's 224 at 128 keys does not), 2 stages of 128 keys last
    _, hdp, hdvp = tile_dims(head_dim, dv)
    room = SHARED_LIMIT - 1024 - 2 * 128 * hdp - 256
    out, late = [], []
    for bn, most in ((128, 3), (64, 4)):
        if hdvp // 2 + 3 * bn // 4 > 176:
            continue
        stages = min(most, room // _stage_bytes(bn, hdp, hdvp))
        if stages >= 3:
            out.append(WGTileConfig(bn=bn, stages=stages))
        elif stages == 2:
            late.append(WGTileConfig(bn=bn, stages=2))
    return out + late or [WGTileConfig(bn=64, stages=2)]


@dataclass(frozen=True, kw_only=True)
class WGMMAAttentionPlan(AttentionPlan):
    family: ClassVar[str] = "wgmma_attention"
    layer: Layer
    arch: str = ARCH
    page_size: int = 16
    tiles: WGTileConfig | None = None   # None: the first of tile_candidates
    distance_table: bool = True         # tabulate the score's distance term per tile (rel_table); False: per score
    mask_bits: bool = True              # a mask's table reads once per key and row, its test as bits (mask_split)
    stage_keys: bool = False            # with mask_split: its key terms made once a tile into shared memory
    key_split: bool = True              # the mask's kv_pos // 2^j, % 2^j split over the key tile (lf_mask_kt), and
    #                                     |x| <= c as an unsigned compare (False: the kernel as before both)

    @property
    def key(self) -> str:
        return layer_key(self.layer, f"p{self.page_size}", "wgprefill", self.config.label,
                         *(("dt",) if self.rel_table else ()), *(("mb",) if self.mask_split else ()),
                         *(("ks",) if self.key_terms_staged else ()), *(() if self.key_split else ("nosplit",)),
                         self.arch.replace("_", ""))

    @property
    def key_term_slots(self) -> tuple[int, ...]:
        """With mask_split: the bytes of each key term's slot in a consumer warpgroup's shared buffer (a tile's BN
        values, 16-byte aligned); () without."""
        split = block_mask_split(self.layer) if self.mask_split else None
        if split is None:
            return ()
        size = {"bool": 1, "int": 4, "float": 4, "long long": 8}
        return tuple(-(-self.config.keys * size[ops.C_TYPE[n.dtype]] // 16) * 16 for n in split.keys)

    @property
    def key_terms_staged(self) -> bool:
        """With stage_keys and mask_split, where shared memory holds it beside the stages: each consumer warpgroup makes
        a tile's key terms once, a key a thread, into a buffer of its own (sKeyT: [NCW][key_term_slots]) that its
        threads read; else each thread makes the terms of its keys itself. The runtime's default (key_stage_default;
        LAYERFORGE_WGMMA_KEY_STAGE=0 turns it off)."""
        return self.stage_keys and bool(self.key_term_slots) and self._layout(True).bytes + 1024 <= SHARED_LIMIT

    @property
    def mask_split(self) -> bool:
        """With mask_bits, where the mask's per-score test reads a table at the key (codegen/mask_terms.py: packed
        documents' ids): each consumer thread makes the test of its scores of a tile once, as bits, while the tile's
        MMAs run, each key's table reads once for both its rows and each row's once; False: the test per score."""
        return self.mask_bits and block_mask_split(self.layer) is not None

    @property
    def mode(self) -> str:
        return "prefill"

    @property
    def config(self) -> WGTileConfig:
        return self.tiles or tile_candidates(int(self.spec.head_dim), int(self.spec.v_head_dim))[0]

    @property
    def tma(self) -> bool:
        """Whether full K/V tiles arrive by TMA (config.tma asked for it): boxes of min(PAGE, BN) >= 8
        keys (whole swizzle atoms) x one column block of the tile's swizzle (64 / 32 / 16 columns;
        rows padded to a wider swizzle take whole blocks), that a page holds whole (PAGE and BN
        multiples of one another, so a warp's lanes cover the page runs evenly)."""
        c = self.config
        box = min(self.page_size, c.keys)
        return (c.tma and box >= 8 and (self.page_size % c.keys == 0 or c.keys % self.page_size == 0)
                and 32 % (c.keys // box) == 0)

    @property
    def kv_rings(self) -> bool:
        """Whether K and V take rings of their own (config.kv_rings asked for it, where tiles arrive by TMA)."""
        return self.config.kv_rings and self.tma

    @property
    def k_stages(self) -> int:
        """K's stages: config.k_stages where K and V have rings of their own, else the tile's stages."""
        return (self.config.k_stages or self.config.stages) if self.kv_rings else self.config.stages

    @property
    def tma_box(self) -> tuple[int, int]:
        """(rows, columns) of the K / V maps' box: min(PAGE, BN) keys x a column block (swizzle / 2)."""
        return min(self.page_size, self.config.keys), self.dims[0] // 2

    @property
    def dims(self) -> tuple[int, int, int]:
        """(swizzle bytes, HDP, HDVP): the shared tiles' layout (tile_dims)."""
        return tile_dims(int(self.spec.head_dim), int(self.spec.v_head_dim), self.config.swizzle)

    @property
    def block_mask(self) -> bool:
        """A mask that reads tables at positions: the kernel walks the key tiles a block-mask
        pre-pass lists (codegen/block_mask.py)."""
        return needs_block_mask(self.layer)

    def block_mask_plan(self) -> BlockMaskPlan:
        """The pre-pass for this kernel's tiling (BM = 128 rows, BN keys)."""
        return BlockMaskPlan(layer=self.layer, arch=self.arch, rows=self.config.rows, keys=self.config.keys)

    @property
    def rel_table(self) -> tuple[int, int] | None:
        """With distance_table: (heads, distances) of each consumer warpgroup's per-tile table of
        the score's distance term: one column per query head of the KV head where the term reads
        h, BN + 63 // GROUP + 1 distances (the most a tile spans over a warpgroup's 64 rows).
        None with distance_table=False, without a term, or where a table would pass
        DISTANCE_TABLE_BYTES (then the term is computed per score)."""
        term = distance_term(self.spec.score) if self.distance_table else None
        if term is None:
            return None
        return distance_table_shape(term, self.group, self.config.keys, 64)   # per consumer: 64 rows

    @property
    def page_entries(self) -> int:
        """Pages a key tile spans at most."""
        return tile_page_entries(self.config.keys, self.page_size)

    @property
    def shared_layout(self) -> SharedLayout:
        """Q, the K and V stages (each 1024-byte aligned: the swizzle reads address bits 7-9),
        then the full / empty mbarriers, the distance tables (two buffers per consumer) and the
        mask's key terms (key_terms_staged: a buffer per consumer)."""
        return self._layout(self.key_terms_staged)

    def _layout(self, key_terms: bool) -> SharedLayout:
        c = self.config
        _, hdp, hdvp = self.dims
        rel = self.rel_table
        ks = self.k_stages
        return SharedLayout((("sQ", 2 * c.rows * hdp), ("sK", 2 * ks * c.keys * hdp),
                             ("sV", 2 * c.stages * c.keys * hdvp),
                             ("bars", 8 * 2 * (ks + (c.stages if self.kv_rings else 0))
                              + (8 * 4 + 4 * 2 if c.persist else 0)),   # the work queue's two slots and barriers
                             *((("sRel", c.consumers * 2 * 4 * rel[0] * rel[1]),) if rel else ()),
                             *((("sKeyT", c.consumers * sum(self.key_term_slots)),) if key_terms else ())), align=1024)

    @property
    def shared_bytes(self) -> int:
        return self.shared_layout.bytes + 1024   # the kernel aligns its base up to 1024 bytes

    def main_abi(self) -> KernelABI:
        return chunked_abi(self, self.config.rows, self.config.threads, self.shared_bytes, block_mask=self.block_mask,
                           tma=self.tma, items=2 if self.config.pairs else 1, queue=self.config.persist)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**super().describe(), "mode": "prefill",
                "tiles": {"rows": c.rows, "keys": c.keys, "warpgroups": c.consumers + 1, "stages": c.stages,
                          **({"overlap": True} if c.overlap else {})}}

    def source(self) -> str:
        return _render(self)

    @property
    def tile_branch_serves(self) -> bool:
        """Whether the kernel branches on tiles the mask holds on whole (exact key bounds, the block mask's pre-pass or
        the mask's tile classifier): the branch tile_branch moves around both rows' softmax."""
        if self.block_mask:
            return True
        ctx = hook_context(self.layer)
        return bool(ctx.get("exact_mask") or ctx.get("tile_lines"))

    @property
    def staged_out_serves(self) -> bool:
        """Whether O can go out through Q's buffer (WGTileConfig.staged_out): a row of O (HDV elements, whole 16-byte
        chunks) fits in a row of Q's column blocks (HDP), and no next row block's Q is copied there early (q_next)."""
        spec = self.layer.function.outputs[0].arg
        _, hdp, _ = tile_dims(int(spec.head_dim), int(spec.v_head_dim), self.config.swizzle)
        hdv = int(spec.v_head_dim)
        return hdv % 8 == 0 and hdv <= hdp and not self.config.q_next


@functools.lru_cache(maxsize=128)
def _render(plan: WGMMAAttentionPlan) -> str:
    spec = plan.spec
    dtype = plan.layer.dtype
    hd = check_specialisable(plan.layer, "wgmma attention", head_dims=HEAD_DIMS, value_dim=True)
    hdv = int(spec.v_head_dim)
    sw, hdp, hdvp = plan.dims
    c = plan.config
    mma_t = "bf16" if dtype is DType.bf16 else "f16"
    rel = plan.rel_table
    ctx = hook_context(plan.layer, distance_table=rel is not None, key_tile=c.bn if plan.key_split else None,
                       unsigned_abs=plan.key_split)
    if plan.block_mask:   # the pre-pass classifies the tiles
        ctx.update(tile_lines=None, tile_true=None, tile_false=None)
    rope_step = c.rope_step and rope_steps(ctx)
    rope_vec = rope_step and c.rope_batch and rope_runs(ctx)
    return render(
        "cuda/attention_wgmma.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name, plan_key=plan.key,
        signature=plan.abi.signature, merge_signature=plan.kernels[1].signature, smem=plan.shared_layout.offsets,
        common=read_template("cuda/common.cuh"), T=ops.STORAGE_TYPE[dtype], MMA_T=mma_t, HD=hd,
        HDV=hdv, SW=sw, HDP=hdp, HDVP=hdvp, UNIFORM_LOADS=hd == hdv == hdp and 128 % (hd // 8) == 0,
        HQ=int(spec.num_q_heads), HKV=int(spec.num_kv_heads), GROUP=plan.group, PAGE=plan.page_size,
        NPG=plan.page_entries, BN=c.bn, STAGES=c.stages, KSTAGES=plan.k_stages, PRODUCER_REGS=c.producer_regs,
        CONSUMER_REGS=c.consumer_regs, NCW=c.consumers, OVERLAP=c.overlap, TMA=plan.tma, KV_RINGS=plan.kv_rings,
        ROPE_STEP=rope_step, ROPE_BATCH=c.rope_batch, ROPE_VEC=rope_vec,
        ROPE_REGS=rope_vec and c.rope_regs, TILE_BRANCH=c.tile_branch,
        LPT=c.lpt > 0, LPT_CTAS=c.lpt, LPT_L2=LPT_L2, ITEMS=2 if c.pairs else 1, PERSIST=c.persist,
        Q_NEXT=c.q_next, POLY=c.poly, CHAINS=c.chains, LATE_PACK=c.late_pack, STAGED_OUT=c.staged_out,
        FOLD=c.fold and folds(ctx),
        # a mask reading tables at positions (the block-mask kernels): its compare and lookups behind a branch, as
        # the select of both kept the lookups' registers live and the overlap schedule spilled (D64 / D256)
        MASK_BRANCH=plan.block_mask, BOXR=plan.tma_box[0], MASK_BITS=plan.mask_split, KEEPW=(c.bn // 4 + 31) // 32,
        KEY_STAGED=plan.key_terms_staged, KEY_SLOTS=plan.key_term_slots,
        wgmma_ops=[{"n": c.bn, "a": "ss", "t": mma_t}, {"n": hdvp, "a": "rs", "t": mma_t}],
        block_mask=plan.block_mask, BM_HEADS=mask_heads(plan.layer) if plan.block_mask else 1,
        RELH=rel[0] if rel else None, RELW=rel[1] if rel else None, **ctx)


def supports(layer: Layer, page_size: int) -> bool:
    """Whether the wgmma kernel is the default prefill of this block: bf16/f16, head dims
    of DEFAULT_HEAD_DIMS (q/k and value), and pages of at least BN / 32 keys (a tile's page
    entries, one per lane). The kernel specialises any of HEAD_DIMS (multiples of 16 from 32
    to 256, value dim apart) where asked for (plan_wgmma_attention, PagedAttention(prefill=
    "wgmma")). A mask that reads tables at positions (document ids) takes it where its key terms are
    staged in shared memory (key_stage_default, WGMMAAttentionPlan.key_terms_staged): documents measured
    1.20x the mma.sync prefill that way on an H100 (D128), against 1.00x with each thread making its own
    key terms and 0.68x with the per-score test (H200). Other block-mask kernels (a mask without a key
    term, or the staging off) stay on mma.sync, and run on this one where asked for."""
    try:
        check_specialisable(layer, "wgmma attention", head_dims=DEFAULT_HEAD_DIMS, value_dim=True)
    except LoweringError:
        return False
    plan = WGMMAAttentionPlan(layer=layer, page_size=page_size, mask_bits=mask_bits_default(),
                              stage_keys=key_stage_default())
    return plan.page_entries <= 32 and (plan.key_terms_staged or not needs_block_mask(layer))


def overlap_default() -> bool:
    """Whether the wgmma prefill takes its overlap schedule (WGTileConfig.overlap) where it compiles
    without spills: the default, measured 3-7 % faster on the H200 at every benchmarked shape
    (benchmarks/NOTES.md); LAYERFORGE_WGMMA_OVERLAP=0 turns it off. Read by the runtime's plans
    and the pack build alike, so a pack holds the kernel that runs."""
    return env_switch("LAYERFORGE_WGMMA_OVERLAP", True)


def tma_default() -> bool:
    """Whether the wgmma prefill loads full K/V tiles by TMA where it can (WGMMAAttentionPlan.tma):
    the default, measured faster on an H200 at every benchmarked shape (benchmarks/NOTES.md: 6-12 % at
    the 128-byte swizzle, 22-26 % at D80 / 96 / 160's 32 / 64-byte ones);
    LAYERFORGE_WGMMA_TMA=0 turns it off. Read by the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_TMA", True)


def kv_rings_default() -> bool:
    """Whether the wgmma prefill gives K and V rings of their own (WGTileConfig.kv_rings) where tiles arrive by TMA
    in two stages (the planner's rule, plan_wgmma_attention). On by default: measured on an H200 (benchmarks/NOTES.md)
    at D256 (n64s2) 0.71 -> 0.52 ms, 0.70 -> 0.96x cuDNN; at three stages (D64 / D128, n128s3) 1-5 % slower, so those
    keep one ring. LAYERFORGE_WGMMA_KV_RINGS=0 turns it off, for the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_KV_RINGS", True)


def three_consumers_default() -> bool:
    """Whether the wgmma prefill tries three consumer warpgroups first where tile_candidates lists them (D64). On by
    default: measured faster on an H200 (benchmarks/NOTES.md: gpt2 0.38 -> 0.36 ms, llama GQA 0.772 -> 0.660, 1.00x
    cuDNN; mistral 0.773 -> 0.670), and the Hopper attention and model GPU tests pass with the planner's kernels
    (rope_step, fold; spill-free under NVRTC 13.0 and 13.5). LAYERFORGE_WGMMA_THREE_CONSUMERS=0 keeps two, for the
    runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_THREE_CONSUMERS", True)


def lpt_default() -> bool:
    """Whether the wgmma prefill takes the sectioned launch order (WGTileConfig.lpt, templates/cuda/launch_order.jinja):
    where a head's row blocks are under LPT_CTAS CTAs (a short prompt, or D256's few long ones), sections of several
    heads run level by level from the longest row block, so that no long row block starts late; elsewhere the
    default order. On by default: measured on an H200 (benchmarks/NOTES.md) B1 S1024 H32 D128 causal 34.8 -> 29.8 us
    (cuDNN 29.9), B1 S2048 90.3 -> 79.6, D256 B2 H16 S4096 0.51 -> 0.49 ms (1.00x cuDNN), D64 three consumers 382 ->
    388 TFLOP/s; B4 S1024 105.3 -> 107.7 us. LAYERFORGE_WGMMA_LPT=0 turns it off, for the runtime's plans and the
    pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_LPT", True)


def rope_batch_default() -> bool:
    """Whether the wgmma prefill's q rotation by steps (rope_step) reads all of a thread's pairs before it rotates
    and stores any (WGTileConfig.rope_batch). The rotation in place orders each pair's shared-memory reads after the
    last pair's stores (the swizzled offsets are not provably apart): 32 dependent read / rotate / store chains a
    thread at D128, GQA 4, in each CTA's start. On by default: measured on an H100 (benchmarks/NOTES.md, llama GQA
    32/8 D128, three rounds in turns) 515-519 -> 523-528 TFLOP/s (+1.7 % in two rounds, +5.9 % in the third; an
    H200 had given 1.10 -> 1.09 ms), the RoPE blocks' Hopper, model and paged-attention GPU tests passing with it (117);
    LAYERFORGE_WGMMA_ROPE_BATCH=0 turns it off, for the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_ROPE_BATCH", True)


def pairs_default() -> bool:
    """Whether the wgmma prefill's CTAs take two row blocks each (WGTileConfig.pairs): the chunk's row block
    yc - 1 - y, then y, one after the other in the same CTA, the rings' places carried over, so that the second's
    first K / V tiles load under the first's last tiles and epilogue, and a causal CTA's work is the mean row block's
    (half the CTAs, each the same length). Why: a CTA's fixed start (barriers, the page table, Q's load and RoPE, the
    ring's first loads) fitted ~6.4 us a CTA on an H200 (benchmarks/NOTES.md). Its GPU tests pass; measured on an
    H200 slower at B4 S4096 D128 (1.05 -> 1.07 ms) and GQA (1.11 -> 1.12), so off; LAYERFORGE_WGMMA_PAIRS=1 turns it
    on, for the runtime's plans and the pack
    build alike."""
    return env_switch("LAYERFORGE_WGMMA_PAIRS", False)


def persist_default(layer: Layer | None = None) -> bool:
    """Whether the wgmma prefill runs as a persistent kernel (WGTileConfig.persist): at most one CTA an SM, each taking
    row blocks from a work queue in launch order (the sectioned order where lpt is taken) until none is left, its
    rings carried from one row block to the next, so that each next block's page-table reads and K / V loads go out
    under this one's last tiles and epilogue, and no CTA's start waits for a launch slot; each next block's Q rows
    are prefetched into L2 by the producer and copied into shared memory under this block's last P V (q_next).
    Why: a CTA's fixed start fitted ~6.4 us on an H200 (benchmarks/NOTES.md); a list-scheduling model with it gives
    B4 S1024 H32 D128 causal 111 -> ~80-94 us and B4 S4096 1055 -> ~920-980 us where a next block's start costs
    2-4 us. Measured on an H200 (its GPU tests and compute-sanitizer pass): B4 S4096 D128 1.06 -> 1.04 ms, GQA 1.10
    -> 1.08, B4 S1024 108.5 -> 103.9 us, D64 0.35 -> 0.36, B1 S1024 29.8 -> 30.2 us: far under the model, so off,
    but for a block whose mask reads tables at positions (`layer` given: packed documents, the block-mask lists'
    ~3.6 key tiles a CTA, start-heavy), where it measured 1.06x the plain kernel on an H100 (0.405 -> 0.382 ms with
    the key terms staged). LAYERFORGE_WGMMA_PERSIST=1 / 0 turns it on / off for every block, for the runtime's plans
    and the pack build alike."""
    asked = env_switch("LAYERFORGE_WGMMA_PERSIST", None)
    if asked is not None or layer is None:
        return bool(asked)
    return needs_block_mask(layer) or (persist_local_default() and short_local_mask(layer))


LOCAL_PERSIST_TILES = 8   # the most key tiles a row block of a local mask visits for persist_local_default to apply


def short_local_mask(layer: Layer) -> bool:
    """Whether the block's mask keeps each row block to a few key tiles whatever the sequence's length
    (codegen/mask_tiles.local_tiles over 128 x 128 tiles: NATTEN's 7 x 7 neighbourhood visits 3-4), so that its CTAs
    are start-heavy as the documents' are."""
    tiles = local_tiles(layer.function.outputs[0].arg.mask)
    return tiles is not None and tiles <= LOCAL_PERSIST_TILES


def persist_local_default() -> bool:
    """Whether blocks with a short local mask (short_local_mask: 2-D neighbourhoods) take the persistent kernel by
    default, as the block-mask blocks do. Off (LAYERFORGE_WGMMA_PERSIST_LOCAL=1 turns it on) until measured: predicted
    4-8 % on NATTEN (4 key tiles a row block, 4096 CTAs at B4 H32 S4096; benchmarks/NOTES.md)."""
    return env_switch("LAYERFORGE_WGMMA_PERSIST_LOCAL", False)


def deep_k_default() -> bool:
    """Whether the wgmma prefill's K ring takes one stage more than V's where K and V have rings of their own and
    shared memory holds it (D256: Q 64 KB + 3 x 32 KB of K + 2 x 32 KB of V, 224 KB).
    Measured no faster on an H200 (D256 B2 H16 S4096: 0.52 ms either way, benchmarks/NOTES.md), so it stays off;
    LAYERFORGE_WGMMA_DEEP_K=1 turns it on, for the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_DEEP_K", False)


def default_options(layer: Layer | None = None) -> dict[str, bool]:
    """plan_wgmma_attention's options as the environment's switches set them (each `*_default` above): what the
    runtime's plans and the pack build both ask for, so that a pack holds the kernel that runs. `layer`: the block
    planned, for the defaults that depend on it (persist_default)."""
    return dict(overlap=overlap_default(), tma=tma_default(), rope_step=rope_step_default(), fold=fold_default(),
                kv_rings=kv_rings_default(), deep_k=deep_k_default(), three_consumers=three_consumers_default(),
                lpt=lpt_default(), pairs=pairs_default(), rope_batch=rope_batch_default(),
                persist=persist_default(layer), mask_bits=mask_bits_default(), stage_keys=key_stage_default(),
                key_split=key_split_default(), poly=poly_default(), chains=chains_default(),
                late_pack=late_pack_default(), staged_out=staged_out_default(), rope_regs=rope_regs_default(),
                tile_branch=tile_branch_default())


def late_pack_default() -> bool:
    """Whether a plan whose overlap schedule spills takes it with one P buffer (WGTileConfig.late_pack: p packed after
    the previous P V), where that compiles without spills: the default (D64's three consumers), measured on an H100
    at 395-399 TFLOP/s against the plain schedule's 386-388 (benchmarks/NOTES.md); LAYERFORGE_WGMMA_LATE_PACK=0 turns
    it off."""
    return env_switch("LAYERFORGE_WGMMA_LATE_PACK", True)


def tile_branch_default() -> bool:
    """Whether the overlap schedule takes the full-tile branch around both rows' softmax (WGTileConfig.tile_branch)
    where the mask has full tiles. Off until measured on a GPU (benchmarks/NOTES.md: the headline predicted 1-4 %
    faster); LAYERFORGE_WGMMA_TILE_BRANCH=1 turns it on, for the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_TILE_BRANCH", False)


def rope_regs_default() -> bool:
    """Whether the wgmma prefill reads q's rotated columns into registers and rotates them there
    (WGTileConfig.rope_regs) where rope_batch rotates in 16-byte runs. Off until measured on a GPU (benchmarks/NOTES.md:
    Llama's GQA predicted 1-2 % faster); LAYERFORGE_WGMMA_ROPE_REGS=1 turns it on, for the runtime's plans and the
    pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_ROPE_REGS", False)


def staged_out_default() -> bool:
    """Whether the wgmma prefill sends O out through Q's buffer in 16-byte stores (WGTileConfig.staged_out) where
    it can and compiles without spills. On by default: measured on an H100 (benchmarks/NOTES.md, five rounds in
    turns at the headline B4 H32 S4096 D128 causal) 1.7 % faster in the median (four rounds +1.3 to +2.4 %, one
    -2.6 %), D256 +4.3 to +5.0 % in every round, D64 +1 to +3.3 %, llama GQA +1.4 to +1.8 % in four of five; the
    whole Hopper GPU file passes with it (192). LAYERFORGE_WGMMA_STAGED_OUT=0 turns it off, for the runtime's plans
    and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_STAGED_OUT", True)


def chains_default() -> int:
    """Partial values a row's max and sum are taken over (WGTileConfig.chains), from LAYERFORGE_WGMMA_CHAINS (1, 2,
    4 or 8; unset: 1, one chain, the kernel as it was). Not measured yet."""
    return env_int("LAYERFORGE_WGMMA_CHAINS", 1)


def poly_default() -> int:
    """Key groups of 8 (of a tile's BN / 8) whose 2^x a row takes on the FMA pipe (WGTileConfig.poly), from
    LAYERFORGE_WGMMA_POLY_EXP (an integer; unset or 0: none, every 2^x on the SFU). Not measured yet: off."""
    return env_int("LAYERFORGE_WGMMA_POLY_EXP", 0)


def key_split_default() -> bool:
    """Whether a mask that reads kv_pos // 2^j or kv_pos % 2^j (a 2-D neighbourhood's grid row and column) has
    those terms split over the key tile (WGMMAAttentionPlan.key_split, codegen/scalar_expr.ScalarEmitter.key_split):
    the tile start's part once a tile, the key's offset a constant per unrolled key, folded by the compiler. NATTEN's
    consumer loop 3554 -> 2710 instructions (with |x| <= c as one unsigned compare; NVRTC 13.5, D128). Only such
    masks' kernels change. LAYERFORGE_WGMMA_KEY_SPLIT=0 turns both off (the kernel as it was), for the runtime's
    plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_KEY_SPLIT", True)


def key_stage_default() -> bool:
    """Whether a mask tested as bits has its key terms made once a tile into shared memory by the consumer
    warpgroups (WGMMAAttentionPlan.key_terms_staged). On by default: measured on an H100 (benchmarks/NOTES.md,
    documents at B4 H32/8 S4096 D128) 0.482 -> 0.405 ms, 1.20x the mma.sync prefill and 1.23x Flex, its GPU tests
    and memcheck clean; it is what sends such blocks to the wgmma prefill (supports()).
    LAYERFORGE_WGMMA_KEY_STAGE=0 turns it off, for the runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_KEY_STAGE", True)


def mask_bits_default() -> bool:
    """Whether a mask whose per-score test reads tables at the key (packed documents' ids) is tested once per tile
    as bits (WGMMAAttentionPlan.mask_bits); LAYERFORGE_WGMMA_MASK_BITS=0 tests it per score. Only kernels of such
    masks change (the block-mask kernels, which run where asked for: supports())."""
    return env_switch("LAYERFORGE_WGMMA_MASK_BITS", True)


def rope_steps(ctx: dict) -> bool:
    """Whether WGTileConfig.rope_step changes the kernel of a block (ctx: hook_context's): RoPE on q, with a
    pair count dividing a warpgroup's 128 threads (each thread one pair of every 128 / pairs-th row)."""
    return ctx["rope"] is not None and 128 % (ctx["rope"]["rdim"] // 2) == 0


def rope_runs(ctx: dict) -> bool:
    """Whether rope_batch rotates q in 16-byte runs of 8 pairs (neox pairs, whose halves are 8-column runs: rdim a
    multiple of 16, its runs dividing a warpgroup's 128 threads); otherwise pair by pair, reads first."""
    rope = ctx["rope"]
    return rope is not None and rope["style"] == "neox" and rope["rdim"] % 16 == 0 and 128 % (rope["rdim"] // 16) == 0


def fold_default() -> bool:
    """Whether the wgmma prefill folds the scale into the exponent's FFMA (WGTileConfig.fold) where it
    applies. On by default: measured faster on an H200 with rope_step (benchmarks/NOTES.md: the stdlib blocks
    beside Flex, mistral 0.891 -> 0.650 ms, llama 1.201 -> 1.125 ms), and the Hopper attention GPU tests pass
    with both (scripts/ab-switches.sh, part fold: 470 passed). LAYERFORGE_WGMMA_FOLD=0 turns it off, for the
    runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_FOLD", True)


def rope_step_default() -> bool:
    """Whether the wgmma prefill rotates q by steps (WGTileConfig.rope_step) in blocks with RoPE (rope_steps).
    On by default, measured with fold_default (its note); LAYERFORGE_WGMMA_ROPE_STEP=0 turns it off, for the
    runtime's plans and the pack build alike."""
    return env_switch("LAYERFORGE_WGMMA_ROPE_STEP", True)


def plan_wgmma_attention(layer: Layer, *, page_size: int = 16, tiles: WGTileConfig | None = None,
                         compile_fn: CompileFn | None = None, distance_table: bool = True,
                         overlap: bool = False, tma: bool = False, rope_step: bool = False,
                         fold: bool = False, kv_rings: bool = False, deep_k: bool = False,
                         three_consumers: bool = False, lpt: bool = False, pairs: bool = False,
                         rope_batch: bool = False, persist: bool = False, mask_bits: bool = True,
                         stage_keys: bool = False, key_split: bool = True, poly: int = 0,
                         chains: int = 1, late_pack: bool = False, staged_out: bool = False,
                         rope_regs: bool = False, tile_branch: bool = False) -> WGMMAAttentionPlan:
    """The Hopper prefill plan of an attention block. Without `tiles`, the first of
    `tile_candidates` whose shared memory fits and that compiles without register spills
    (through `compile_fn`; without one, the first that fits). distance_table (the default):
    tabulate the score's distance term per tile (WGMMAAttentionPlan.rel_table; 1.67-1.74x
    the per-score kernel on T5 / relative bias, H200); False computes it per score. Blocks
    without a distance term plan the same either way.
    overlap (without `tiles`): the chosen tile shape with WGTileConfig.overlap where that
    compiles without spills through `compile_fn` (never without one); else the plan above.
    The shape is never changed for it, so both variants compare like for like.
    tma (without `tiles`): the same with WGTileConfig.tma where the plan can take it and it
    compiles without spills (never without a compile function).
    rope_step (without `tiles`): in a block with RoPE, the same with WGTileConfig.rope_step where it
    compiles without spills (q's rotation: one precise sincos a thread, the rest by step rotations).
    fold (without `tiles`): where the block has no score hook and a positive constant scale, the same with
    WGTileConfig.fold where it compiles without spills.
    kv_rings (without `tiles`): where the plan takes TMA in two stages, the same with WGTileConfig.kv_rings where it
    compiles without spills (K and V in rings of their own: measured faster at two stages, slower at three; `tiles`
    asks for it at any depth). deep_k (with kv_rings taken): K's ring one stage deeper than V's where shared
    memory holds it and it compiles without spills. three_consumers (without `tiles`): the candidates of three consumer
    warpgroups too (D64's first), taken where they compile without spills and take TMA when it is asked for.
    lpt (without `tiles`): the longest-first launch order (WGTileConfig.lpt; it changes the CTAs' prologue only).
    pairs (without `tiles`): two row blocks a CTA (WGTileConfig.pairs) where that compiles without spills; the launch
    order is then the plain one (every CTA as long as the next), so lpt is not taken. rope_batch (without `tiles`):
    where rope_step is taken, its reads batched (WGTileConfig.rope_batch) where that compiles without spills.
    persist (without `tiles`): the persistent kernel over a work queue (WGTileConfig.persist) where that compiles
    without spills, in the launch order lpt asks for, with each next row block's Q loaded early (q_next) where that
    compiles without spills too; taken before pairs (a CTA with several row blocks either way). mask_bits: a mask
    whose per-score test reads tables at the key tested once per tile as bits (WGMMAAttentionPlan.mask_split);
    stage_keys: its key terms made into shared memory once a tile (WGMMAAttentionPlan.key_terms_staged); key_split:
    the mask's kv_pos // 2^j and % 2^j split over the key tile (WGMMAAttentionPlan.key_split). poly (without
    `tiles`): that many key groups of 8 a row take 2^x on the FMA pipe (WGTileConfig.poly; at most the tile's),
    on the plan the other options give, where it compiles without spills (without a compile function, as asked).
    chains (without `tiles`): a row's max and sum over that many partial values (WGTileConfig.chains), the same way.
    late_pack (with overlap, without `tiles`): where the overlap schedule spills, the same with one P buffer
    (WGTileConfig.late_pack) where that compiles without spills. staged_out (without `tiles`): O out through Q's
    buffer in 16-byte stores (WGTileConfig.staged_out) where the plan can (staged_out_serves: not with q_next) and it
    compiles without spills. rope_regs (without `tiles`): where rope_batch rotates q in 16-byte runs (rope_runs) and
    q_next is not taken, q's rotated columns read into registers (WGTileConfig.rope_regs) where that compiles without
    spills. tile_branch (without `tiles`): with the overlap schedule, the full-tile branch around both rows' softmax
    (WGTileConfig.tile_branch) where the mask has full tiles (tile_branch_serves) and it compiles without spills."""
    args = dict(locals())
    plan = _plan_wgmma_attention(**{k: v for k, v in args.items()
                                    if k not in ("poly", "chains", "staged_out", "rope_regs", "tile_branch")})
    if tiles is not None:
        return plan
    if poly or chains > 1:   # the softmax's variants, on the plan the other options give
        twin = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, poly=min(poly, plan.config.bn // 8),
                                                                   chains=chains))
        plan = twin if compile_fn is None or spill_free(twin, compile_fn) else plan
    if staged_out and plan.staged_out_serves:
        plan = _with_option(plan, compile_fn, staged_out=True)
    if rope_regs and plan.config.rope_batch and not plan.config.q_next and rope_runs(hook_context(layer)):
        plan = _with_option(plan, compile_fn, rope_regs=True)
    if tile_branch and plan.config.overlap and plan.tile_branch_serves:
        plan = _with_option(plan, compile_fn, tile_branch=True)
    return plan


def _plan_wgmma_attention(layer: Layer, *, page_size: int, tiles: WGTileConfig | None, compile_fn: CompileFn | None,
                          distance_table: bool, overlap: bool, tma: bool, rope_step: bool, fold: bool, kv_rings: bool,
                          deep_k: bool, three_consumers: bool, lpt: bool, pairs: bool, rope_batch: bool,
                          persist: bool, mask_bits: bool, stage_keys: bool, key_split: bool,
                          late_pack: bool) -> WGMMAAttentionPlan:
    """plan_wgmma_attention's tile and the options taken on it, before the softmax's variants and staged_out (which
    plan_wgmma_attention takes last, on the plan this gives)."""
    plan = _plan_tiles(layer, page_size, tiles, compile_fn, distance_table, three_consumers=three_consumers,
                       mask_bits=mask_bits, stage_keys=stage_keys, key_split=key_split)
    if tiles is not None:
        return plan
    plan = _with_options(plan, layer, compile_fn, overlap, tma, rope_step, fold, kv_rings, deep_k, late_pack)
    if plan.config.consumers > CONSUMERS and tma and not plan.tma:
        # three consumers were measured with TMA tiles: where those spill (gemma2's D64), the two-consumer tiles
        plan = _with_options(_plan_tiles(layer, page_size, None, compile_fn, distance_table, three_consumers=False,
                                         mask_bits=mask_bits, stage_keys=stage_keys, key_split=key_split),
                             layer, compile_fn, overlap, tma, rope_step, fold, kv_rings, deep_k, late_pack)
    if rope_batch and plan.config.rope_step:
        plan = _with_option(plan, compile_fn, rope_batch=True)
    if persist:
        queued = _with_option(plan, compile_fn, persist=True, lpt=LPT_CTAS if lpt else 0)
        if not queued.config.persist and plan.config.consumers == CONSUMERS and plan.config.default_regs == (
                plan.config.producer_regs, plan.config.consumer_regs):
            # the producer's 40 registers short by one (the block-mask lists' walk): 8 more, the consumers 8 fewer
            queued = _with_option(plan, compile_fn, persist=True, lpt=LPT_CTAS if lpt else 0, producer_regs=48,
                                  consumer_regs=224)
        if queued.config.persist:
            return _with_option(queued, compile_fn, q_next=True)
    if pairs:
        paired = _with_option(plan, compile_fn, pairs=True)
        if paired.config.pairs:   # taken: the plain launch order (every CTA as long as the next), no lpt
            return paired
    if lpt:   # where it compiles without spills (D256's document kernel spills with it); without a compile function too
        ordered = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, lpt=LPT_CTAS))
        plan = ordered if compile_fn is None or spill_free(ordered, compile_fn) else plan
    return plan


def _with_options(plan: WGMMAAttentionPlan, layer: Layer, compile_fn: CompileFn | None, overlap: bool, tma: bool,
                  rope_step: bool, fold: bool, kv_rings: bool, deep_k: bool,
                  late_pack: bool = False) -> WGMMAAttentionPlan:
    """plan_wgmma_attention's options on the tile shape chosen, each where it compiles without spills."""
    ctx = hook_context(layer) if rope_step or fold else None

    def with_option(plan: WGMMAAttentionPlan, **option: bool | int) -> WGMMAAttentionPlan:
        return _with_option(plan, compile_fn, **option)

    if overlap:
        plan = with_option(plan, overlap=True)
        if not plan.config.overlap and late_pack:   # (three consumers' 160 registers): one P buffer
            plan = with_option(plan, overlap=True, late_pack=True)
    if tma:   # measured faster at the 128, 64 and 32-byte swizzles (D128 / D80, D96 / D160)
        plan = with_option(plan, tma=True)
    if rope_step and rope_steps(ctx):
        plan = with_option(plan, rope_step=True)
    if fold and folds(ctx):
        plan = with_option(plan, fold=True)
    if kv_rings and plan.tma and plan.config.stages == 2:
        plan = with_option(plan, kv_rings=True)   # where the rings spill (gemma2's D256 overlap), one ring
        if deep_k and plan.kv_rings:
            deeper = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, k_stages=plan.config.stages + 1))
            if deeper.shared_bytes <= SHARED_LIMIT:
                plan = with_option(plan, k_stages=plan.config.stages + 1)
    return plan


def _with_option(plan: WGMMAAttentionPlan, compile_fn: CompileFn | None, **option: bool | int) -> WGMMAAttentionPlan:
    """The plan with `option` set in its tiles where its shared memory fits and it compiles without spills (and, for
    tma, where the plan can take TMA: a plan that cannot keeps cp.async); else the plan as it was."""
    twin = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, **option))
    ok = (twin.tma if option.get("tma") else True) and twin.shared_bytes <= SHARED_LIMIT
    return twin if ok and spill_free(twin, compile_fn) else plan


def _plan_tiles(layer: Layer, page_size: int, tiles: WGTileConfig | None, compile_fn: CompileFn | None,
                distance_table: bool, *, three_consumers: bool = True, mask_bits: bool = True,
                stage_keys: bool = False, key_split: bool = True) -> WGMMAAttentionPlan:
    check_attention_layer(layer, page_size)
    check_specialisable(layer, "wgmma attention", head_dims=HEAD_DIMS, value_dim=True)
    spec = layer.function.outputs[0].arg
    candidates = [tiles] if tiles is not None else [c for c in tile_candidates(int(spec.head_dim), int(spec.v_head_dim))
                                                    if three_consumers or c.consumers == CONSUMERS]
    fits = [c for c in candidates if WGMMAAttentionPlan(layer=layer, page_size=page_size, tiles=c,
                                                        distance_table=distance_table).shared_bytes <= SHARED_LIMIT]
    if not fits:
        tables = any(WGMMAAttentionPlan(layer=layer, page_size=page_size, tiles=c,
                                        distance_table=distance_table).rel_table for c in candidates)
        raise LoweringError(f"{layer.name}: no wgmma tile candidate fits {SHARED_LIMIT} bytes of shared memory"
                            + (" beside the distance tables (distance_table=False: the per-score kernel)"
                               if tables else ""))
    candidates = fits
    for c in candidates:
        plan = WGMMAAttentionPlan(layer=layer, page_size=page_size, tiles=c, distance_table=distance_table,
                                  mask_bits=mask_bits, stage_keys=stage_keys, key_split=key_split)
        if plan.page_entries > 32:
            raise LoweringError(f"{layer.name}: wgmma attention needs pages of at least {c.keys // 32 + 1} keys "
                                f"for {c.keys}-key tiles, not {page_size}")
        plan.source()
        if compile_fn is None or c is candidates[-1] or spill_free(plan, compile_fn):
            return plan
    raise AssertionError("unreachable")
