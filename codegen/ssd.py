"""Mamba2's SSD (state-space duality) kernels: the chunked scan of a prefill in three launches and
the one-token state update of decode (runtime/ssd.py holds the references and launches them).

    state  = plan_ssd_chunk_state(heads=80, head_dim=64, groups=1, state=128, chunk=256, dtype="bf16")
             'ssd_chunk_state_h80_p64_g1_n128_q256_bf16_bias_softplus_sm90'
    passes = plan_ssd_state_passing(heads=80, head_dim=64, state=128, dtype="bf16", initial=True)
             'ssd_state_passing_h80_p64_n128_bf16_init_sm90'
    scan   = plan_ssd_chunk_scan(heads=80, head_dim=64, groups=1, state=128, chunk=256, dtype="bf16", skip=True)
             'ssd_chunk_scan_h80_p64_g1_n128_q256_bf16_bias_softplus_d_sm90'
    step   = plan_ssd_state_update(heads=80, head_dim=64, groups=1, state=128, dtype="bf16", skip=True)
             'ssd_state_update_h80_p64_g1_n128_bf16_bias_softplus_d_rb4_sm90'

Per head h (group g = h // (H / G)), token l of chunk c (Q tokens; the tokens past L act as dt = 0):
    dt_l = clamp(softplus(dt_l + dt_bias), lo, hi),  s_l = sum_{j <= l} dt_j A   (templates/cuda/ssd_common)
  chunk state    S_c[p, n] = sum_l x[l, p] (exp(s_last - s_l) dt_l) B[l, n]      a P x N x Q product
                 (x^T scaled along l, then B, on tensor cores), and s_last of each chunk
  state passing  h_0 = initial state (or 0); start_c = h_c; h_c+1 = exp(s_last,c) h_c + S_c, per
                 element, sequential over the chunks; h_nc is the final state (float32), the starts
                 are stored in the input dtype as the scan's tensor-core operand
  chunk scan     y[l, p] = exp(s_l) sum_n C[l, n] start_c[p, n]
                         + sum_{j <= l} (C_l . B_j) exp(s_l - s_j) dt_j x[j, p]  (+ D x[l, p], * silu(z))
                 flash-attention's shape without the softmax: a warp's 16 rows of C times B^T of a
                 key tile, the decay and dt applied in registers, the tile as the A operand of the
                 product with X.
  state update   one token per (sequence, head): h = exp(dt A) h + dt x B^T in place (float32),
                 y = h C (+ D x, * silu(z)); memory-bound: float4 rows of h, lanes split N.
bf16 and f16 run on mma.sync m16n8k16 (sm_80+, f32 accumulation); f32 inputs run the same tiles
on CUDA cores. The tile splits are plain data here (`state_split`, `scan_rows`, `update_split`),
checked on the CPU by tests/codegen/test_ssd_compile.py and emitted by the templates.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from ..dsl.types import DType
from . import ops
from .abi import Arg, KernelABI, SharedLayout
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["SSDChunkStatePlan", "SSDStatePassingPlan", "SSDChunkScanPlan", "SSDChunkCBPlan", "SSDStateUpdatePlan",
           "plan_ssd_chunk_state", "plan_ssd_state_passing", "plan_ssd_chunk_scan", "plan_ssd_chunk_cb",
           "plan_ssd_state_update", "cb_table_default",
           "state_split", "scan_rows", "update_split", "DTYPES", "THREADS", "MAX_HEAD_DIM", "MAX_STATE", "MAX_CHUNK"]

DTYPES = ("bf16", "f16", "f32")
THREADS = 128          # the chunk kernels' block: 4 warps (the same count in both, so both sum s_l alike)
PASS_THREADS = 256     # the state passing's block: a float4 of a state each
UPDATE_THREADS = 128
# The state update's launch shape: a head's P rows split over blocks of UPDATE_ROWS rows (at least
# a pass of the block's warps); more, smaller blocks leave less of a last wave (H200, Mamba2-2.7B at
# batch 64: 64 / 32 / 16 rows a block 128.7 / 127.8 / 125.4 us a mixer step).
UPDATE_ROWS = 16
MAX_HEAD_DIM = 128     # P: a warp's rows of y (P / 8 accumulator tiles of 4 floats)
MAX_STATE = 256        # N
MAX_CHUNK = 256        # Q: the chunk's dt and s_l live in shared memory
ROW_TILE = 64          # the scan's rows (and key tile) per block; smaller chunks use the chunk
ACC_FLOATS = 64        # accumulator floats a thread of the chunk-state product keeps
PAD = 8                # elements after each shared-memory row: ldmatrix's 8 rows fall in distinct banks





def _check(what: str, arch: str, dtype: str, ints: dict[str, int], flags: dict[str, bool]) -> None:
    for name, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{what}: {name} must be a bool, got {v!r}")
    if dtype not in DTYPES:
        raise ValueError(f"{what}: dtype must be one of {DTYPES}, got {dtype!r}")
    if ops.arch_number(arch) < 80:
        raise ValueError(f"{what}: the kernels need sm_80 or newer (cp.async, mma.sync), not {arch}")
    heads, groups = ints.get("heads"), ints.get("groups")
    if groups is not None and heads is not None and heads % groups:
        raise ValueError(f"{what}: the {heads} heads must split evenly over the {groups} groups")
    p, n = ints.get("head_dim"), ints.get("state")
    if p is not None and (p % 16 or p > MAX_HEAD_DIM):
        raise ValueError(f"{what}: head_dim = {p} must be a multiple of 16 up to {MAX_HEAD_DIM}")
    if n is not None and (n % 16 or n > MAX_STATE):
        raise ValueError(f"{what}: state = {n} must be a multiple of 16 up to {MAX_STATE}")
    q = ints.get("chunk")
    if q is not None and (q > MAX_CHUNK or (q % ROW_TILE if q > ROW_TILE else q % 16)):
        raise ValueError(f"{what}: chunk = {q} must be a multiple of 16 up to {ROW_TILE}, or of {ROW_TILE} "
                         f"up to {MAX_CHUNK}")


def _check_shared(what: str, plan) -> None:
    if plan.shared.bytes > _smem_limit(plan.arch):
        raise ValueError(f"{what}: {plan.shared.bytes} bytes of shared memory, more than {plan.arch} gives a block")


def _check_score_table(what: str, dtype: str) -> None:
    if dtype == "f32":
        raise ValueError(f"{what}: the score table serves the tensor-core kernels (bf16 / f16), not f32")


def _smem_limit(arch: str) -> int:
    return ops.shared_limit(arch)


# ---- the tile splits, as data ----------------------------------------------------------------
def state_split(head_dim: int, state: int) -> dict[str, int]:
    """The chunk-state product's split: the P x N state of a (chunk, head) over a block's 4 warps
    as WM x WN warps (WM along P, 16-row tiles; WN along N, 16-column pairs of 8-wide tiles), each
    warp MT row tiles by NTW column tiles; a block takes NB columns of N (the grid splits N in
    N / NB blocks) so a thread keeps at most ACC_FLOATS accumulators. Warps past WM x WN only load."""
    ptiles = head_dim // 16
    wm = min(4, ptiles)
    while ptiles % wm:
        wm -= 1
    mt = ptiles // wm
    nb = state
    while True:
        wn = max(1, min(4 // wm, nb // 16))
        while (nb // 16) % wn:
            wn -= 1
        ntw = nb // 8 // wn
        if mt * ntw * 4 <= ACC_FLOATS or nb % 32:
            break
        nb //= 2
    return {"wm": wm, "wn": wn, "mt": mt, "ntw": ntw, "nb": nb, "nsplit": state // nb}


def scan_rows(chunk: int, dtype: str) -> int:
    """Rows of y (and keys a tile) per chunk-scan block, and tokens a key tile of the chunk state:
    ROW_TILE (half of it for f32, whose tiles take twice the bytes), or the whole chunk when shorter,
    a divisor of the chunk in steps of 16. A block of chunk c, row tile r computes rows r * rows ..
    of it from key tiles 0 .. r."""
    r = min(chunk, ROW_TILE // 2 if dtype == "f32" else ROW_TILE)
    while chunk % r:
        r -= 16
    return r


def update_split(state: int) -> dict[str, int]:
    """The state update's lanes: a row of N floats as N / 4 float4 vectors over LPR lanes (a power of
    two up to 32), VPL vectors a lane; a warp covers 32 / LPR rows a pass."""
    vecs = state // 4
    lpr = 32
    while vecs % lpr:
        lpr //= 2
    return {"lpr": lpr, "vpl": vecs // lpr, "rows_per_warp": 32 // lpr}


# ---- plans -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _ChunkPlan(KernelPlan):
    heads: int
    head_dim: int
    groups: int
    state: int
    chunk: int
    dtype: str
    dt_bias: bool = True
    softplus: bool = True
    arch: str = "sm_90"

    def _checked(self, what: str, **flags: bool) -> None:
        _check(what, self.arch, self.dtype, {"heads": self.heads, "head_dim": self.head_dim, "groups": self.groups,
                                             "state": self.state, "chunk": self.chunk},
               {"dt_bias": self.dt_bias, "softplus": self.softplus, **flags})
        _check_shared(what, self)

    def _dims_key(self) -> str:
        return (f"h{self.heads}_p{self.head_dim}_g{self.groups}_n{self.state}_q{self.chunk}_{self.dtype}"
                + "_bias" * self.dt_bias + "_softplus" * self.softplus)

    @property
    def shared(self) -> SharedLayout:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class SSDChunkStatePlan(_ChunkPlan):
    """x [Bt, L, H, P], dt [Bt, L, H], A f32 [H], B [Bt, L, G, N] (+ dt_bias f32 [H]) -> states f32
    [Bt, nc, H, P, N] (each chunk's own contribution) and s_last f32 [Bt, H, nc]."""

    family: ClassVar[str] = "ssd_chunk_state"

    def __post_init__(self):
        self._checked("ssd chunk state")

    @property
    def key(self) -> str:
        return f"ssd_chunk_state_{self._dims_key()}_{ops.arch_key(self.arch)}"

    @property
    def shared(self) -> SharedLayout:
        """Two stages of an x tile [KT][P + PAD] and a B tile [KT][NB + PAD]; the chunk's dt and
        s_l (Q floats each), the scale exp(s_last - s_l) dt_l, and the cumulative sum's warp totals."""
        kt, nb, es = scan_rows(self.chunk, self.dtype), state_split(self.head_dim, self.state)["nb"], DType[self.dtype].itemsize
        return SharedLayout(buffers=(("x", 2 * kt * (self.head_dim + PAD) * es), ("b", 2 * kt * (nb + PAD) * es),
                                     ("dt", self.chunk * 4), ("cs", self.chunk * 4), ("w", self.chunk * 4),
                                     ("warps", 32 * 4)))

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_chunk_state_abi(self),)

    def source(self) -> str:
        return _chunk_state_source(self)

    def describe(self) -> dict[str, Any]:
        return {"heads": self.heads, "head_dim": self.head_dim, "groups": self.groups, "state": self.state,
                "chunk": self.chunk, "dtype": self.dtype, "dt_bias": self.dt_bias, "softplus": self.softplus}


