"""DeepSeek MLA kernels: decode over a paged latent cache, and the cache's append.

    plan = plan_mla_decode(num_heads=128, latent_dim=512, rope_dim=64, page_size=64,
                           dtype="bf16", arch="sm_90")
    plan.key -> 'mla_decode_h128_l512_r64_p64_bf16_n64_wg_sm90a'   (n64: 64-key tiles; wg: the Hopper kernel)
    plan = plan_mla_append(latent_dim=512, rope_dim=64, page_size=64, dtype="bf16",
                           rope=RopeSpec(10000.0, "gptj", 64, yarn), arch="sm_90")

A latent cache row is a token's [latent (L) | rotated RoPE key (R)]. Decode in the absorbed
form is multi-query attention of every query head over those rows (K: the whole row, V: its
latent): on sm_90 the Hopper kernel (templates/cuda/mla_decode_wgmma.cu.jinja: wgmma with Q and
K from shared memory, a producer warpgroup feeding TMA / cp.async stages) where the latent
splits into two halves of whole 64-column blocks, else mma.sync (templates/cuda/mla_decode.cu.jinja,
`kernel="mma"`, every arch from sm_80); split-KV parts are merged by the attention
family's merge kernel (attention_merge.cuh.jinja) with a row of L channels. The append writes
rows into pages, rotating the RoPE key (templates/cuda/mla_append.cu.jinja).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from ..dsl.ir import RopeSpec
from ..dsl.numerics import RopeScaling, as_rope_scaling, rope_scaling_key
from ..dsl.types import DType
from . import ops
from .abi import TENSOR_MAP_CTYPE, Arg, KernelABI, SharedLayout
from .attention import merge_abi
from .plan import KernelPlan, env_switch
from .render import read_template, render
from .row import LoweringError
from .rope import rope_context, static_table

__all__ = ["MLADecodePlan", "MLAAppendPlan", "plan_mla_decode", "plan_mla_append", "decode_layout", "smem_limit",
           "wgmma_decode_layout", "wgmma_serves", "seesaw_serves", "seesaw_default", "sync_handoff_serves",
           "sync_handoff_default", "fine_serves", "fine_default", "fine_order", "pair_serves", "pair_default",
           "staged_out_default", "evict_serves", "evict_default", "HEADS_PER_CTA", "APPEND_TOKENS_PER_BLOCK"]

HEADS_PER_CTA = 64            # query heads of a decode CTA (the M of its tiles)
DECODE_THREADS = 256
WGMMA_THREADS = 384           # the Hopper kernel: a producer and two consumer warpgroups
WGMMA_STAGES = 2              # key tiles in flight (Q and two 64-key stages of 576 channels: 216 KB)
WGMMA_REGS = (40, 232)        # setmaxnreg: producer, consumers (O's half alone is 128 a thread)
TMA_MIN_PAGE = 16             # TMA boxes are page runs of at least this many keys; smaller pages: cp.async
APPEND_TOKENS_PER_BLOCK = 8   # one warp a token
_DTYPES = ("bf16", "f16")


def _check_dims(latent_dim: int, rope_dim: int, page_size: int, dtype: str, arch: str) -> None:
    for name, v in (("latent_dim", latent_dim), ("rope_dim", rope_dim), ("page_size", page_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"mla: {name} must be a positive int, got {v!r}")
    if page_size & (page_size - 1):
        raise ValueError(f"mla: page size must be a power of two, got {page_size}")
    if dtype not in _DTYPES:
        raise LoweringError(f"mla: the kernels take bf16 or f16, not {dtype!r}")
    if int(arch.removeprefix("sm_").rstrip("af")) < 80:
        raise LoweringError(f"mla: the kernels need sm_80 or newer (mma.sync bf16, cp.async), not {arch}")


@dataclass(frozen=True, kw_only=True)
class MLADecodePlan(KernelPlan):
    family: ClassVar[str] = "mla_decode"
    num_heads: int
    latent_dim: int = 512
    rope_dim: int = 64
    page_size: int = 64
    dtype: str = "bf16"
    keys: int = 32            # keys per tile (BN): 32 or 64 (plan_mla_decode picks 64 where shared memory allows)
    arch: str = "sm_90"
    kernel: str = "mma"       # "mma" (mma.sync, sm_80+) or "wgmma" (sm_90a; 64-key tiles)
    overlap: bool = False     # wgmma: consumer 0's softmax under its previous tile's P V
    seesaw: bool = False      # wgmma: the consumers take turns on the tiles (the template's SEESAW)
    sync_handoff: bool = False   # wgmma, not seesaw: the consumers' hand-offs through named barriers are syncs on
                                 # both sides at one instruction (the template's SYNC_HANDOFF; sync_handoff_default)
    fine: bool = False        # wgmma, the default schedule: a full barrier a 64-column block, an empty barrier a
                              # consumer (the template's FINE; fine_default)
    pair: bool = False        # wgmma, the default schedule: a token's two adjacent head blocks a cluster reading
                              # each key tile once by TMA multicast (the template's PAIR; pair_serves, pair_default)
    staged_out: bool = False  # wgmma: O out through shared memory in 16-byte stores (the template's STAGED_OUT;
                              # staged_out_default, on: plan_mla_decode's plans have it; key suffix "ns" without)
    evict: bool = False       # wgmma with TMA tiles, not pair: the key tiles' TMA copies hinted L2 evict_first (the
                              # template's EVICT; evict_serves, evict_default, on: plan_mla_decode's plans have it
                              # where it serves; key suffix "ne" where it serves and is off)

    def __post_init__(self):
        _check_dims(self.latent_dim, self.rope_dim, self.page_size, self.dtype, self.arch)
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"mla decode: num_heads must be a positive int, got {self.num_heads!r}")
        dk = self.latent_dim + self.rope_dim
        if dk % 64 or self.latent_dim % 32 or self.latent_dim > 512:
            raise LoweringError(f"mla decode: no specialisation for latent {self.latent_dim} + rope {self.rope_dim}: "
                                f"needs latent + rope a multiple of 64 and latent a multiple of 32, at most 512 "
                                f"(a thread holds latent / 4 accumulators)")
        if self.keys not in (32, 64):
            raise ValueError(f"mla decode: keys per tile must be 32 or 64, got {self.keys!r}")
        if self.kernel not in ("mma", "wgmma"):
            raise ValueError(f"mla decode: kernel must be 'mma' or 'wgmma', got {self.kernel!r}")
        if self.overlap and self.kernel != "wgmma":
            raise ValueError("mla decode: overlap is a schedule of the wgmma kernel")
        if self.seesaw and not seesaw_serves(self.kernel, self.overlap, self.rope_dim):
            raise ValueError("mla decode: seesaw is a schedule of the wgmma kernel, not with overlap, and needs a RoPE "
                             f"part of at least one 64-column block (P goes there), got kernel {self.kernel!r}, "
                             f"overlap {self.overlap}, rope {self.rope_dim}")
        if self.sync_handoff and not sync_handoff_serves(self.kernel, self.seesaw):
            raise ValueError("mla decode: sync_handoff is an option of the wgmma kernel's two schedules (not the "
                             f"seesaw), got kernel {self.kernel!r}, seesaw {self.seesaw}")
        if self.fine and not fine_serves(self.kernel, self.overlap, self.seesaw):
            raise ValueError("mla decode: fine is an option of the wgmma kernel's default schedule (not overlap, not "
                             f"seesaw), got kernel {self.kernel!r}, overlap {self.overlap}, seesaw {self.seesaw}")
        if self.pair and not pair_serves(self.kernel, self.overlap, self.seesaw, self.fine, self.num_heads,
                                         self.page_size):
            raise ValueError("mla decode: pair is an option of the wgmma kernel's default schedule (not overlap, "
                             f"seesaw or fine) with TMA tiles (pages of at least {TMA_MIN_PAGE} keys) and an even number of "
                             f"{HEADS_PER_CTA}-head blocks, got kernel {self.kernel!r}, overlap {self.overlap}, seesaw "
                             f"{self.seesaw}, fine {self.fine}, {self.num_heads} heads, page {self.page_size}")
        if self.staged_out and self.kernel != "wgmma":
            raise ValueError(f"mla decode: staged_out is an option of the wgmma kernel, got kernel {self.kernel!r}")
        if self.evict and not evict_serves(self.kernel, self.page_size, self.pair):
            raise ValueError(f"mla decode: evict is an option of the wgmma kernel's TMA tiles (pages of at least "
                             f"{TMA_MIN_PAGE} keys; the pair's copies are hinted already), got kernel "
                             f"{self.kernel!r}, page {self.page_size}, pair {self.pair}")
        if self.kernel == "wgmma":
            if self.arch != "sm_90a":
                raise LoweringError(f"mla decode: the wgmma kernel is built for sm_90a (wgmma, setmaxnreg), not {self.arch}")
            if self.latent_dim % 128 or self.keys != 64:
                raise LoweringError(f"mla decode: the wgmma kernel takes 64-key tiles and a latent of whole 128-channel "
                                    f"pairs of column blocks (its two consumers' halves), not keys {self.keys}, "
                                    f"latent {self.latent_dim}")
        limit = smem_limit(self.arch)
        if self.shared_bytes > limit:
            raise LoweringError(f"mla decode: {self.keys}-key tiles with 64 heads of {dk} channels take "
                                f"{self.shared_bytes} bytes of shared memory; {self.arch} allows {limit}")

    @property
    def key(self) -> str:
        return (f"mla_decode_h{self.num_heads}_l{self.latent_dim}_r{self.rope_dim}_p{self.page_size}_{self.dtype}"
                f"_n{self.keys}{'_wg' if self.kernel == 'wgmma' else ''}{'ov' if self.overlap else ''}"
                f"{'ss' if self.seesaw else ''}{'sh' if self.sync_handoff else ''}{'fg' if self.fine else ''}"
                f"{'cl' if self.pair else ''}"
                f"{'ne' if evict_serves(self.kernel, self.page_size, self.pair) and not self.evict else ''}"
                f"{'ns' if self.kernel == 'wgmma' and not self.staged_out else ''}"
                f"_{self.arch.replace('_', '')}")

    @property
    def merge_name(self) -> str:
        return self.kernel_name + "_merge"

    @property
    def row_dim(self) -> int:
        return self.latent_dim + self.rope_dim

    @property
    def tma(self) -> bool:
        """Full key tiles by TMA (the wgmma kernel, pages of at least TMA_MIN_PAGE keys)."""
        return self.kernel == "wgmma" and self.page_size >= TMA_MIN_PAGE

    @property
    def tma_box(self) -> tuple[int, int]:
        """(rows, columns) of the cache map's box: a page run of at most a tile x one 128-byte column block."""
        return min(self.page_size, self.keys), 64

    @property
    def shared_layout(self) -> SharedLayout:
        if self.kernel == "wgmma":
            return wgmma_decode_layout(self.row_dim, self.keys)
        return decode_layout(self.row_dim, self.keys)

    @property
    def shared_bytes(self) -> int:
        if self.kernel == "wgmma":
            return wgmma_shared_bytes(self.row_dim, self.keys)
        return self.shared_layout.bytes

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return _decode_kernels(self)

    def describe(self) -> dict[str, Any]:
        return {"num_heads": self.num_heads, "latent_dim": self.latent_dim, "rope_dim": self.rope_dim,
                "page_size": self.page_size, "dtype": self.dtype, "keys": self.keys, "kernel": self.kernel,
                **({"overlap": True} if self.overlap else {}), **({"seesaw": True} if self.seesaw else {}),
                **({"sync_handoff": True} if self.sync_handoff else {}), **({"fine": True} if self.fine else {}),
                **({"pair": True} if self.pair else {}), **({"staged_out": True} if self.staged_out else {}),
                **({"evict": True} if self.evict else {})}

    def source(self) -> str:
        return _decode_source(self)


