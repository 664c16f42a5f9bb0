"""The scan family: Mamba (v1)'s causal depthwise convolution and selective scan, prefill and
decode, as four generated kernels specialised per (channels, state size, width, dtypes, options, arch).

    conv   = plan_conv(channels=5120, width=4, dtype="bf16", silu=True, bias="bf16")
                                                     'scan_conv_d5120_k4_bf16_wbf16_bbf16_silu_sm90'
    step   = plan_conv_update(channels=5120, width=4, dtype="bf16", silu=True, bias="bf16")
    scan   = plan_selective_scan(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32",
                                 bias_dtype="f32", gate=True, softplus=True)
    update = plan_state_update(channels=5120, state=16, dtype="bf16", a_dtype="f32", ...)

Layouts are transformers' MambaMixer's (runtime/scan.py defines the semantics and holds the
references): x, u, delta, z [B, D, L]; B, C [B, N, L]; A [D, N]; the SSM state f32 [B, D, N];
the conv state [B, D, K - 1] (prefill in / out) or [B, D, K] (decode, in place, newest last).

  conv          one block of CONV_THREADS threads a (row b*D + d, tile of CONV_TILE steps); thread
                i computes steps tile + i, tile + i + CONV_THREADS, ... (a warp's loads coalesce);
                the K taps of a step read x (or the initial state before t = 0) through L1.
  conv_update   one thread a channel: shift its K-wide state left, put x last, dot with the taps.
  scan          one block a row (b, d), `threads` threads of `items` consecutive steps each: a chunk
                of threads * items steps at a time, the state carried between chunks. For each state
                n: every thread folds its items' pairs (a_t, b_t) = (exp(dt_t A[d, n]), dt_t B[n, t] u_t)
                into one, the block scans the threads' pairs (warp shuffles, then the warps' totals in
                shared memory), each thread starts from h_in = A_pre * carry + B_pre and replays its
                items, adding h_t C[n, t] to its outputs; the last thread's h is the next chunk's carry.
                The combine is (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2). `chunked_scan` below runs
                the same schedule on the CPU (tests/codegen/test_scan_compile.py checks it).
  state_update  `lanes` threads a channel, each `per_lane` states (state_split), the output summed
                over the channel's lanes with xor shuffles.

Inputs are bf16, f16 or f32; A, D and the Δ bias (and the conv's weight and bias) each f32 or the
input dtype; every sum and the state in f32.
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

__all__ = ["not_lowered_reason", "scan_parts", "scan_tilings", "ConvPlan", "ConvUpdatePlan", "conv_update_vectorizable", "SelectiveScanPlan", "StateUpdatePlan", "plan_conv", "plan_conv_update",
           "plan_selective_scan", "plan_state_update", "state_split", "scan_tiles", "chunked_scan", "DTYPES", "WIDTHS",
           "CONV_THREADS", "CONV_TILE", "SCAN_THREADS", "SCAN_ITEMS", "MAX_STATE", "UPDATE_THREADS"]

DTYPES = ("bf16", "f16", "f32")
WIDTHS = (2, 3, 4)
CONV_THREADS = 128
CONV_PER_THREAD = 4
CONV_TILE = CONV_THREADS * CONV_PER_THREAD   # steps of a conv block
CONV_CL_THREADS = 128   # channels-last conv: channels a block
CONV_CL_STEPS = 64      # and steps a block
SCAN_THREADS = 128                            # threads of a selective-scan block (a row)
SCAN_ITEMS = 8                                # consecutive steps a thread: a chunk of 1024 steps
# __launch_bounds__'s blocks-per-SM hint by tiling: at 2 items ptxas's own choice (48 registers,
# NVRTC 13.x) spilled 8-20 bytes on sm_80 and sm_90a; a budget of 4 blocks (up to 128 registers a
# thread) takes 64-66 and spills none. At 4 items NVRTC 13.0 chose 40 registers on sm_90a for 64
# channels and spilled 12 bytes: 8 blocks (up to 64 registers) takes 64 and spills none. The other
# tilings keep ptxas's choice (fewer registers, no spills: tests/codegen/test_scan_compile.py
# checks every tiling on both arches).
SCAN_MIN_BLOCKS = {2: 4, 4: 8}
MAX_STATE = 256                               # N (the scan's carry: 2 N floats of shared memory)
UPDATE_THREADS = 128                          # the decode kernels' threads a block
MIN_ARCH = 70





def _check(what: str, plan, ints: dict[str, int], dtypes: dict[str, str], optional: dict[str, str | None],
           flags: tuple[str, ...]) -> None:
    for name, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")
    if ops.arch_number(plan.arch) < MIN_ARCH:
        raise ValueError(f"{what}: the kernels need sm_70 or newer (warp shuffles with masks), not {plan.arch}")
    for name, v in {**dtypes, **{k: v for k, v in optional.items() if v is not None}}.items():
        if v not in DTYPES:
            raise ValueError(f"{what}: {name} must be one of {DTYPES}{' or None' if name in optional else ''}, "
                             f"got {v!r}")
    for name, v in {**{k: v for k, v in dtypes.items() if k != "dtype"},
                    **{k: v for k, v in optional.items() if v is not None}}.items():
        if v not in ("f32", plan.dtype):
            raise ValueError(f"{what}: {name} must be f32 or the input dtype {plan.dtype}, got {v!r}")
    for name in flags:
        if not isinstance(getattr(plan, name), bool):
            raise ValueError(f"{what}: {name} must be a bool, got {getattr(plan, name)!r}")


def _opt(tag: str, dtype: str | None) -> list[str]:
    return [] if dtype is None else [f"{tag}{dtype}"]


def scan_parts(fn) -> str | None:
    """What makes a function a scan-family layer ('scan, state h'): its scans, causal
    convolutions and state parameters; None when it has none."""
    from ..dsl.ir import Op
    states = [p.name for p in fn.params if p.kind == "state"]
    ops = sorted({n.op.value for n in fn.nodes() if n.op in (Op.SCAN, Op.CONV1D)})
    if not states and not ops:
        return None
    return ", ".join([f"{op}" for op in ops] + [f"state {s}" for s in states])


def not_lowered_reason(layer) -> str | None:
    """Why a DSL layer with scans, causal convolutions or state has no kernels: None for other
    layers and for those codegen/scan_lower.py matches (Mamba's conv, its decode step, the
    selective scan and its state update, however they are named), which this family's kernels
    serve; otherwise what does not match, and where."""
    what = scan_parts(layer.function)
    if what is None:
        return None
    from .row import LoweringError
    from .scan_lower import match_scan   # (scan_lower builds on this module's plans)
    try:
        match_scan(layer)
    except LoweringError as e:
        return (f"{layer.function.name}: {what}: scans, causal convolutions and state lower only as the scan "
                f"family's kernels (Mamba's conv, conv step, selective scan, state update), and this layer is "
                f"none of them: {e}")
    return None


# ---- the work splits, as data ----------------------------------------------------------------
def state_split(state: int) -> tuple[int, int]:
    """(lanes, per_lane) of the decode update for N states a channel: lanes a power of two (at
    most 32, so a channel's lanes share a warp and sum with xor shuffles), each lane per_lane
    consecutive states (4 when N allows, 16-byte accesses); lanes * per_lane >= N, the last lanes
    idle past N."""
    per = 4 if state % 4 == 0 else (2 if state % 2 == 0 else 1)
    lanes = 1
    while lanes * per < state and lanes < 32:
        lanes *= 2
    return lanes, -(-state // lanes) if lanes * per < state else per


def scan_tiles(length: int) -> tuple[int, int]:
    """(threads, items) of the selective scan for sequences of `length` steps: SCAN_THREADS
    threads, and the fewest items a thread (a power of two, at most SCAN_ITEMS) whose chunk
    covers the sequence, so a short prefill does not leave most of a 1024-step chunk idle
    (the block's time is a thread's items times N whatever the length)."""
    items = 1
    while items < SCAN_ITEMS and SCAN_THREADS * items < length:
        items *= 2
    return SCAN_THREADS, items


def scan_tilings() -> list[tuple[int, int]]:
    """Every (threads, items) scan_tiles picks for some length, shortest chunk first."""
    return [scan_tiles(SCAN_THREADS << i) for i in range(SCAN_ITEMS.bit_length())]


def chunked_scan(a, b, initial, *, threads: int = SCAN_THREADS, items: int = SCAN_ITEMS):
    """The scan kernel's schedule on torch tensors: h_t = a_t h_{t-1} + b_t along the last axis of
    a and b ([..., L]), from `initial` ([...]), chunk by chunk of threads * items steps, each chunk
    as the block does it (per-thread folds, a scan over the threads' pairs, replay from the carry).
    Returns (h [..., L], last [...]). The kernel does the scan over threads as warp shuffles plus
    the warps' totals; the result is the same composition of pairs, associatively regrouped."""
    import torch
    length = a.shape[-1]
    chunk = threads * items
    carry = initial.clone()
    out = torch.empty_like(b)
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        pa = torch.ones(*a.shape[:-1], chunk, dtype=a.dtype)     # past L: the identity pair (1, 0)
        pb = torch.zeros(*b.shape[:-1], chunk, dtype=b.dtype)
        pa[..., :n], pb[..., :n] = a[..., start:start + n], b[..., start:start + n]
        pa, pb = pa.unflatten(-1, (threads, items)), pb.unflatten(-1, (threads, items))
        fa, fb = pa[..., 0].clone(), pb[..., 0].clone()          # each thread's fold of its items
        for e in range(1, items):
            fa, fb = fa * pa[..., e], pa[..., e] * fb + pb[..., e]
        ea, eb = torch.ones_like(fa), torch.zeros_like(fb)       # exclusive prefix over the threads
        for i in range(1, threads):
            ea[..., i] = ea[..., i - 1] * fa[..., i - 1]
            eb[..., i] = fa[..., i - 1] * eb[..., i - 1] + fb[..., i - 1]
        h = ea * carry[..., None] + eb                          # each thread's state entering its items
        hs = torch.empty_like(pb)
        for e in range(items):
            h = pa[..., e] * h + pb[..., e]
            hs[..., e] = h
        hs = hs.flatten(-2)
        out[..., start:start + n] = hs[..., :n]
        carry = hs[..., -1]
    return out, carry


# ---- plans -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ConvPlan(KernelPlan):
    """x T [B, D, L], weight [D, K] (+ bias [D], initial_state T [B, D, K-1]) -> y T [B, D, L]
    (+ final_state T [B, D, K-1]); B and L run-time. channels_last: x [B, L, D] with run-time
    batch and step strides (x_sb, x_sl; channels adjacent), y [B, L, D] contiguous."""

    family: ClassVar[str] = "scan_conv"
    channels: int
    width: int
    dtype: str
    weight_dtype: str | None = None   # None: the input dtype
    bias: str | None = None           # the bias's dtype; None: no bias
    silu: bool = True
    initial: bool = False             # read an initial state
    final: bool = False               # write the final state
    channels_last: bool = False       # x [B, L, D] strided, y [B, L, D]
    vector: bool = True               # channels last: 16-byte loads (D and the strides 16-byte multiples)
    arch: str = "sm_90"

    def __post_init__(self):
        if self.weight_dtype is None:
            object.__setattr__(self, "weight_dtype", self.dtype)
        _check("scan conv", self, {"channels": self.channels, "width": self.width},
               {"dtype": self.dtype, "weight_dtype": self.weight_dtype}, {"bias": self.bias},
               ("silu", "initial", "final", "channels_last", "vector"))
        if self.width not in WIDTHS:
            raise ValueError(f"scan conv: width must be one of {WIDTHS}, got {self.width}")
        if self.channels_last and self.vector and self.channels % conv_vector(self):
            raise ValueError(f"scan conv: channels-last 16-byte vectors need channels a multiple of "
                             f"{conv_vector(self)}, got {self.channels} (vector=False reads one at a time)")

    @property
    def key(self) -> str:
        opts = (_opt("b", self.bias) + ["silu"] * self.silu + ["init"] * self.initial + ["final"] * self.final
                + ["cl" if self.vector else "cl1"] * self.channels_last)
        return "_".join(["scan_conv", f"d{self.channels}", f"k{self.width}", self.dtype, f"w{self.weight_dtype}",
                         *opts, ops.arch_key(self.arch)])

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_conv_abi(self),)

    def source(self) -> str:
        return _conv_source(self)

    def describe(self) -> dict[str, Any]:
        return {"channels": self.channels, "width": self.width, "dtype": self.dtype, "weight_dtype": self.weight_dtype,
                "bias": self.bias, "silu": self.silu, "initial": self.initial, "final": self.final,
                "channels_last": self.channels_last, "vector": self.vector}


@dataclass(frozen=True, kw_only=True)
class ConvUpdatePlan(KernelPlan):
    """x T [B, D], conv_state S [B, D, K] (in place), weight [D, K] (+ bias [D]) -> y T [B, D]."""

    family: ClassVar[str] = "scan_conv_update"
    channels: int
    width: int
    dtype: str
    state_dtype: str | None = None    # None: the input dtype
    weight_dtype: str | None = None
    bias: str | None = None
    silu: bool = True
    # the state's and the weight's K-wide rows read and written as one 4/8/16-byte vector each (both
    # tensors' starts aligned to a row; the runtime checks): one load and one store a row, not K
    vector: bool = False
    arch: str = "sm_90"

    def __post_init__(self):
        for name in ("state_dtype", "weight_dtype"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.dtype)
        if self.vector and not (conv_update_vectorizable(self.width, self.state_dtype)
                                and conv_update_vectorizable(self.width, self.weight_dtype)):
            raise ValueError(f"scan conv update: rows of {self.width} {self.state_dtype} / {self.weight_dtype} "
                             f"are no 4-, 8- or 16-byte vector")
        _check("scan conv update", self, {"channels": self.channels, "width": self.width},
               {"dtype": self.dtype, "state_dtype": self.state_dtype, "weight_dtype": self.weight_dtype},
               {"bias": self.bias}, ("silu",))
        if self.width not in WIDTHS:
            raise ValueError(f"scan conv update: width must be one of {WIDTHS}, got {self.width}")

    @property
    def key(self) -> str:
        opts = _opt("b", self.bias) + ["silu"] * self.silu
        return "_".join(["scan_conv_update", f"d{self.channels}", f"k{self.width}", self.dtype, f"s{self.state_dtype}",
                         f"w{self.weight_dtype}", *opts, *(["v"] if self.vector else []), ops.arch_key(self.arch)])

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_conv_update_abi(self),)

    def source(self) -> str:
        return _conv_update_source(self)

    def describe(self) -> dict[str, Any]:
        return {"channels": self.channels, "width": self.width, "dtype": self.dtype, "state_dtype": self.state_dtype,
                "weight_dtype": self.weight_dtype, "bias": self.bias, "silu": self.silu}


