"""Quantised weights back to the activation dtype on the GPU: W [N, K] in T from the layouts of
the quantised small-token product (codegen/gemv.py's docstring: u4, i8, f8e4m3).

    plan = plan_dequant("bf16", wtype="u4", group=128, n=14336, k=4096, arch="sm_90")
    plan.key -> 'dequant_n14336_k4096_bf16_u4g128_sm90'

Past the rows the small-token kernel serves (prefill), a product is bound by the tensor cores,
not by W's bytes: there the quantised layers write W once into a T scratch buffer with this
kernel (reading the packed bytes and writing 2 bytes a weight, ~0.6 ms a billion weights at the
copy ceiling) and hand the product to the dense GEMM. Each thread converts 8 k of one row (u4:
one word; i8 and f8e4m3: 8 bytes) with the small-token kernel's own conversions (templates/cuda/
gemv_quant.cuh.jinja: the same roundings, so both paths give the same W) and writes them as one
16-byte vector, so a warp's loads and stores are each one contiguous run.
    u4 / i8 with groups: W = (q - z) * s in T (one multiply, the only rounding);
    i8, one scale a row: q * s rounded once to T;
    f8e4m3: e4m3 -> f32 (exact), times the f32 row or 128 x 128 block scale, rounded once to T.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from .abi import Arg, KernelABI
from . import ops
from .gemv import FP8_MIN_ARCH, GROUPS, WTYPES, _TYPES, wtype_label
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["DequantPlan", "plan_dequant", "QuantRowsPlan", "THREADS"]

THREADS = 256


@dataclass(frozen=True, kw_only=True)
class DequantPlan(KernelPlan):
    family: ClassVar[str] = "dequant"
    dtype: str                 # "bf16" | "f16": the output (and the pairs' / row scales') type
    wtype: str                 # "u4" | "i8" | "f8e4m3"
    group: int                 # as GemvPlan's
    n: int
    k: int
    arch: str = "sm_90"

    def __post_init__(self):
        if self.dtype not in _TYPES:
            raise ValueError(f"dequant: dtype must be one of {sorted(_TYPES)}, got {self.dtype!r}")
        if self.wtype not in WTYPES:
            raise ValueError(f"dequant: wtype must be one of {sorted(WTYPES)}, got {self.wtype!r}")
        if self.group not in GROUPS[self.wtype]:
            raise ValueError(f"dequant: {self.wtype} group size must be one of {GROUPS[self.wtype]}, got {self.group!r}")
        for name in ("n", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"dequant: {name} must be a positive int, got {v!r}")
        if self.k % self.piece_k:
            raise ValueError(f"dequant: {self.wtype} K = {self.k} must be a multiple of {self.piece_k} "
                             "(16-byte pieces of packed W)")
        if self.group and self.wtype != "f8e4m3" and self.k % self.group:
            raise ValueError(f"dequant: the group size {self.group} must divide K = {self.k}")
        if self.wtype == "f8e4m3" and ops.arch_number(self.arch) < FP8_MIN_ARCH:
            raise ValueError(f"dequant: f8e4m3 converts with sm_89's cvt, not on {self.arch}")
        if ops.arch_number(self.arch) < 80:
            raise ValueError(f"dequant: sm_80 or newer, not {self.arch}")

    @property
    def piece_k(self) -> int:
        """K must be a multiple of this (the quantised layouts' rows of 16-byte pieces)."""
        return 32 if self.wtype == "u4" else 16

    @property
    def threads(self) -> int:
        """One a run of 8 k."""
        return self.n * (self.k // 8)

    @property
    def key(self) -> str:
        return (f"dequant_n{self.n}_k{self.k}_{self.dtype}_{wtype_label(self.wtype, self.group)}_"
                f"{self.arch.replace('_', '')}")

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "wtype": self.wtype, "group": self.group, "n": self.n, "k": self.k}


@functools.lru_cache(maxsize=256)
def _abi(plan: DequantPlan) -> KernelABI:
    t = _TYPES[plan.dtype][0]
    wt = {"u4": "unsigned", "i8": "signed char", "f8e4m3": "unsigned char"}[plan.wtype]
    scales = (Arg("wscale", "const float* __restrict__", "input") if plan.wtype == "f8e4m3" else
              Arg("wgroup", "const unsigned* __restrict__", "input") if plan.group else
              Arg("wscale", f"const {t}* __restrict__", "input"))
    args = (Arg("w", f"const {wt}* __restrict__", "input"), scales, Arg("out", f"{t}* __restrict__", "output"))
    blocks = -(-plan.threads // THREADS)
    return KernelABI(name=plan.kernel_name, args=args, grid=(str(blocks),), block=(THREADS,))


@functools.lru_cache(maxsize=256)
def _render(plan: DequantPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    return render("cuda/dequant.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, N=plan.n, K=plan.k,
                  WTYPE=plan.wtype, GROUP=plan.group, THREADS=THREADS)


def plan_dequant(dtype: str, *, wtype: str, group: int, n: int, k: int, arch: str = "sm_90") -> DequantPlan:
    return DequantPlan(dtype=dtype, wtype=wtype, group=group, n=n, k=k, arch=arch)


ROW_WARPS = 8
TOKEN_CHUNKS = 4   # per-token quantisation: 8-element chunks a thread (16-byte loads held in registers)


def _row_kernel(plan) -> bool:
    """A CTA a token (the row in registers): per token always, per 128 k where the row fits (16
    bytes a load; the warp-a-block kernel loads 8: measured 0.45-0.6 of copy at Llama's K)."""
    return plan.group == 0 or plan.k <= 8 * 1024 * TOKEN_CHUNKS


def token_threads(k: int) -> int:
    """Threads of the per-token quantisation's CTA: TOKEN_CHUNKS chunks of 8 a thread, whole warps,
    at least 2 warps (K 4096: 128 threads, 14336: 448)."""
    return max(64, -(-k // (8 * TOKEN_CHUNKS * 32)) * 32)


@dataclass(frozen=True, kw_only=True)
class QuantRowsPlan(KernelPlan):
    """The W8A8 products' activation quantisation in one pass over x (templates/cuda/
    quant_fp8_rows.cu.jinja): x [M, K] -> e4m3 bytes [M, K] and f32 scales [M, ceil(K / 128)]
    (group 128: one a token and 128 k) or [M, 1] (group 0: one a token, the Hopper FP8 GEMM's),
    runtime/quant.quantize_fp8_rows's bytes exactly (group 0: its group K). A CTA a row held in
    registers (token_threads(K) threads of 8-element chunks; group 128 past 32768 k: a warp a block)."""
    family: ClassVar[str] = "quant_rows"
    dtype: str                 # "bf16" | "f16": x
    k: int
    arch: str = "sm_90"
    group: int = 128           # k per scale: 128, or 0 (the whole row: per token)

    def __post_init__(self):
        if self.dtype not in _TYPES:
            raise ValueError(f"quant_rows: dtype must be one of {sorted(_TYPES)}, got {self.dtype!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 8 or self.k % 8:
            raise ValueError(f"quant_rows: K must be a positive multiple of 8, got {self.k!r}")
        if ops.arch_number(self.arch) < FP8_MIN_ARCH:
            raise ValueError(f"quant_rows: e4m3 conversion needs sm_89 or newer, not {self.arch}")
        if self.group not in (0, 128):
            raise ValueError(f"quant_rows: group must be 128 or 0 (one scale a token), got {self.group!r}")
        if self.group == 0 and self.k > 8 * 1024 * TOKEN_CHUNKS:
            raise ValueError(f"quant_rows: a row of K = {self.k} does not fit a CTA's registers "
                             f"(at most {8 * 1024 * TOKEN_CHUNKS})")

    @property
    def key(self) -> str:
        tok = "_tok" if self.group == 0 else ""
        return f"quant_rows_k{self.k}_{self.dtype}_f8e4m3{tok}_{self.arch.replace('_', '')}"

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_rows_abi(self),)

    def source(self) -> str:
        return _rows_render(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "k": self.k, "wtype": "f8e4m3", "block": self.group or "token"}


@functools.lru_cache(maxsize=64)
def _rows_abi(plan: QuantRowsPlan) -> KernelABI:
    t = _TYPES[plan.dtype][0]
    args = (Arg("x", f"const {t}* __restrict__", "input"), Arg("q", "unsigned char* __restrict__", "output"),
            Arg("scale", "float* __restrict__", "output"), Arg("M", "int", "dim"))
    if _row_kernel(plan):   # a CTA a token
        return KernelABI(name=plan.kernel_name, args=args, grid=("M",), block=(token_threads(plan.k),), problem=("M",))
    kb = -(-plan.k // 128)
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"cdiv(M * {kb}, {ROW_WARPS})",),
                     block=(32 * ROW_WARPS,), problem=("M",))


@functools.lru_cache(maxsize=64)
def _rows_render(plan: QuantRowsPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    return render("cuda/quant_fp8_rows.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, K=plan.k,
                  WARPS=ROW_WARPS, WTYPE="f8e4m3", GROUP=0, TOKEN=plan.group == 0, ROW=_row_kernel(plan),
                  THREADS=token_threads(plan.k), CHUNKS=-(-plan.k // (8 * token_threads(plan.k))),
                  TRIGGER=ops.arch_number(plan.arch) >= 90)
