"""The token permutation of a mixture-of-experts layer: sort the (token, choice) pairs by expert,
copy the tokens' rows into that order, and combine the experts' outputs back per token.

    align   = plan_moe_align(experts=64, k=8, arch="sm_90")            'moe_align_e64_k8_sm90'
    gather  = plan_moe_gather(hidden=4096, dtype="bf16")               'moe_gather_h4096_bf16_sm90'
    combine = plan_moe_combine(hidden=4096, k=2, dtype="bf16", shared=True, shared_gate=True)
                                                                       'moe_combine_h4096_k2_bf16_shared_gate_sm90'

T tokens each chose k experts (ids int32 [T, k], weights float32 [T, k], from the routing
kernels); pair p = t * k + s is token t's s-th choice, P = T * k pairs.

  align    ids [P] -> offsets [E + 1], pos [P], src [P]: a stable counting sort of the pairs by
           expert (within an expert, increasing p). Expert e's pairs hold the sorted slots
           offsets[e] .. offsets[e + 1] - 1; pair p sits in slot pos[p]; slot j holds a pair of
           token src[j]. An id outside [0, E) is clamped into it (as the DSL clamps row lookups),
           so every pair lands in some slot and the outputs stay a permutation: no write goes
           outside them. templates/cuda/moe_align.cu.jinja: one block of 1024 threads.
  gather   xs[j] = x[src[j]] (T [P, H]); src clamped into [0, T).
  combine  out[t] = T( sum_s w[t, s] * y[pos[t * k + s]]            (s ascending, f32)
                       + shared[t] * sigmoid(gate_logit[t])         (shared; the gate when shared_gate)
                       + residual[t] )                              (residual), rounded once;
           pos clamped into [0, P).

The work splits are plain data here (`align_chunk`, `row_split`), run on the CPU by
tests/codegen/test_moe_kernels_compile.py and emitted by the templates.
runtime/moe_kernels.py launches the three kernels and holds their torch references.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from . import ops
from .abi import Arg, KernelABI, SharedLayout
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["MoeAlignPlan", "MoeGatherPlan", "MoeCombinePlan", "plan_moe_align", "plan_moe_gather",
           "plan_moe_combine", "align_chunk", "row_split", "MAX_EXPERTS", "MAX_K", "ALIGN_WARPS", "ALIGN_BATCH",
           "DTYPES"]

MAX_EXPERTS = 512      # the align kernel's per-warp histograms: 32 x E ints of shared memory (64 KiB at 512)
MAX_K = 32             # choices per token (the combine keeps a row and a weight per choice in registers)
ALIGN_WARPS = 32       # one block of 1024 threads: each warp sorts one contiguous range of pairs
ALIGN_BATCH = 8        # ids a lane loads before ranking them (8 loads in flight, not one)
ROW_THREADS = 256      # the gather's and the combine's threads per block
VEC = 8                # elements of a 16-byte vector of a 2-byte dtype
DTYPES = ("bf16", "f16")
MIN_ARCH = 70          # __match_any_sync


def align_chunk(pairs: int) -> int:
    """Pairs per warp of the align kernel: ceil(P / (32 warps * 32)) * 32. Warp w takes pairs
    [w * chunk, min((w + 1) * chunk, P)); every range starts on a 32-pair boundary, so a
    warp's step of 32 pairs is one aligned 128-byte load, and the ranges in warp order are the
    pairs in order (what keeps the sort stable)."""
    per = ALIGN_WARPS * 32
    return -(-pairs // per) * 32


def row_split(hidden: int) -> tuple[int, int, int]:
    """(threads per row, rows per block, vectors per thread) of a gather / combine block over
    rows of `hidden` 2-byte elements: H / 8 16-byte vectors a row, at most ROW_THREADS threads a
    row, each thread the same count of vectors (the last step partial when they do not divide),
    threads a row a multiple of 32, and rows that take fewer threads packed into one block."""
    vecs = hidden // VEC
    iters = -(-vecs // ROW_THREADS)
    per = -(-vecs // iters)
    tpr = -(-per // 32) * 32
    return tpr, ROW_THREADS // tpr, iters



def _check_common(what: str, arch: str, ints: dict[str, int]) -> None:
    for name, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")
    if ops.arch_number(arch) < MIN_ARCH:
        raise ValueError(f"{what}: the kernel needs sm_70 or newer (__match_any_sync), not {arch}")


def _check_row(what: str, hidden: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{what}: dtype must be one of {DTYPES}, got {dtype!r}")
    if hidden % VEC:
        raise ValueError(f"{what}: hidden = {hidden} must be a multiple of {VEC} (16-byte vectors)")




@dataclass(frozen=True, kw_only=True)
class MoeAlignPlan(KernelPlan):
    """ids int32 [P] -> offsets int32 [E + 1], pos int32 [P], src int32 [P]; P a run-time int."""

    family: ClassVar[str] = "moe_align"
    experts: int
    k: int
    fixed: int = 0      # experts E .. E + fixed - 1 every token visits after its k (a shared expert in
                        # fixed slices of the routed experts' size): pairs T (k + fixed), E + fixed experts
    active: bool = False   # also list the experts with pairs (int32 [E + fixed + 1]: the list, its length last)
    arch: str = "sm_90"

    def __post_init__(self):
        _check_common("moe align", self.arch, {"experts": self.experts, "k": self.k})
        if not isinstance(self.active, bool):
            raise ValueError(f"moe align: active must be a bool, got {self.active!r}")
        if not isinstance(self.fixed, int) or isinstance(self.fixed, bool) or self.fixed < 0:
            raise ValueError(f"moe align: fixed must be a non-negative int, got {self.fixed!r}")
        if self.experts + self.fixed > MAX_EXPERTS:
            raise ValueError(f"moe align: experts = {self.experts + self.fixed} (the kernel sorts up to {MAX_EXPERTS})")
        if self.k + self.fixed > MAX_K:
            raise ValueError(f"moe align: k = {self.k + self.fixed} (1 to {MAX_K})")

    @property
    def key(self) -> str:
        fixed = f"_f{self.fixed}" if self.fixed else ""
        active = "_active" if self.active else ""
        return f"moe_align_e{self.experts}_k{self.k}{fixed}{active}_{ops.arch_key(self.arch)}"

    @property
    def shared(self) -> SharedLayout:
        """Each warp's histogram, then its first slot per expert ([warp][expert] ints), and the
        block scan's 32 warp sums."""
        return SharedLayout(buffers=(("hist", ALIGN_WARPS * (self.experts + self.fixed) * 4), ("warp_sums", 32 * 4)))

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_align_abi(self),)

    def source(self) -> str:
        return _align_source(self)

    def describe(self) -> dict[str, Any]:
        return {"experts": self.experts, "k": self.k, "fixed": self.fixed, "active": self.active}