@dataclass(frozen=True, kw_only=True)
class SSDChunkScanPlan(_ChunkPlan):
    """x, dt, A, B, C [Bt, L, G, N], start [Bt, nc, H, P, N] (in the inputs' dtype) (+ dt_bias, D f32
    [H], z [Bt, L, H, P]) -> y [Bt, L, H, P] contiguous. cb_table (bf16 / f16): the scores C . B^T read
    from cb f32 [Bt, nc, G, Q, Q] (SSDChunkCBPlan's, once per group) in place of B: no B tiles, no
    score products in each head's blocks."""

    family: ClassVar[str] = "ssd_chunk_scan"
    skip: bool = False     # + D x
    gate: bool = False     # * silu(z)
    cb_table: bool = False

    def __post_init__(self):
        self._checked("ssd chunk scan", skip=self.skip, gate=self.gate, cb_table=self.cb_table)
        if self.cb_table:
            _check_score_table("ssd chunk scan", self.dtype)

    @property
    def key(self) -> str:
        return (f"ssd_chunk_scan_{self._dims_key()}" + "_d" * self.skip + "_z" * self.gate + "_cb" * self.cb_table
                + f"_{ops.arch_key(self.arch)}")

    @property
    def shared(self) -> SharedLayout:
        """The block's C rows [R][N + PAD] (after the key loop the block's rows of y [R][N + PAD],
        tensor cores only: as wide as P where P > N), the chunk's start state [P][N + PAD], two stages of
        a key tile of B [R][N + PAD] and of x [R][P + PAD]; dt and s_l of the chunk, the cumulative
        sum's warp totals; f32 inputs also stage the masked score tile [R][R + 1] (CUDA cores)."""
        r, es, p, n = scan_rows(self.chunk, self.dtype), DType[self.dtype].itemsize, self.head_dim, self.state
        cw = n if self.dtype == "f32" else max(n, p)
        bufs = [("c", r * (cw + PAD) * es), ("h", p * (n + PAD) * es),
                *((("b", 2 * r * (n + PAD) * es),) if not self.cb_table else ()),
                ("x", 2 * r * (p + PAD) * es), ("dt", self.chunk * 4), ("cs", self.chunk * 4), ("warps", 32 * 4)]
        if self.dtype == "f32":
            bufs.append(("m", r * (r + 1) * 4))
        return SharedLayout(buffers=tuple(bufs))

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_chunk_scan_abi(self),)

    def source(self) -> str:
        return _chunk_scan_source(self)

    def describe(self) -> dict[str, Any]:
        return {"heads": self.heads, "head_dim": self.head_dim, "groups": self.groups, "state": self.state,
                "chunk": self.chunk, "dtype": self.dtype, "dt_bias": self.dt_bias, "softplus": self.softplus,
                "skip": self.skip, "gate": self.gate, **({"cb_table": True} if self.cb_table else {})}


