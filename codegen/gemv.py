"""Small-token matrix products (decode): y = x @ W^T for up to 16 tokens, with the epilogue of
the layer around it fused (bias, a gated activation over W's two row halves, a residual add).

    plan = plan_gemv("bf16", n=6144, k=4096, max_m=8, arch="sm_90")
    plan.key       -> 'gemv_n6144_k4096_m8_bf16_r1w8u4_sm90'
    plan.source()  -> CUDA C

At 1-16 tokens a product is bound by reading W (N x K elements, once), and cuBLAS reaches
2.2-3.8 TB/s of the H200's 4.25 at Llama shapes (issue 12's measurements). The kernel streams
W in 16-byte loads, UNROLL chunks in flight per warp, and computes on the tensor cores with the
tokens on the narrow (n8) side of m16n8k16, W rows on the wide one; the warps of a CTA split K
and add their partial sums in shared memory, where the epilogue runs.
Gated (SwiGLU / GeGLU): W holds the gate rows then the up rows ([2 F, K], as a fused gate/up
Linear does), and y[m, f] = act(gate[m, f]) * up[m, f] comes out without the [M, 2 F] round trip.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from .abi import Arg, KernelABI
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["GemvPlan", "plan_gemv", "MAX_M", "GATED"]

MAX_M = 16
GATED = ("silu", "gelu", "gelu_tanh")
_TYPES = {"bf16": ("__nv_bfloat16", "bf16"), "f16": ("__half", "f16")}


@dataclass(frozen=True, kw_only=True)
class GemvPlan(KernelPlan):
    family: ClassVar[str] = "gemv"
    dtype: str                   # "bf16" | "f16": x, W, bias, residual and y
    n: int                       # W's rows (gated: 2 x the output columns)
    k: int                       # the reduction length (W's columns), a multiple of 8
    max_m: int = 8               # tokens the kernel serves: 8 (one n8 tile) or 16 (two)
    gated: str | None = None     # None | "silu" | "gelu" (erf) | "gelu_tanh"
    bias: bool = False
    residual: bool = False
    arch: str = "sm_90"
    rt: int = 1                  # 16-column output tiles per CTA
    warps: int = 8               # warps per CTA, splitting K
    unroll: int = 4              # 32-wide K chunks per warp in flight

    def __post_init__(self):
        if self.dtype not in _TYPES:
            raise ValueError(f"gemv: dtype must be one of {sorted(_TYPES)}, got {self.dtype!r}")
        for name in ("n", "k", "rt", "warps", "unroll"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"gemv: {name} must be a positive int, got {v!r}")
        if self.k % 8:
            raise ValueError(f"gemv: K = {self.k} must be a multiple of 8 (rows of 16-byte vectors)")
        if self.max_m not in (8, 16):
            raise ValueError(f"gemv: max_m must be 8 or 16, got {self.max_m!r}")
        if self.gated is not None and self.gated not in GATED:
            raise ValueError(f"gemv: gated must be one of {GATED} or None, got {self.gated!r}")
        if self.gated and self.n % 2:
            raise ValueError(f"gemv: a gated product needs an even number of rows (gate then up), got {self.n}")
        if int(self.arch.removeprefix("sm_").rstrip("af")) < 80:
            raise ValueError(f"gemv: the kernel uses sm_80 tensor-core instructions, not {self.arch}")

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.gated else self.n

    @property
    def key(self) -> str:
        parts = ["gemv", f"n{self.n}", f"k{self.k}", f"m{self.max_m}", self.dtype]
        if self.gated:
            parts.append(self.gated)
        if self.bias:
            parts.append("bias")
        if self.residual:
            parts.append("res")
        parts.append(f"r{self.rt}w{self.warps}u{self.unroll}")
        parts.append(self.arch.replace("_", ""))
        return "_".join(parts)

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "n": self.n, "k": self.k, "max_m": self.max_m, "gated": self.gated,
                "bias": self.bias, "residual": self.residual, "n_out": self.n_out}


@functools.lru_cache(maxsize=256)
def _abi(plan: GemvPlan) -> KernelABI:
    t = _TYPES[plan.dtype][0]
    args = [Arg("x", f"const {t}* __restrict__", "input"), Arg("w", f"const {t}* __restrict__", "input")]
    if plan.bias:
        args.append(Arg("bias", f"const {t}* __restrict__", "input"))
    if plan.residual:
        args.append(Arg("residual", f"const {t}* __restrict__", "input"))
    args += [Arg("out", f"{t}* __restrict__", "output"), Arg("M", "int", "dim")]
    return KernelABI(name=plan.kernel_name, args=tuple(args), grid=(f"cdiv({plan.n_out}, {16 * plan.rt})",),
                     block=(32 * plan.warps,), problem=())


@functools.lru_cache(maxsize=256)
def _render(plan: GemvPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    return render("cuda/gemv.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, N=plan.n, K=plan.k,
                  NOUT=plan.n_out, RT=plan.rt, MT=plan.max_m // 8, WARPS=plan.warps, UNROLL=plan.unroll,
                  GATED=plan.gated, BIAS=plan.bias, RESIDUAL=plan.residual)


def plan_gemv(dtype: str, *, n: int, k: int, max_m: int = 8, gated: str | None = None, bias: bool = False,
              residual: bool = False, arch: str = "sm_90", rt: int = 1, warps: int | None = None,
              unroll: int | None = None) -> GemvPlan:
    """The plan for a product of at most `max_m` tokens (rounded up to 8 or 16); rt, warps and
    unroll override the work split (benchmarks/bench_gemv.py sweeps them).
    Defaults from the H200 sweep (NOTES.md, "Small-token products"): occupancy is what moves
    the weight stream, so the fewest registers win — 2 chunks in flight per step where a chunk
    is 3 loads per lane (one 16-row tile, up to 8 tokens), else 1; 8 warps split K, 4 where
    there are 512 or more CTAs (gate/up, lm_head) to fill the GPU anyway."""
    if not 1 <= max_m <= MAX_M:
        raise ValueError(f"gemv: serves 1 to {MAX_M} tokens, got max_m = {max_m}")
    mt = 1 if max_m <= 8 else 2
    if unroll is None:
        loads = 2 * rt * (2 if gated else 1) + mt   # 16-byte loads per lane per chunk
        unroll = 2 if loads <= 3 else 1
    if warps is None:
        warps = 4 if -(-(n // 2 if gated else n) // (16 * rt)) >= 512 else 8
    return GemvPlan(dtype=dtype, n=n, k=k, max_m=8 * mt, gated=gated, bias=bias, residual=residual,
                    arch=arch, rt=rt, warps=warps, unroll=unroll)