@functools.lru_cache(maxsize=64)
def _decode_kernels(plan: MLADecodePlan) -> tuple[KernelABI, ...]:
    t = ops.STORAGE_TYPE[DType[plan.dtype]]
    args = (Arg("q", f"const {t}* __restrict__", "input"), Arg("cache", f"const {t}* __restrict__", "input"),
            Arg("page_table", "const int* __restrict__", "input"), Arg("seq_lens", "const int* __restrict__", "input"),
            Arg("q_seq", "const int* __restrict__", "input"), Arg("out", f"{t}* __restrict__", "output"),
            Arg("part_o", "float* __restrict__", "workspace"), Arg("part_lse", "float* __restrict__", "workspace"),
            Arg("scale", "float", "scalar"),
            *(Arg(n, "int", "dim") for n in ("max_pages", "num_pages", "num_seqs", "num_splits")),
            *((Arg("kv_map", TENSOR_MAP_CTYPE, "tmap", "kv_map"),) if plan.tma else ()))
    threads = WGMMA_THREADS if plan.kernel == "wgmma" else DECODE_THREADS
    main = KernelABI(name=plan.kernel_name, args=args,
                     grid=("tokens", f"cdiv({plan.num_heads}, {HEADS_PER_CTA})", "num_splits"),
                     block=(threads,), shared_bytes=plan.shared_bytes, problem=("tokens", "num_splits"))
    return main, merge_abi(plan.merge_name, DType[plan.dtype], plan.num_heads, plan.latent_dim)