@dataclass(frozen=True, kw_only=True)
class SSDChunkCBPlan(KernelPlan):
    """B, C [Bt, L, G, N] (bf16 / f16) -> cb f32 [Bt, nc, G, Q, Q]: each chunk's scores C_l . B_j, once per
    group, for the chunk scan's cb_table form (row tile r's rows over the keys of tiles 0 .. r: the
    places that form reads)."""

    family: ClassVar[str] = "ssd_chunk_cb"
    groups: int
    state: int
    chunk: int
    dtype: str
    arch: str = "sm_90"

    def __post_init__(self):
        _check("ssd chunk scores", self.arch, self.dtype, {"groups": self.groups, "state": self.state,
                                                           "chunk": self.chunk}, {})
        _check_score_table("ssd chunk scores", self.dtype)
        _check_shared("ssd chunk scores", self)

    @property
    def key(self) -> str:
        return f"ssd_chunk_cb_g{self.groups}_n{self.state}_q{self.chunk}_{self.dtype}_{ops.arch_key(self.arch)}"

    @property
    def shared(self) -> SharedLayout:
        """The block's C rows [R][N + PAD] and two stages of a key tile of B [R][N + PAD]."""
        r, es, n = scan_rows(self.chunk, self.dtype), DType[self.dtype].itemsize, self.state
        return SharedLayout(buffers=(("c", r * (n + PAD) * es), ("b", 2 * r * (n + PAD) * es)))

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_chunk_cb_abi(self),)

    def source(self) -> str:
        return _chunk_cb_source(self)

    def describe(self) -> dict[str, Any]:
        return {"groups": self.groups, "state": self.state, "chunk": self.chunk, "dtype": self.dtype}