@dataclass(frozen=True, kw_only=True)
class _ScanOptions(KernelPlan):
    channels: int
    state: int                        # N
    dtype: str
    a_dtype: str | None = None        # None: the input dtype
    d_dtype: str | None = None        # the D skip's dtype; None: no skip
    bias_dtype: str | None = None     # the Δ bias's dtype; None: no bias
    gate: bool = False                # times silu(z)
    softplus: bool = True             # Δ through softplus (after the bias)
    arch: str = "sm_90"

    def _check_scan(self, what: str, flags: tuple[str, ...]) -> None:
        if self.a_dtype is None:
            object.__setattr__(self, "a_dtype", self.dtype)
        _check(what, self, {"channels": self.channels, "state": self.state}, {"dtype": self.dtype,
               "a_dtype": self.a_dtype}, {"d_dtype": self.d_dtype, "bias_dtype": self.bias_dtype},
               ("gate", "softplus", *flags))
        if self.state > MAX_STATE:
            raise ValueError(f"{what}: state = {self.state} (the kernels carry up to {MAX_STATE})")

    def _key_parts(self) -> list[str]:
        return ([f"d{self.channels}", f"n{self.state}", self.dtype, f"a{self.a_dtype}"] + _opt("skip", self.d_dtype)
                + _opt("b", self.bias_dtype) + ["z"] * self.gate + ["sp"] * self.softplus)

    def _describe(self) -> dict[str, Any]:
        return {"channels": self.channels, "state": self.state, "dtype": self.dtype, "a_dtype": self.a_dtype,
                "d_dtype": self.d_dtype, "bias_dtype": self.bias_dtype, "gate": self.gate, "softplus": self.softplus}