@dataclass(frozen=True, kw_only=True)
class MoeGatherPlan(KernelPlan):
    """x T [T, H], src int32 [P] -> xs T [P, H]."""

    family: ClassVar[str] = "moe_gather"
    hidden: int
    dtype: str
    arch: str = "sm_90"

    def __post_init__(self):
        _check_common("moe gather", self.arch, {"hidden": self.hidden})
        _check_row("moe gather", self.hidden, self.dtype)

    @property
    def key(self) -> str:
        return f"moe_gather_h{self.hidden}_{self.dtype}_{ops.arch_key(self.arch)}"

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_gather_abi(self),)

    def source(self) -> str:
        return _gather_source(self)

    def describe(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dtype": self.dtype}


@dataclass(frozen=True, kw_only=True)
class MoeCombinePlan(KernelPlan):
    """y T [P, H], pos int32 [P], w f32 [T, k] (+ shared T [T, H], gate_logit T [T], residual
    T [T, H]) -> out T [T, H]."""

    family: ClassVar[str] = "moe_combine"
    hidden: int
    k: int
    dtype: str
    shared: bool = False        # + a shared expert's output [T, H]
    shared_gate: bool = False   # ... times sigmoid(gate_logit[t]) (Qwen2-MoE's shared_expert_gate)
    residual: bool = False      # + residual [T, H]
    fixed: int = 0              # the shared expert as `fixed` more rows a token (moe_align's fixed
                                # experts, pos [T, k + fixed]), weighted 1 or sigmoid(gate_logit[t])
    arch: str = "sm_90"

    def __post_init__(self):
        _check_common("moe combine", self.arch, {"hidden": self.hidden, "k": self.k})
        _check_row("moe combine", self.hidden, self.dtype)
        if not isinstance(self.fixed, int) or isinstance(self.fixed, bool) or self.fixed < 0:
            raise ValueError(f"moe combine: fixed must be a non-negative int, got {self.fixed!r}")
        if self.k + self.fixed > MAX_K:
            raise ValueError(f"moe combine: k = {self.k + self.fixed} (1 to {MAX_K})")
        for name in ("shared", "shared_gate", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"moe combine: {name} must be a bool, got {getattr(self, name)!r}")
        if self.shared_gate and not (self.shared or self.fixed):
            raise ValueError("moe combine: shared_gate gates the shared expert's output: it needs shared=True")
        if self.shared and self.fixed:
            raise ValueError("moe combine: the shared expert comes as its own rows (shared) or as fixed rows, not both")

    @property
    def key(self) -> str:
        opts = (["shared"] * self.shared + [f"f{self.fixed}"] * bool(self.fixed) + ["gate"] * self.shared_gate
                + ["residual"] * self.residual)
        return "_".join(["moe_combine", f"h{self.hidden}", f"k{self.k}", self.dtype, *opts, ops.arch_key(self.arch)])

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_combine_abi(self),)

    def source(self) -> str:
        return _combine_source(self)

    def describe(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "k": self.k, "dtype": self.dtype, "shared": self.shared,
                "shared_gate": self.shared_gate, "residual": self.residual, "fixed": self.fixed}