def cb_table_default() -> bool:
    """Whether the chunked scan (bf16 / f16) computes each chunk's scores C . B^T once per group into a table
    (SSDChunkCBPlan) that every head's chunk-scan blocks read (SSDChunkScanPlan.cb_table), instead of each
    head computing them again (80 x the work at Mamba2-2.7B's one group). On by default: measured on an H200
    (benchmarks/NOTES.md), Mamba2-2.7B prefill 1 x 8192 629 -> 484 us, 8 x 2048 1242 -> 939 us, the same bits
    as the computing form. LAYERFORGE_SSD_CB=0 turns it off."""
    from .plan import env_switch
    return env_switch("LAYERFORGE_SSD_CB", True)


@dataclass(frozen=True, kw_only=True)
class SSDStatePassingPlan(KernelPlan):
    """states f32 [Bt, nc, H, P, N], s_last f32 [Bt, H, nc] (+ initial f32 [Bt, H, P, N]) -> start
    [Bt, nc, H, P, N] in the dtype, final f32 [Bt, H, P, N]."""

    family: ClassVar[str] = "ssd_state_passing"
    heads: int
    head_dim: int
    state: int
    dtype: str
    initial: bool = False
    arch: str = "sm_90"

    def __post_init__(self):
        _check("ssd state passing", self.arch, self.dtype, {"heads": self.heads, "head_dim": self.head_dim,
                                                            "state": self.state}, {"initial": self.initial})

    @property
    def key(self) -> str:
        return (f"ssd_state_passing_h{self.heads}_p{self.head_dim}_n{self.state}_{self.dtype}"
                + "_init" * self.initial + f"_{ops.arch_key(self.arch)}")

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_passing_abi(self),)

    def source(self) -> str:
        return _passing_source(self)

    def describe(self) -> dict[str, Any]:
        return {"heads": self.heads, "head_dim": self.head_dim, "state": self.state, "dtype": self.dtype,
                "initial": self.initial}