@functools.lru_cache(maxsize=64)
def _decode_source(plan: MLADecodePlan) -> str:
    main, merge = plan.kernels
    if plan.kernel == "wgmma":
        order = fine_order(plan.latent_dim, plan.rope_dim)
        return render("cuda/mla_decode_wgmma.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name,
                      plan_key=plan.key, common=read_template("cuda/common.cuh"), T=ops.STORAGE_TYPE[DType[plan.dtype]],
                      MMA_T=plan.dtype, L=plan.latent_dim, R=plan.rope_dim, HQ=plan.num_heads, PAGE=plan.page_size,
                      BN=plan.keys, STAGES=WGMMA_STAGES, TMA=plan.tma, OVERLAP=plan.overlap, SEESAW=plan.seesaw,
                      SYNC_HANDOFF=plan.sync_handoff, FINE=plan.fine, BOXR=plan.tma_box[0],
                      PAIR=plan.pair, STAGED_OUT=plan.staged_out, EVICT=plan.evict, FINE_ORDER=order,
                      FINE_FIRST=order.index(plan.latent_dim // 128),
                      PRODUCER_REGS=WGMMA_REGS[0], CONSUMER_REGS=WGMMA_REGS[1],
                      wgmma_ops=[{"n": plan.keys, "a": "ss", "t": plan.dtype},
                                 {"n": plan.latent_dim // 2, "a": "rs", "t": plan.dtype},
                                 {"n": plan.latent_dim // 2, "a": "sst", "t": plan.dtype}],
                      signature=main.signature, merge_signature=merge.signature, smem=plan.shared_layout.offsets)
    return render("cuda/mla_decode.cu.jinja", kernel_name=plan.kernel_name, merge_name=plan.merge_name,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=ops.STORAGE_TYPE[DType[plan.dtype]],
                  MMA_T=plan.dtype, L=plan.latent_dim, R=plan.rope_dim, HQ=plan.num_heads, PAGE=plan.page_size,
                  BN=plan.keys, signature=main.signature, merge_signature=merge.signature,
                  smem=plan.shared_layout.offsets)


@dataclass(frozen=True, kw_only=True)
class MLAAppendPlan(KernelPlan):
    family: ClassVar[str] = "mla_append"
    latent_dim: int = 512
    rope_dim: int = 64
    page_size: int = 64
    dtype: str = "bf16"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    arch: str = "sm_90"

    def __post_init__(self):
        _check_dims(self.latent_dim, self.rope_dim, self.page_size, self.dtype, self.arch)
        if self.latent_dim % 8 or self.rope_dim % 8:
            # a row (latent + rope) in 16-byte chunks: the latent part is stored 16 bytes at a time at each row's start
            raise LoweringError(f"mla append: latent {self.latent_dim} and rope {self.rope_dim} must be multiples of "
                                f"8 (the cache's rows are written in 16-byte pieces)")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rope_scaling", as_rope_scaling(self.rope_scaling))
        static_table(self.rope_theta, self.rope_dim, self.rope_scaling)   # a length-dependent type: an error

    @property
    def rope(self) -> RopeSpec:
        return RopeSpec(self.rope_theta, "gptj", self.rope_dim, self.rope_scaling)

    @property
    def key(self) -> str:
        theta = "theta" + f"{self.rope_theta:g}".replace(".", "p").replace("+", "")
        scaling = [rope_scaling_key(self.rope_scaling)] if self.rope_scaling is not None else []
        return "_".join(["mla_append", f"l{self.latent_dim}", f"r{self.rope_dim}", f"p{self.page_size}", self.dtype,
                         theta, *scaling, self.arch.replace("_", "")]).replace("-", "m").replace(".", "p")

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_append_abi(self),)

    def describe(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "rope_dim": self.rope_dim, "page_size": self.page_size,
                "dtype": self.dtype, "rope_theta": self.rope_theta}

    def source(self) -> str:
        return render("cuda/mla_append.cu.jinja", kernel_name=self.kernel_name, plan_key=self.key,
                      signature=self.abi.signature, common=read_template("cuda/common.cuh"),
                      T=ops.STORAGE_TYPE[DType[self.dtype]], L=self.latent_dim, R=self.rope_dim, PAGE=self.page_size,
                      TPB=APPEND_TOKENS_PER_BLOCK, rope=rope_context(self.rope, memory="global"))


@functools.lru_cache(maxsize=64)
def _append_abi(plan: MLAAppendPlan) -> KernelABI:
    t = ops.STORAGE_TYPE[DType[plan.dtype]]
    args = (Arg("cache", f"{t}* __restrict__", "output"), Arg("latent", f"const {t}* __restrict__", "input"),
            Arg("k_pe", f"const {t}* __restrict__", "input"),
            Arg("latent_stride", "long long", "dim"), Arg("k_pe_stride", "long long", "dim"),   # token rows, elements
            Arg("meta", "const int* __restrict__", "input"),   # pages [T], then positions [T]
            Arg("num_tokens", "int", "dim"))
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"cdiv(tokens, {APPEND_TOKENS_PER_BLOCK})",),
                     block=(APPEND_TOKENS_PER_BLOCK * 32,), problem=("tokens",))


def decode_layout(row_dim: int, keys: int) -> SharedLayout:
    """The decode kernel's shared memory: Q (64 heads), two K/V tiles, P, the page-entry ring
    (3 tiles) and the row exchange (2 x 64 floats)."""
    return SharedLayout((("sQ", 2 * HEADS_PER_CTA * row_dim), ("sKV", 2 * 2 * keys * row_dim),
                         ("sP", 2 * HEADS_PER_CTA * keys), ("sPg", 4 * 3 * keys), ("sRed", 4 * 2 * HEADS_PER_CTA)))


def wgmma_decode_layout(row_dim: int, keys: int) -> SharedLayout:
    """The wgmma kernel's shared memory, 1024-byte aligned buffers: Q (64 heads), the key stages,
    P (64 x keys), then one small buffer: the tile's factors and the row sums (64 floats each),
    two tiles' page entries and the full / empty mbarriers (room for the fine barriers: a full barrier a
    64-column block and two empty barriers a stage, whichever the plan takes)."""
    aux = 4 * HEADS_PER_CTA * 2 + 4 * 2 * keys + 8 * WGMMA_STAGES * (-(-row_dim // 64) + 2)
    return SharedLayout((("sQ", 2 * HEADS_PER_CTA * row_dim), ("sKV", 2 * WGMMA_STAGES * keys * row_dim),
                         ("sP", 2 * HEADS_PER_CTA * keys), ("sAux", aux)), align=1024)


def wgmma_shared_bytes(row_dim: int, keys: int) -> int:
    """The wgmma kernel's dynamic shared memory: its layout, and 1024 bytes to align its base up to
    (the swizzle reads address bits 7-9)."""
    return wgmma_decode_layout(row_dim, keys).bytes + 1024


def wgmma_serves(latent_dim: int, rope_dim: int, arch: str) -> bool:
    """Whether the Hopper kernel takes these dims on this arch (sm_90: latent halves of whole
    64-column blocks, at most 256 a half, and Q with two stages within shared memory)."""
    if ops.arch_number(arch) != 90 or latent_dim % 128 or latent_dim > 512 or (latent_dim + rope_dim) % 64:
        return False
    return wgmma_shared_bytes(latent_dim + rope_dim, 64) <= smem_limit(arch)


def seesaw_serves(kernel: str, overlap: bool, rope_dim: int) -> bool:
    """Whether a decode plan can take the seesaw schedule: the wgmma kernel without the overlap schedule, and a RoPE part
    of at least one 64-column block (each tile's P goes there)."""
    return kernel == "wgmma" and not overlap and rope_dim >= 64


def seesaw_default() -> bool:
    """Whether the wgmma MLA decode takes the seesaw schedule (LAYERFORGE_MLA_SEESAW=1; off until it has run on a GPU:
    benchmarks/NOTES.md, "MLA decode: the consumers take turns")."""
    return env_switch("LAYERFORGE_MLA_SEESAW", False)


def sync_handoff_serves(kernel: str, seesaw: bool) -> bool:
    """Whether a decode plan can take sync_handoff: the wgmma kernel's default and overlap schedules (the seesaw hands
    over through barriers of its own)."""
    return kernel == "wgmma" and not seesaw


def sync_handoff_default() -> bool:
    """Whether the wgmma MLA decode's consumers hand P, O's factors and the row sums over with a sync on both sides, at
    one barrier instruction both call (LAYERFORGE_MLA_SYNC_HANDOFF=1; off). bar.arrive on the writer's side is ordered
    in PTX's model, but compute-sanitizer's racecheck reports it (benchmarks/probe_racecheck.py); synced on both
    sides it reports none, and at one instruction synccheck none either (two bar.sync sites of one barrier it
    reports as divergent threads): the MLA decode case memcheck, racecheck and synccheck pass clean, which issue 11
    asks (H100). Off: 6 % slower at 64 x 4096 on an H100 (155.5 -> 165.2 us, medians of five turns, bench_mla
    --handoff-ab), the same at 32 x 4096 (benchmarks/NOTES.md, "the synced MLA hand-offs")."""
    return env_switch("LAYERFORGE_MLA_SYNC_HANDOFF", False)


def fine_serves(kernel: str, overlap: bool, seesaw: bool) -> bool:
    """Whether a decode plan can take fine: the wgmma kernel's default schedule (the overlap and seesaw schedules hand
    stages back whole)."""
    return kernel == "wgmma" and not overlap and not seesaw


def pair_serves(kernel: str, overlap: bool, seesaw: bool, fine: bool, num_heads: int, page_size: int) -> bool:
    """Whether a decode plan can take pair: the wgmma kernel's default schedule (not overlap, seesaw or fine), key tiles
    by TMA (pages of at least TMA_MIN_PAGE keys) and an even number of HEADS_PER_CTA-head blocks (the grid's y, which
    the clusters of (1, 2, 1) divide)."""
    return (kernel == "wgmma" and not overlap and not seesaw and not fine and page_size >= TMA_MIN_PAGE
            and -(-num_heads // HEADS_PER_CTA) % 2 == 0)


def pair_default() -> bool:
    """Whether the wgmma MLA decode runs a token's two head blocks as a cluster that reads each key tile from L2 once
    (on; LAYERFORGE_MLA_PAIR=0 turns it off). The two CTAs of a token read the same rows; each copies half of a tile's
    column blocks by TMA multicast into both, so a tile's L2-to-SM traffic halves. At 64 x 4096, 128 heads, on an
    H100, once its stage hand-back lost a GPU-scope fence: isolated calls 147.8 / 147.3 -> 124.8 / 123.5 us,
    back-to-back graph replays at the 700 W cap median 148.6 -> 134.6 / 135.4 us, the SM clock higher at the same
    power (benchmarks/NOTES.md, "The CTA pairs without their GPU-scope fence"). Short splits run unpaired:
    MLADecode's PAIR_MIN_KEYS."""
    return env_switch("LAYERFORGE_MLA_PAIR", True)


def staged_out_default() -> bool:
    """Whether the wgmma MLA decode writes O through shared memory in 16-byte stores (on; LAYERFORGE_MLA_STAGED_OUT=0
    turns it off). From the accumulator fragments a bf16 pair is a 4-byte piece of a row, which NVRTC made two 16-bit
    stores; Nsight Compute put 11 % of the kernel's warp samples on them. Staged: 164.5 / 165.2 -> 151.9 us at
    64 x 4096, 128 heads, on an H100 (benchmarks/NOTES.md, "What bounds the wgmma MLA decode")."""
    return env_switch("LAYERFORGE_MLA_STAGED_OUT", True)


def evict_serves(kernel: str, page_size: int, pair: bool) -> bool:
    """Whether a decode plan can take evict: the wgmma kernel copying full key tiles by TMA (pages of at least
    TMA_MIN_PAGE keys), not the pair (its multicast copies are hinted already)."""
    return kernel == "wgmma" and page_size >= TMA_MIN_PAGE and not pair


def evict_default() -> bool:
    """Whether the wgmma MLA decode's TMA copies of key tiles are hinted L2 evict_first (on; LAYERFORGE_MLA_EVICT=0
    turns it off). A token's head blocks read each key tile at about the same time and never again, so its lines are
    the first L2 should give up. At 64 x 4096, 128 heads, on an H100 (benchmarks/NOTES.md, "The MLA decode's TMA
    copies hinted"): isolated calls 152.7 / 152.2 -> 148.7 / 149.7 us and 135.3 / 134.8 -> 130.2 / 129.7 us (two
    calls), back-to-back graph replays at the card's 700 W power cap median 147.4 -> 141.7 us."""
    return env_switch("LAYERFORGE_MLA_EVICT", True)


def fine_order(latent_dim: int, rope_dim: int) -> list[int]:
    """The 64-column blocks of a cache row in the order the fine schedule copies them and S reads them: consumer 0's
    (its half of the latent, the RoPE blocks; consumer 0 hands them back first), then consumer 1's latent half."""
    half, whole = latent_dim // 128, latent_dim // 64
    return [*range(half), *range(whole, -(-(latent_dim + rope_dim) // 64)), *range(half, whole)]


def fine_default() -> bool:
    """Whether the wgmma MLA decode's stages have a full barrier a 64-column block and an empty barrier a consumer
    (LAYERFORGE_MLA_FINE=1; off until it has run on a GPU: benchmarks/NOTES.md, "What bounds the wgmma MLA
    decode"). S's MMAs start on a column block as its copy lands, and the producer refills consumer 0's blocks
    (its V half, the RoPE blocks) once consumer 0 is done, not once both are: FlashMLA's per-block TMA barriers."""
    return env_switch("LAYERFORGE_MLA_FINE", False)


def smem_limit(arch: str) -> int:
    return ops.shared_limit(arch)


def plan_mla_decode(*, num_heads: int, latent_dim: int = 512, rope_dim: int = 64, page_size: int = 64,
                    dtype: str = "bf16", arch: str, keys: int | None = None, kernel: str | None = None,
                    overlap: bool = False, seesaw: bool | None = None,
                    sync_handoff: bool | None = None, fine: bool | None = None,
                    pair: bool | None = None, staged_out: bool | None = None,
                    evict: bool | None = None) -> MLADecodePlan:
    """The decode plan. kernel: "wgmma" (the default on sm_90 where `wgmma_serves`; built for
    sm_90a) or "mma". The mma kernel's keys per tile default to 64 where shared memory holds Q and
    two such tiles (sm_90: 225 KB at 512 + 64 channels; a warp's Q fragments then serve 32 keys,
    not 16: 17 % less shared-memory traffic a key, which bounds the kernel), else 32 (sm_80's 163 KB).
    seesaw (the wgmma kernel; None: seesaw_default() where the plan can take it): the consumers take turns.
    sync_handoff (the wgmma kernel without the seesaw; None: sync_handoff_default()): a sync on both sides of the
    consumers' hand-offs, at one barrier instruction (the sanitizer-clean schedule).
    fine (the wgmma kernel's default schedule; None: fine_default()): a stage's barriers per column block and
    consumer. pair (None: pair_default() where pair_serves and evict is None): a token's two head blocks a cluster
    sharing each tile.
    staged_out (the wgmma kernel; None: staged_out_default()): O out through shared memory in 16-byte stores.
    evict (None: evict_default() where evict_serves): the key tiles' TMA copies hinted L2 evict_first."""
    if kernel is None:
        kernel = "wgmma" if keys in (None, 64) and wgmma_serves(latent_dim, rope_dim, arch) else "mma"
    if kernel == "wgmma":
        keys = 64 if keys is None else keys
        arch = "sm_90a" if ops.arch_number(arch) == 90 else arch
    if keys is None:
        keys = 64 if decode_layout(latent_dim + rope_dim, 64).bytes <= smem_limit(arch) else 32
    if seesaw is None:
        seesaw = seesaw_serves(kernel, overlap, rope_dim) and seesaw_default()
    if sync_handoff is None:
        sync_handoff = sync_handoff_serves(kernel, seesaw) and sync_handoff_default()
    if fine is None:
        fine = fine_serves(kernel, overlap, seesaw) and fine_default()
    if pair is None:   # asked for evict, the hints of the unpaired kernel's copies: that kernel
        pair = pair_serves(kernel, overlap, seesaw, fine, num_heads, page_size) and evict is None and pair_default()
    if staged_out is None:
        staged_out = kernel == "wgmma" and staged_out_default()
    if evict is None:
        evict = evict_serves(kernel, page_size, pair) and evict_default()
    plan = MLADecodePlan(num_heads=num_heads, latent_dim=latent_dim, rope_dim=rope_dim, page_size=page_size,
                         dtype=dtype, keys=keys, arch=arch, kernel=kernel, overlap=overlap, seesaw=seesaw,
                         sync_handoff=sync_handoff, fine=fine, pair=pair, staged_out=staged_out,
                         evict=evict)
    plan.source()
    return plan


def plan_mla_append(*, latent_dim: int = 512, rope_dim: int = 64, page_size: int = 64, dtype: str = "bf16",
                    rope: RopeSpec, arch: str) -> MLAAppendPlan:
    """The append plan for a latent cache; `rope` is the block's RopeSpec: interleaved pairs (gptj,
    as DeepSeek's rope_interleave) over rotary_dim = rope_dim channels."""
    if rope.style != "gptj":
        raise LoweringError(f"mla append: RoPE style {rope.style!r}; the latent cache rotates interleaved pairs (gptj)")
    if int(rope.rotary_dim) != rope_dim:
        raise ValueError(f"mla append: the RoPE rotates {rope.rotary_dim} channels, the cache has {rope_dim}")
    plan = MLAAppendPlan(latent_dim=latent_dim, rope_dim=rope_dim, page_size=page_size, dtype=dtype,
                         rope_theta=float(rope.theta), rope_scaling=rope.scaling, arch=arch)
    plan.source()
    return plan