@dataclass(frozen=True, kw_only=True)
class SelectiveScanPlan(_ScanOptions):
    """u, delta (, z) T [B, D, L], A [D, N], B, C T [B, N, L] (+ D, delta_bias [D], initial f32
    [B, D, N]) -> y T [B, D, L] (+ final f32 [B, D, N]); B and L run-time."""

    family: ClassVar[str] = "selective_scan"
    initial: bool = False
    final: bool = False
    threads: int = SCAN_THREADS
    items: int = SCAN_ITEMS

    def __post_init__(self):
        self._check_scan("selective scan", ("initial", "final"))
        if self.threads not in (32, 64, 128, 256) or self.items not in (1, 2, 4, 8, 16):
            raise ValueError(f"selective scan: threads must be 32..256 (a power of two) and items 1..16 (a power of "
                             f"two), got {self.threads}, {self.items}")

    @property
    def chunk(self) -> int:
        return self.threads * self.items

    @property
    def key(self) -> str:
        tiles = [] if (self.threads, self.items) == (SCAN_THREADS, SCAN_ITEMS) else [f"t{self.threads}x{self.items}"]
        return "_".join(["selective_scan", *self._key_parts(), *["init"] * self.initial, *["final"] * self.final,
                         *tiles, ops.arch_key(self.arch)])

    @property
    def shared(self) -> SharedLayout:
        """The warps' totals (two buffers of (a, b) per warp: alternate states n) and the carry
        (two buffers of N: chunks alternate)."""
        warps = self.threads // 32
        return SharedLayout(buffers=(("totals", 2 * 2 * warps * 4), ("carry", 2 * self.state * 4)), align=16)

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_scan_abi(self),)

    def source(self) -> str:
        return _scan_source(self)

    def describe(self) -> dict[str, Any]:
        return {**self._describe(), "initial": self.initial, "final": self.final, "threads": self.threads,
                "items": self.items}