def plan_moe_align(*, experts: int, k: int, fixed: int = 0, active: bool = False, arch: str = "sm_90") -> MoeAlignPlan:
    return MoeAlignPlan(experts=experts, k=k, fixed=fixed, active=active, arch=arch)


def plan_moe_gather(*, hidden: int, dtype: str, arch: str = "sm_90") -> MoeGatherPlan:
    return MoeGatherPlan(hidden=hidden, dtype=dtype, arch=arch)


def plan_moe_combine(*, hidden: int, k: int, dtype: str, shared: bool = False, shared_gate: bool = False,
                     residual: bool = False, fixed: int = 0, arch: str = "sm_90") -> MoeCombinePlan:
    return MoeCombinePlan(hidden=hidden, k=k, dtype=dtype, shared=shared, shared_gate=shared_gate,
                          residual=residual, fixed=fixed, arch=arch)


# ---- ABIs and sources ------------------------------------------------------------------------
_I32_IN, _I32_OUT = "const int* __restrict__", "int* __restrict__"


@functools.lru_cache(maxsize=64)
def _align_abi(plan: MoeAlignPlan) -> KernelABI:
    args = (Arg("ids", _I32_IN, "input"), Arg("offsets", _I32_OUT, "output", "0"),
            Arg("pos", _I32_OUT, "output", "1"), Arg("src", _I32_OUT, "output", "2"),
            *((Arg("active", _I32_OUT, "output", "3"),) if plan.active else ()),
            Arg("n_pairs", "int", "dim", "pairs"))
    return KernelABI(name=plan.kernel_name, args=args, grid=("1",), block=(ALIGN_WARPS * 32,),
                     shared_bytes=plan.shared.bytes)


@functools.lru_cache(maxsize=64)
def _align_source(plan: MoeAlignPlan) -> str:
    layout = plan.shared
    return render("cuda/moe_align.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key,
                  common=read_template("cuda/common.cuh"), signature=plan.abi.signature, experts=plan.experts,
                  k=plan.k, fixed=plan.fixed, active=plan.active, warps=ALIGN_WARPS, batch=ALIGN_BATCH, hist_offset=layout.offsets["hist"],
                  sums_offset=layout.offsets["warp_sums"])


def _row_abi(plan, args: tuple[Arg, ...], rows: str) -> KernelABI:
    tpr, rpb, _ = row_split(plan.hidden)
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"cdiv({rows}, {rpb})",), block=(tpr, rpb),
                     problem=(rows,))


def _row_variables(plan) -> dict[str, Any]:
    tpr, rpb, iters = row_split(plan.hidden)
    return dict(kernel_name=plan.kernel_name, plan_key=plan.key, common=read_template("cuda/common.cuh"),
                signature=plan.abi.signature, T=ops.storage_ctype(plan.dtype), hidden=plan.hidden, vecs=plan.hidden // VEC,
                tpr=tpr, rpb=rpb, iters=iters)


@functools.lru_cache(maxsize=256)
def _gather_abi(plan: MoeGatherPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (Arg("x", f"const {t}* __restrict__", "input"), Arg("src", _I32_IN, "input"),
            Arg("xs", f"{t}* __restrict__", "output", "0"), Arg("n_slots", "long long", "dim", "slots"),
            Arg("n_tokens", "long long", "dim", "tokens"))
    return _row_abi(plan, args, "slots")


@functools.lru_cache(maxsize=256)
def _gather_source(plan: MoeGatherPlan) -> str:
    return render("cuda/moe_gather.cu.jinja", **_row_variables(plan))


@functools.lru_cache(maxsize=256)
def _combine_abi(plan: MoeCombinePlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    tin = f"const {t}* __restrict__"
    args = [Arg("y", tin, "input"), Arg("pos", _I32_IN, "input"), Arg("w", "const float* __restrict__", "input")]
    if plan.shared:
        args.append(Arg("shared", tin, "input"))
    if plan.shared_gate:
        args.append(Arg("gate_logit", tin, "input"))
    if plan.residual:
        args.append(Arg("residual", tin, "input"))
    args += [Arg("out", f"{t}* __restrict__", "output", "0"), Arg("n_tokens", "long long", "dim", "tokens")]
    return _row_abi(plan, tuple(args), "tokens")


@functools.lru_cache(maxsize=256)
def _combine_source(plan: MoeCombinePlan) -> str:
    return render("cuda/moe_combine.cu.jinja", **_row_variables(plan), k=plan.k, shared=plan.shared,
                  shared_gate=plan.shared_gate, residual=plan.residual, fixed=plan.fixed)
