"""Multi-LoRA products for decode-sized steps: each token names an adapter, and its adapter's two
small products (shrink, then expand with the base product's output) run for all adapters in one
launch each.

    shrink = plan_lora_shrink("bf16", k=4096, rank=16, slices=3)        'lora_shrink_k4096_r16x3_bf16_w8_sm90'
    expand = plan_lora_expand("bf16", slices=(4096, 1024, 1024), rank=16)
                                                                       'lora_expand_o4096x1024x1024_r16_bf16_t64m8_sm90'

A projection's adapters are stacked by slot (runtime/lora.py `MultiLoRA`); a projection may be
several fused ones (q/k/v, gate/up: S slices of the output columns, each with its own A, B,
rank and scale). R is the store's rank (the largest adapter's, a multiple of 8); an adapter of
rank r_es in slice s has zero rows past r_es, which the shrink does not read.

    a       T [slots + 1, S R, K]   adapter e's lora_A of slice s in rows s R .. s R + r_es - 1
    b       T [slots + 1, R, O]     adapter e's lora_B transposed: row j holds B_s[:, j] in slice s's columns
    ranks   int32 [slots + 1, S]    r_es (0: the adapter does not touch the slice)
    scales  f32 [slots + 1, S]      lora_alpha / r (or / sqrt(r): rsLoRA)

The tokens come sorted by slot (runtime/moe_kernels.moe_align over the slots and "no adapter",
one more group past the last): group g has the sorted rows offsets[g] .. offsets[g + 1] - 1,
sorted row i is token src[i].

  shrink   v[t, s R + j] = sum_k x[t, k] a[e, s R + j, k]   (T, f32 sums; j < r_es; other entries untouched)
           grid (S R / 8, slots, cdiv(T, 4)): a CTA takes 8 rows of adapter e's A and 4 of its
           tokens, its warps splitting K (a lane has few 16-byte steps, each with its 12 loads in
           flight); an adapter's A rows come from memory once (its other token blocks read them
           from L2), and a CTA of an adapter with fewer tokens, or of rows past every rank, returns
           before reading anything. Where the adapters' A rows fit after the base weight
           (runtime/lora.py, folded), the base GEMM computes v for every slot instead, as extra
           output columns, and this kernel is not run.
  expand   out[t, n] = y[t, n] (+ bias[n]) + scales[e, s] sum_{j < r_es} v[t, ...] b[e, j, n]   (s: n's slice)
           y: the base product (its rows ldy apart), v: the shrink's rows, or every slot's columns
           after y's O (the folded GEMM's; `vslot` S R apart); out may be y (in place).
           grid (cdiv(O, 8 NT), groups, cdiv(T, MB)): a thread owns 8 consecutive columns (one
           16-byte vector of y and of each row of b), a CTA MB tokens of one group, whose v entries
           it stages in shared memory; the group of no adapter (when out is not y) copies y. Every
           (t, n) belongs to one thread of one CTA: no atomics.

  mask     vm[t, s, e, r] = scales[e, s] v[t, e S R + s R + r] where slot[t] == e, else 0   (every slot's
           v of a prefill-sized step, the dense route's shrink GEMM output, its rows ldv apart) ->
           vm T [tokens, S, slots, R]: the operand of the dense route's delta GEMMs (one a slice,
           K = slots R), in one pass (a thread a 16-byte vector of vm: R is a multiple of 8, so a
           vector lies in one (s, e) block), where torch took two launches and a transposed copy.

Both are CUDA-core kernels: at decode sizes (64 tokens, rank 16) a projection's adapters are
tens of MFLOP, and the cost is the launch and the latency of a pass over the adapters' bytes (so
a thread keeps 16 rows of b in flight). Prefill runs on torch's GEMMs (runtime/lora.py). The
work split is plain data (`shrink_grid`, `expand_grid`), emulated on the CPU by
tests/runtime/test_lora.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from . import ops
from .abi import Arg, KernelABI
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["LoraShrinkPlan", "LoraExpandPlan", "LoraMaskPlan", "plan_lora_shrink", "plan_lora_expand",
           "plan_lora_mask", "shrink_grid", "expand_grid",
           "MAX_RANK", "MAX_SLICES", "DTYPES"]

MAX_RANK = 256       # the expand stages MB x S x R f32 of v in static shared memory (32 KB at 8 x 4 x 256)
MAX_SLICES = 4
DTYPES = ("bf16", "f16")
MIN_ARCH = 80



def _positive(what: str, **ints: int) -> None:
    for name, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")


def _check_common(what: str, dtype: str, rank: int, slices: int, arch: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{what}: dtype must be one of {DTYPES}, got {dtype!r}")
    _positive(what, rank=rank, slices=slices)
    if rank % 8 or rank > MAX_RANK:
        raise ValueError(f"{what}: rank = {rank} must be a multiple of 8 up to {MAX_RANK} (the store pads ranks to it)")
    if slices > MAX_SLICES:
        raise ValueError(f"{what}: {slices} slices (1 to {MAX_SLICES})")
    if ops.arch_number(arch) < MIN_ARCH:
        raise ValueError(f"{what}: the kernels are built for sm_80 and newer, not {arch}")


def shrink_grid(rows: int, slots: int, tokens: int, rows_per_cta: int, tokens_per_cta: int) -> tuple[int, int, int]:
    """The shrink's grid: (row blocks of the S R rows, slots, token blocks)."""
    return -(-rows // rows_per_cta), slots, -(-tokens // tokens_per_cta)


def expand_grid(out: int, groups: int, tokens: int, threads: int, tokens_per_cta: int) -> tuple[int, int, int]:
    """The expand's grid: (column blocks of 8 `threads` columns, groups (the slots, and "no adapter"
    unless the add is in place), token blocks)."""
    return -(-out // (8 * threads)), groups, -(-tokens // tokens_per_cta)


@dataclass(frozen=True, kw_only=True)
class LoraShrinkPlan(KernelPlan):
    """x T [tokens, K], a T [slots + 1, S R, K] -> v T [tokens, S R] (the module's docstring)."""

    family: ClassVar[str] = "lora_shrink"
    rows_per_cta: ClassVar[int] = 8        # RB: rows of A a CTA (8 divides R: they lie in one slice)
    tokens_per_cta: ClassVar[int] = 4      # MT: RB x MT = 32 sums a thread, one a lane after the reduction
    dtype: str
    k: int
    rank: int                  # R: rows of a slice of an adapter's stacked A, a multiple of 8
    slices: int = 1            # S
    warps: int = 8             # splitting K
    arch: str = "sm_90"

    def __post_init__(self):
        _check_common("lora shrink", self.dtype, self.rank, self.slices, self.arch)
        _positive("lora shrink", k=self.k, warps=self.warps)
        if self.k % 8:
            raise ValueError(f"lora shrink: K = {self.k} must be a multiple of 8 (rows of 16-byte vectors)")
        if self.warps > 32:
            raise ValueError(f"lora shrink: warps = {self.warps} (1 to 32)")

    @property
    def rows(self) -> int:
        return self.slices * self.rank

    @property
    def key(self) -> str:
        return f"lora_shrink_k{self.k}_r{self.rank}x{self.slices}_{self.dtype}_w{self.warps}_{self.arch.replace('_', '')}"

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_shrink_abi(self),)

    def source(self) -> str:
        return _shrink_source(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "k": self.k, "rank": self.rank, "slices": self.slices}


@dataclass(frozen=True, kw_only=True)
class LoraExpandPlan(KernelPlan):
    """y T [tokens, ldy], v T, b T [slots + 1, R, O] -> out T [tokens, O] (the module's docstring);
    `slices`: the widths of the output's slices, in order (their sum is O)."""

    family: ClassVar[str] = "lora_expand"
    dtype: str
    slices: tuple[int, ...]
    rank: int
    bias: bool = False         # out = y + bias + ...: y is a product without the base's bias
    threads: int = 64          # NT: 8 columns a thread
    tokens_per_cta: int = 8    # MB: accumulators of a thread, MB x 8
    arch: str = "sm_90"

    def __post_init__(self):
        object.__setattr__(self, "slices", tuple(self.slices))
        if not isinstance(self.bias, bool):
            raise ValueError(f"lora expand: bias must be a bool, got {self.bias!r}")
        if not self.slices:
            raise ValueError("lora expand: at least one slice")
        _check_common("lora expand", self.dtype, self.rank, len(self.slices), self.arch)
        _positive("lora expand", threads=self.threads, tokens_per_cta=self.tokens_per_cta,
                  **{f"slice {i}": w for i, w in enumerate(self.slices)})
        if any(w % 8 for w in self.slices):
            raise ValueError(f"lora expand: slice widths {list(self.slices)} must be multiples of 8 (a thread's "
                             "16-byte vector of columns stays in one slice)")
        if self.threads % 32 or self.threads > 1024:
            raise ValueError(f"lora expand: threads = {self.threads} must be a multiple of 32 up to 1024")
        if not self.tokens_per_cta <= min(16, self.threads):
            raise ValueError(f"lora expand: tokens_per_cta = {self.tokens_per_cta} (1 to 16)")

    @property
    def out(self) -> int:
        return sum(self.slices)

    @property
    def starts(self) -> tuple[int, ...]:
        """Each slice's first output column."""
        at, out = 0, []
        for w in self.slices:
            out.append(at)
            at += w
        return tuple(out)

    @property
    def chunk(self) -> int:
        """Rows of b a thread has in flight at once (JC: 16, or 8 where 16 does not divide R)."""
        return 16 if self.rank % 16 == 0 else 8

    @property
    def smem_bytes(self) -> int:
        """The staged v rows (MB x S R f32) and their tokens (MB x 8 bytes), static shared memory."""
        return self.tokens_per_cta * (len(self.slices) * self.rank * 4 + 8)

    @property
    def key(self) -> str:
        widths = "x".join(map(str, self.slices))
        return (f"lora_expand_o{widths}_r{self.rank}_{self.dtype}{'_bias' * self.bias}_t{self.threads}"
                f"m{self.tokens_per_cta}_{self.arch.replace('_', '')}")

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_expand_abi(self),)

    def source(self) -> str:
        return _expand_source(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "slices": list(self.slices), "rank": self.rank, "bias": self.bias}