@dataclass(frozen=True, kw_only=True)
class SSDStateUpdatePlan(KernelPlan):
    """state f32 [Bt, H, P, N] (in place), x [Bt, H, P], dt [Bt, H], A f32 [H], B, C [Bt, G, N]
    (+ dt_bias, D f32 [H], z [Bt, H, P]) -> y [Bt, H, P] contiguous. params: the per-head vectors'
    dtype ("f32", or the inputs' dtype: a model's parameters read as they are, no cast per step);
    a_log: A is given as A_log and the kernel takes A = -exp(A_log) (as the mixers hold it)."""

    family: ClassVar[str] = "ssd_state_update"
    heads: int
    head_dim: int
    groups: int
    state: int
    dtype: str
    dt_bias: bool = True
    softplus: bool = True
    skip: bool = False
    gate: bool = False
    params: str = "f32"
    a_log: bool = False
    row_blocks: int = 1          # blocks a head's P rows are split over (plan_ssd_state_update: UPDATE_ROWS)
    arch: str = "sm_90"

    def __post_init__(self):
        if isinstance(self.row_blocks, bool) or not isinstance(self.row_blocks, int) or self.row_blocks < 1 \
                or self.head_dim % self.row_blocks:
            raise ValueError(f"ssd state update: row_blocks {self.row_blocks!r} must be a positive int dividing "
                             f"head_dim {self.head_dim}")
        _check("ssd state update", self.arch, self.dtype, {"heads": self.heads, "head_dim": self.head_dim,
                                                           "groups": self.groups, "state": self.state},
               {"dt_bias": self.dt_bias, "softplus": self.softplus, "skip": self.skip, "gate": self.gate,
                "a_log": self.a_log})
        if self.params not in ("f32", self.dtype):
            raise ValueError(f"ssd state update: params must be 'f32' or the dtype {self.dtype!r}, got {self.params!r}")

    @property
    def key(self) -> str:
        return (f"ssd_state_update_h{self.heads}_p{self.head_dim}_g{self.groups}_n{self.state}_{self.dtype}"
                + "_bias" * self.dt_bias + "_softplus" * self.softplus + "_d" * self.skip + "_z" * self.gate
                + (f"_p{self.params}" if self.params != "f32" else "") + "_alog" * self.a_log
                + (f"_rb{self.row_blocks}" if self.row_blocks > 1 else "") + f"_{ops.arch_key(self.arch)}")

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_update_abi(self),)

    def source(self) -> str:
        return _update_source(self)

    def describe(self) -> dict[str, Any]:
        return {"heads": self.heads, "head_dim": self.head_dim, "groups": self.groups, "state": self.state,
                "dtype": self.dtype, "dt_bias": self.dt_bias, "softplus": self.softplus, "skip": self.skip,
                "gate": self.gate, "params": self.params, "a_log": self.a_log, "row_blocks": self.row_blocks}