@dataclass(frozen=True, kw_only=True)
class StateUpdatePlan(_ScanOptions):
    """state f32 [B, D, N] (in place), x, dt (, z) T [B, D], A [D, N], B, C T [B, N] (+ D, dt_bias
    [D]) -> y T [B, D]; B run-time."""

    family: ClassVar[str] = "selective_state_update"
    a_log: bool = False               # A holds A_log: the step uses A = -exp(A_log) (as the mixer keeps it)

    def __post_init__(self):
        self._check_scan("selective state update", ("a_log",))

    @property
    def key(self) -> str:
        return "_".join(["selective_state_update", *self._key_parts(), *(["alog"] if self.a_log else []),
                         ops.arch_key(self.arch)])

    @property
    def vector_state(self) -> bool:
        """Whether a lane reads and writes its states as 16-byte vectors (the state must then
        start on a 16-byte boundary)."""
        _, per = state_split(self.state)
        return per % 4 == 0 and self.state % 4 == 0

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_update_abi(self),)

    def source(self) -> str:
        return _update_source(self)

    def describe(self) -> dict[str, Any]:
        return {**self._describe(), "a_log": self.a_log}


def plan_conv(*, channels: int, width: int, dtype: str, weight_dtype: str | None = None, bias: str | None = None,
              silu: bool = True, initial: bool = False, final: bool = False, channels_last: bool = False,
              vector: bool = True, arch: str = "sm_90") -> ConvPlan:
    return ConvPlan(channels=channels, width=width, dtype=dtype, weight_dtype=weight_dtype, bias=bias, silu=silu,
                    initial=initial, final=final, channels_last=channels_last, vector=vector, arch=arch)