@dataclass(frozen=True, kw_only=True)
class LoraMaskPlan(KernelPlan):
    """v T [tokens, slots S R] (rows ldv apart), slot int32 [tokens], scales f32 [slots + 1, S]
    -> vm T [tokens, S, slots, R], rows ldvm apart (the module's docstring)."""

    family: ClassVar[str] = "lora_mask"
    threads: ClassVar[int] = 256
    dtype: str
    slots: int                 # E
    rank: int                  # R, a multiple of 8
    slices: int = 1            # S
    copy_k: int = 0            # K > 0: also copy x [tokens, K] into columns 0 .. K - 1 of vm's rows
    arch: str = "sm_90"

    def __post_init__(self):
        _check_common("lora mask", self.dtype, self.rank, self.slices, self.arch)
        _positive("lora mask", slots=self.slots)
        if self.copy_k < 0 or self.copy_k % 8:
            raise ValueError(f"lora mask: copy_k must be a multiple of 8 (16-byte vectors), got {self.copy_k}")

    @property
    def key(self) -> str:
        copy = f"_x{self.copy_k}" if self.copy_k else ""
        return f"lora_mask_e{self.slots}_r{self.rank}x{self.slices}{copy}_{self.dtype}_{self.arch.replace('_', '')}"

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_mask_abi(self),)

    def source(self) -> str:
        return _mask_source(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "slots": self.slots, "rank": self.rank, "slices": self.slices,
                **({"copy_k": self.copy_k} if self.copy_k else {})}