def plan_ssd_chunk_state(*, heads: int, head_dim: int, groups: int, state: int, chunk: int, dtype: str,
                         dt_bias: bool = True, softplus: bool = True, arch: str = "sm_90") -> SSDChunkStatePlan:
    return SSDChunkStatePlan(heads=heads, head_dim=head_dim, groups=groups, state=state, chunk=chunk, dtype=dtype,
                             dt_bias=dt_bias, softplus=softplus, arch=arch)


def plan_ssd_chunk_scan(*, heads: int, head_dim: int, groups: int, state: int, chunk: int, dtype: str,
                        dt_bias: bool = True, softplus: bool = True, skip: bool = False, gate: bool = False,
                        cb_table: bool = False, arch: str = "sm_90") -> SSDChunkScanPlan:
    return SSDChunkScanPlan(heads=heads, head_dim=head_dim, groups=groups, state=state, chunk=chunk, dtype=dtype,
                            dt_bias=dt_bias, softplus=softplus, skip=skip, gate=gate, cb_table=cb_table, arch=arch)


def plan_ssd_chunk_cb(*, groups: int, state: int, chunk: int, dtype: str, arch: str = "sm_90") -> SSDChunkCBPlan:
    return SSDChunkCBPlan(groups=groups, state=state, chunk=chunk, dtype=dtype, arch=arch)


def plan_ssd_state_passing(*, heads: int, head_dim: int, state: int, dtype: str, initial: bool = False,
                           arch: str = "sm_90") -> SSDStatePassingPlan:
    return SSDStatePassingPlan(heads=heads, head_dim=head_dim, state=state, dtype=dtype, initial=initial, arch=arch)