_ROW_VECTORS = {4: "unsigned int", 8: "uint2", 16: "uint4"}   # a K-wide row's bytes -> its vector type


def conv_update_vectorizable(width: int, dtype: str) -> bool:
    """Whether a K-wide row of `dtype` is a 4-, 8- or 16-byte vector (K 2 or 4 of 2-byte types, 4 floats)."""
    return width * DType[dtype].itemsize in _ROW_VECTORS


def plan_conv_update(*, channels: int, width: int, dtype: str, state_dtype: str | None = None,
                     weight_dtype: str | None = None, bias: str | None = None, silu: bool = True,
                     vector: bool | None = None, arch: str = "sm_90") -> ConvUpdatePlan:
    """vector None: whenever the state's and the weight's rows are vectors (their tensors aligned,
    as fresh ones are; runtime/scan.py passes False for others)."""
    if vector is None:
        vector = all(conv_update_vectorizable(width, t or dtype) for t in (state_dtype, weight_dtype))
    return ConvUpdatePlan(channels=channels, width=width, dtype=dtype, state_dtype=state_dtype,
                          weight_dtype=weight_dtype, bias=bias, silu=silu, vector=vector, arch=arch)


def plan_selective_scan(*, channels: int, state: int, dtype: str, a_dtype: str | None = None,
                        d_dtype: str | None = None, bias_dtype: str | None = None, gate: bool = False,
                        softplus: bool = True, initial: bool = False, final: bool = False,
                        threads: int = SCAN_THREADS, items: int = SCAN_ITEMS, arch: str = "sm_90") -> SelectiveScanPlan:
    return SelectiveScanPlan(channels=channels, state=state, dtype=dtype, a_dtype=a_dtype, d_dtype=d_dtype,
                             bias_dtype=bias_dtype, gate=gate, softplus=softplus, initial=initial, final=final,
                             threads=threads, items=items, arch=arch)