def plan_lora_mask(dtype: str, *, slots: int, rank: int, slices: int = 1, copy_k: int = 0,
                   arch: str = "sm_90") -> LoraMaskPlan:
    """The mask; copy_k = K: the K-extended operand [x | vm] made whole in the same launch."""
    return LoraMaskPlan(dtype=dtype, slots=slots, rank=rank, slices=slices, copy_k=copy_k, arch=arch)


def plan_lora_shrink(dtype: str, *, k: int, rank: int, slices: int = 1, arch: str = "sm_90",
                     warps: int | None = None) -> LoraShrinkPlan:
    """The shrink for K-long rows; warps default: K / 512 (a lane's two 16-byte steps of K), 4 to 16."""
    if warps is None:
        warps = min(16, max(4, k // 512))
    return LoraShrinkPlan(dtype=dtype, k=k, rank=rank, slices=slices, warps=warps, arch=arch)


def plan_lora_expand(dtype: str, *, slices: tuple[int, ...] | list[int], rank: int, bias: bool = False,
                     arch: str = "sm_90", threads: int = 64, tokens_per_cta: int = 8) -> LoraExpandPlan:
    return LoraExpandPlan(dtype=dtype, slices=tuple(slices), rank=rank, bias=bias, threads=threads,
                          tokens_per_cta=tokens_per_cta, arch=arch)


# ---- ABIs and sources ------------------------------------------------------------------------
_I32_IN = "const int* __restrict__"



@functools.lru_cache(maxsize=64)
def _shrink_abi(plan: LoraShrinkPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (Arg("x", f"const {t}* __restrict__", "input"), Arg("a", f"const {t}* __restrict__", "input"),
            Arg("ranks", _I32_IN, "input"), Arg("offsets", _I32_IN, "input"), Arg("src", _I32_IN, "input"),
            Arg("v", f"{t}* __restrict__", "output", "0"), Arg("n_tokens", "long long", "dim", "tokens"))
    grid = (f"cdiv({plan.rows}, {plan.rows_per_cta})", "slots", f"cdiv(tokens, {plan.tokens_per_cta})")
    return KernelABI(name=plan.kernel_name, args=args, grid=grid, block=(32 * plan.warps,), problem=("slots", "tokens"))


@functools.lru_cache(maxsize=64)
def _shrink_source(plan: LoraShrinkPlan) -> str:
    return render("cuda/lora_shrink.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key,
                  common=read_template("cuda/common.cuh"), signature=plan.abi.signature, T=ops.storage_ctype(plan.dtype),
                  k=plan.k, rank=plan.rank, slices=plan.slices, rows_per_cta=plan.rows_per_cta,
                  tokens_per_cta=plan.tokens_per_cta, warps=plan.warps)


@functools.lru_cache(maxsize=64)
def _expand_abi(plan: LoraExpandPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = [Arg("y", f"const {t}*", "input"), Arg("ldy", "int", "dim"), Arg("v", f"const {t}* __restrict__", "input"),
            Arg("ldv", "int", "dim"), Arg("vslot", "int", "dim"), Arg("b", f"const {t}* __restrict__", "input"),
            Arg("ranks", _I32_IN, "input"), Arg("scales", "const float* __restrict__", "input"),
            Arg("offsets", _I32_IN, "input"), Arg("src", _I32_IN, "input")]
    if plan.bias:
        args.append(Arg("bias", f"const {t}* __restrict__", "input"))
    args += [Arg("out", f"{t}*", "output", "0"), Arg("n_tokens", "long long", "dim", "tokens"),
             Arg("slots", "int", "dim")]
    grid = (f"cdiv({plan.out}, {8 * plan.threads})", "groups", f"cdiv(tokens, {plan.tokens_per_cta})")
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=grid, block=(plan.threads,),
                     problem=("groups", "tokens"))


@functools.lru_cache(maxsize=64)
def _expand_source(plan: LoraExpandPlan) -> str:
    return render("cuda/lora_expand.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key,
                  common=read_template("cuda/common.cuh"), signature=plan.abi.signature, T=ops.storage_ctype(plan.dtype),
                  out=plan.out, rank=plan.rank, slices=len(plan.slices), starts=plan.starts, threads=plan.threads,
                  tokens_per_cta=plan.tokens_per_cta, chunk=plan.chunk, bias=plan.bias)


@functools.lru_cache(maxsize=64)
def _mask_abi(plan: LoraMaskPlan) -> KernelABI:
    t = ops.storage_ctype(plan.dtype)
    args = (Arg("v", f"const {t}* __restrict__", "input"), Arg("ldv", "long long", "dim"),
            Arg("slot", _I32_IN, "input"), Arg("scales", "const float* __restrict__", "input"),
            *((Arg("x", f"const {t}* __restrict__", "input"),) if plan.copy_k else ()),
            Arg("vm", f"{t}* __restrict__", "output", "0"), Arg("ldvm", "long long", "dim"),
            Arg("n_tokens", "long long", "dim", "tokens"))
    vecs = (plan.copy_k + plan.slices * plan.slots * plan.rank) // 8
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"cdiv(tokens * {vecs}, {plan.threads})",),
                     block=(plan.threads,), problem=("tokens",))


@functools.lru_cache(maxsize=64)
def _mask_source(plan: LoraMaskPlan) -> str:
    return render("cuda/lora_mask.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key,
                  common=read_template("cuda/common.cuh"), signature=plan.abi.signature, T=ops.storage_ctype(plan.dtype),
                  slots=plan.slots, rank=plan.rank, slices=plan.slices, threads=plan.threads, copy_k=plan.copy_k)