def plan_ssd_state_update(*, heads: int, head_dim: int, groups: int, state: int, dtype: str, dt_bias: bool = True,
                          softplus: bool = True, skip: bool = False, gate: bool = False, params: str = "f32",
                          a_log: bool = False, row_blocks: int | None = None,
                          arch: str = "sm_90") -> SSDStateUpdatePlan:
    """row_blocks None: blocks of UPDATE_ROWS rows (at least one pass of the block's warps) where
    they divide head_dim, else one block a head."""
    if row_blocks is None:
        rows = max(UPDATE_ROWS, UPDATE_THREADS // 32 * update_split(state)["rows_per_warp"])
        row_blocks = head_dim // rows if head_dim % rows == 0 and head_dim > rows else 1
    return SSDStateUpdatePlan(heads=heads, head_dim=head_dim, groups=groups, state=state, dtype=dtype,
                              dt_bias=dt_bias, softplus=softplus, skip=skip, gate=gate, params=params, a_log=a_log,
                              row_blocks=row_blocks, arch=arch)


# ---- ABIs and sources ------------------------------------------------------------------------
_F32_IN, _F32_OUT = "const float* __restrict__", "float* __restrict__"


def _strided(name: str, t: str) -> tuple[Arg, ...]:
    """A [Bt, L, ...] input read through its batch and token strides (elements; the rest contiguous)."""
    return (Arg(name, f"const {t}* __restrict__", "input"), Arg(f"{name}_sb", "long long", "dim"),
            Arg(f"{name}_sl", "long long", "dim"))


def _step_args(plan, vec: str = _F32_IN) -> tuple[Arg, ...]:
    """A [H], then dt_bias [H] when the plan adds it, then the clamp of the step; vec: the
    vectors' C type."""
    return (Arg("A", vec, "input"), *((Arg("dt_bias", vec, "input"),) if plan.dt_bias else ()),
            Arg("dt_lo", "float", "scalar"), Arg("dt_hi", "float", "scalar"))


def _chunk_grid(plan, split: int = 1) -> tuple[str, str, str]:
    return (f"nc * {split}" if split > 1 else "nc", str(plan.heads), "batch")


@functools.lru_cache(maxsize=64)
def _chunk_state_abi(plan: SSDChunkStatePlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (*_strided("x", t), *_strided("dt", t), *_strided("B", t), *_step_args(plan),
            Arg("states", _F32_OUT, "workspace"), Arg("s_last", _F32_OUT, "workspace"),
            Arg("seqlen", "int", "dim"), Arg("nc", "int", "dim"))
    split = state_split(plan.head_dim, plan.state)["nsplit"]
    return KernelABI(name=plan.kernel_name, args=args, grid=_chunk_grid(plan, split), block=(THREADS,),
                     shared_bytes=plan.shared.bytes, problem=("nc", "batch"))


def _common_variables(plan) -> dict[str, Any]:
    return dict(kernel_name=plan.kernel_name, plan_key=plan.key, common=read_template("cuda/common.cuh"),
                signature=plan.abi.signature, T=ops.storage_ctype(plan.dtype), MMA=plan.dtype != "f32",
                MMA_T=plan.dtype if plan.dtype != "f32" else "bf16", H=plan.heads, P=plan.head_dim,
                N=plan.state, threads=THREADS)


def _chunk_variables(plan: _ChunkPlan) -> dict[str, Any]:
    return dict(_common_variables(plan), G=plan.groups, Q=plan.chunk, R=scan_rows(plan.chunk, plan.dtype), PAD=PAD,
                bias=plan.dt_bias, softplus=plan.softplus, smem=plan.shared.offsets)


@functools.lru_cache(maxsize=64)
def _chunk_state_source(plan: SSDChunkStatePlan) -> str:
    return render("cuda/ssd_chunk_state.cu.jinja", **_chunk_variables(plan),
                  split=state_split(plan.head_dim, plan.state))


@functools.lru_cache(maxsize=64)
def _chunk_scan_abi(plan: SSDChunkScanPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (*_strided("x", t), *_strided("dt", t), *(_strided("B", t) if not plan.cb_table else ()),
            *_strided("C", t), *((_strided("z", t)) if plan.gate else ()), *_step_args(plan),
            *((Arg("D", _F32_IN, "input"),) if plan.skip else ()),
            Arg("start", f"const {t}* __restrict__", "workspace"),
            *((Arg("cb", _F32_IN, "workspace"),) if plan.cb_table else ()),
            Arg("y", f"{t}* __restrict__", "output", "0"), Arg("seqlen", "int", "dim"), Arg("nc", "int", "dim"))
    tiles = plan.chunk // scan_rows(plan.chunk, plan.dtype)
    return KernelABI(name=plan.kernel_name, args=args, grid=_chunk_grid(plan, tiles), block=(THREADS,),
                     shared_bytes=plan.shared.bytes, problem=("nc", "batch"))


@functools.lru_cache(maxsize=64)
def _chunk_scan_source(plan: SSDChunkScanPlan) -> str:
    # sm_8x: the blocks shared memory lets an SM hold as the launch bound's minimum (one at Mamba2's
    # sizes): NVRTC 13.0's ptxas otherwise caps the gated kernel at 96 registers and spills 4 bytes
    # for an occupancy shared memory never allows (sm_90 keeps its measured code: no minimum)
    min_blocks = max(1, _smem_limit(plan.arch) // plan.shared.bytes) if ops.arch_number(plan.arch) < 90 else None
    if min_blocks and plan.cb_table:   # its smaller shared memory would ask for more blocks than 128 registers allow
        min_blocks = min(min_blocks, 65536 // (THREADS * 128))
    return render("cuda/ssd_chunk_scan.cu.jinja", **_chunk_variables(plan), skip=plan.skip, gate=plan.gate,
                  tiles=plan.chunk // scan_rows(plan.chunk, plan.dtype), min_blocks=min_blocks, CB=plan.cb_table)


@functools.lru_cache(maxsize=64)
def _chunk_cb_abi(plan: SSDChunkCBPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (*_strided("B", t), *_strided("C", t), Arg("cb", _F32_OUT, "workspace"), Arg("seqlen", "int", "dim"),
            Arg("nc", "int", "dim"))
    tiles = plan.chunk // scan_rows(plan.chunk, plan.dtype)
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"nc * {tiles}", str(plan.groups), "batch"),
                     block=(THREADS,), shared_bytes=plan.shared.bytes, problem=("nc", "batch"))


@functools.lru_cache(maxsize=64)
def _chunk_cb_source(plan: SSDChunkCBPlan) -> str:
    return render("cuda/ssd_chunk_cb.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key,
                  common=read_template("cuda/common.cuh"), signature=plan.abi.signature,
                  T=ops.storage_ctype(plan.dtype), MMA_T=plan.dtype, N=plan.state, G=plan.groups, Q=plan.chunk,
                  R=scan_rows(plan.chunk, plan.dtype), tiles=plan.chunk // scan_rows(plan.chunk, plan.dtype), PAD=PAD,
                  smem=plan.shared.offsets, threads=THREADS)


@functools.lru_cache(maxsize=64)
def _passing_abi(plan: SSDStatePassingPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (Arg("states", _F32_IN, "workspace"), Arg("s_last", _F32_IN, "workspace"),
            *((Arg("initial", _F32_IN, "input"),) if plan.initial else ()),
            Arg("start", f"{t}* __restrict__", "workspace"), Arg("final_state", _F32_OUT, "output", "1"),
            Arg("nc", "int", "dim"))
    vecs = plan.head_dim * plan.state // 4
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"cdiv({vecs}, {PASS_THREADS})", str(plan.heads), "batch"),
                     block=(PASS_THREADS,), problem=("batch",))


@functools.lru_cache(maxsize=64)
def _passing_source(plan: SSDStatePassingPlan) -> str:
    return render("cuda/ssd_state_passing.cu.jinja", **_common_variables(plan), initial=plan.initial,
                  pass_threads=PASS_THREADS, vecs=plan.head_dim * plan.state // 4)


@functools.lru_cache(maxsize=64)
def _update_abi(plan: SSDStateUpdatePlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    vec = _F32_IN if plan.params == "f32" else f"const {t}* __restrict__"

    def row(name):   # a [Bt, ...] input read through its batch stride
        return (Arg(name, f"const {t}* __restrict__", "input"), Arg(f"{name}_sb", "long long", "dim"))
    args = (Arg("state", "float* __restrict__", "input"), *row("x"), *row("dt"), *row("B"), *row("C"),
            *(row("z") if plan.gate else ()), *_step_args(plan, vec),
            *((Arg("D", vec, "input"),) if plan.skip else ()),
            Arg("y", f"{t}* __restrict__", "output", "0"))
    return KernelABI(name=plan.kernel_name, args=args, grid=(str(plan.heads * plan.row_blocks), "batch"),
                     block=(UPDATE_THREADS,),
                     problem=("batch",))


@functools.lru_cache(maxsize=64)
def _update_source(plan: SSDStateUpdatePlan) -> str:
    return render("cuda/ssd_state_update.cu.jinja", **_common_variables(plan), G=plan.groups, bias=plan.dt_bias,
                  softplus=plan.softplus, skip=plan.skip, gate=plan.gate, split=update_split(plan.state),
                  warps=UPDATE_THREADS // 32, own_params=plan.params != "f32", a_log=plan.a_log,
                  row_blocks=plan.row_blocks)