def plan_state_update(*, channels: int, state: int, dtype: str, a_dtype: str | None = None,
                      d_dtype: str | None = None, bias_dtype: str | None = None, gate: bool = False,
                      softplus: bool = True, a_log: bool = False, arch: str = "sm_90") -> StateUpdatePlan:
    return StateUpdatePlan(channels=channels, state=state, dtype=dtype, a_dtype=a_dtype, d_dtype=d_dtype,
                           bias_dtype=bias_dtype, gate=gate, softplus=softplus, a_log=a_log, arch=arch)


# ---- ABIs and sources ------------------------------------------------------------------------
def conv_vector(plan: ConvPlan) -> int:
    """Channels a thread of the channels-last conv takes: a 16-byte vector, or 1."""
    return 16 // DType[plan.dtype].itemsize if plan.vector else 1

def _in(dtype: str) -> str:
    return f"const {ops.storage_ctype(dtype)}* __restrict__"


def _out(dtype: str) -> str:
    return f"{ops.storage_ctype(dtype)}* __restrict__"


_F32_IN, _F32_OUT = "const float* __restrict__", "float* __restrict__"


def _base_variables(plan: KernelPlan) -> dict[str, Any]:
    return dict(kernel_name=plan.kernel_name, plan_key=plan.key, common=read_template("cuda/common.cuh"),
                signature=plan.abi.signature)


@functools.lru_cache(maxsize=64)
def _conv_abi(plan: ConvPlan) -> KernelABI:
    args = [Arg("x", _in(plan.dtype), "input"), Arg("weight", _in(plan.weight_dtype), "input")]
    if plan.bias:
        args.append(Arg("bias", _in(plan.bias), "input"))
    if plan.initial:
        args.append(Arg("initial_state", _in(plan.dtype), "input"))
    args.append(Arg("y", _out(plan.dtype), "output", "0"))
    if plan.final:
        args.append(Arg("final_state", _out(plan.dtype), "output", "1"))
    args += [Arg("batch", "int", "dim"), Arg("length", "long long", "dim")]
    if plan.channels_last:
        args += [Arg("x_sb", "long long", "dim"), Arg("x_sl", "long long", "dim")]
        return KernelABI(name=plan.kernel_name, args=tuple(args),
                         grid=(f"rows * cdiv(length, {CONV_CL_STEPS})",
                               f"cdiv({plan.channels}, {CONV_CL_THREADS * conv_vector(plan)})"),
                         block=(CONV_CL_THREADS,), problem=("rows", "length"))
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=("rows", f"cdiv(length, {CONV_TILE})"),
                     block=(CONV_THREADS,), problem=("rows", "length"))


@functools.lru_cache(maxsize=64)
def _conv_source(plan: ConvPlan) -> str:
    if plan.channels_last:
        return render("cuda/scan_conv_cl.cu.jinja", **_base_variables(plan), T=ops.storage_ctype(plan.dtype),
                      channels=plan.channels, width=plan.width, bias=bool(plan.bias), silu=plan.silu,
                      initial=plan.initial, final=plan.final, threads=CONV_CL_THREADS, steps=CONV_CL_STEPS,
                      VEC=conv_vector(plan))
    return render("cuda/scan_conv.cu.jinja", **_base_variables(plan), T=ops.storage_ctype(plan.dtype), channels=plan.channels,
                  width=plan.width, bias=bool(plan.bias), silu=plan.silu, initial=plan.initial, final=plan.final,
                  threads=CONV_THREADS, per_thread=CONV_PER_THREAD, tile=CONV_TILE)


@functools.lru_cache(maxsize=64)
def _conv_update_abi(plan: ConvUpdatePlan) -> KernelABI:
    args = [Arg("x", _in(plan.dtype), "input"), Arg("x_sb", "long long", "dim"),
            Arg("conv_state", _out(plan.state_dtype), "output"), Arg("weight", _in(plan.weight_dtype), "input")]
    if plan.bias:
        args.append(Arg("bias", _in(plan.bias), "input"))
    args += [Arg("y", _out(plan.dtype), "output", "0"), Arg("batch", "int", "dim")]
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=(f"cdiv(rows, {UPDATE_THREADS})",),
                     block=(UPDATE_THREADS,), problem=("rows",))


@functools.lru_cache(maxsize=64)
def _conv_update_source(plan: ConvUpdatePlan) -> str:
    return render("cuda/scan_conv_update.cu.jinja", **_base_variables(plan), T=ops.storage_ctype(plan.dtype),
                  S=ops.storage_ctype(plan.state_dtype), W=ops.storage_ctype(plan.weight_dtype), channels=plan.channels,
                  width=plan.width, bias=bool(plan.bias), silu=plan.silu, threads=UPDATE_THREADS,
                  vector={"state": _ROW_VECTORS[plan.width * DType[plan.state_dtype].itemsize],
                          "weight": _ROW_VECTORS[plan.width * DType[plan.weight_dtype].itemsize]}
                  if plan.vector else None)


def _scan_inputs(plan: _ScanOptions) -> list[Arg]:
    args = [Arg("u", _in(plan.dtype), "input"), Arg("delta", _in(plan.dtype), "input"),
            Arg("A", _in(plan.a_dtype), "input"), Arg("Bm", _in(plan.dtype), "input", "B"),
            Arg("Cm", _in(plan.dtype), "input", "C")]
    if plan.d_dtype:
        args.append(Arg("Dskip", _in(plan.d_dtype), "input", "D"))
    if plan.gate:
        args.append(Arg("z", _in(plan.dtype), "input"))
    if plan.bias_dtype:
        args.append(Arg("delta_bias", _in(plan.bias_dtype), "input"))
    return args


def _scan_variables(plan: _ScanOptions) -> dict[str, Any]:
    return dict(_base_variables(plan), T=ops.storage_ctype(plan.dtype), channels=plan.channels, state=plan.state,
                skip=bool(plan.d_dtype), gate=plan.gate, bias=bool(plan.bias_dtype), softplus=plan.softplus,
                softplus_threshold=20.0)


@functools.lru_cache(maxsize=64)
def _scan_abi(plan: SelectiveScanPlan) -> KernelABI:
    args = _scan_inputs(plan)
    if plan.initial:
        args.append(Arg("initial_state", _F32_IN, "input"))
    args.append(Arg("y", _out(plan.dtype), "output", "0"))
    if plan.final:
        args.append(Arg("final_state", _F32_OUT, "output", "1"))
    args += [Arg("batch", "int", "dim"), Arg("length", "long long", "dim")]
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=("rows",), block=(plan.threads,),
                     shared_bytes=plan.shared.bytes, problem=("rows",))


@functools.lru_cache(maxsize=64)
def _scan_source(plan: SelectiveScanPlan) -> str:
    layout = plan.shared
    return render("cuda/scan_selective.cu.jinja", **_scan_variables(plan), initial=plan.initial, final=plan.final,
                  threads=plan.threads, items=plan.items, warps=plan.threads // 32,
                  min_blocks=SCAN_MIN_BLOCKS.get(plan.items),
                  totals_offset=layout.offsets["totals"], carry_offset=layout.offsets["carry"])


@functools.lru_cache(maxsize=64)
def _update_abi(plan: StateUpdatePlan) -> KernelABI:
    args = [Arg("state", _F32_OUT, "output"), *_scan_inputs(plan)]
    args = [a if a.name not in ("u", "delta") else Arg({"u": "x", "delta": "dt"}[a.name], a.ctype, "input")
            for a in args]
    args = [a if a.name != "delta_bias" else Arg("dt_bias", a.ctype, "input") for a in args]
    args += [Arg("y", _out(plan.dtype), "output", "0"), Arg("batch", "int", "dim")]
    lanes, _ = state_split(plan.state)
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=(f"cdiv(rows, {UPDATE_THREADS // lanes})",),
                     block=(UPDATE_THREADS,), problem=("rows",))


@functools.lru_cache(maxsize=64)
def _update_source(plan: StateUpdatePlan) -> str:
    lanes, per = state_split(plan.state)
    return render("cuda/scan_state_update.cu.jinja", **_scan_variables(plan), threads=UPDATE_THREADS, lanes=lanes,
                  per_lane=per, vector=plan.vector_state, a_log=plan.a_log)
