"""Matrix products on Hopper tensor cores (sm_90a): y = x @ W^T for any number of tokens, with
the layer's epilogue fused (bias, a gated activation over W's two row halves, a residual add).

    plan = plan_gemm("bf16", n=28672, k=4096, gated="silu")
    plan.key       -> 'gemm_n28672_k4096_bf16_silu_bn256s4_sm90a'
    plan.source()  -> CUDA C

The small-token kernel (codegen/gemv.py) serves decode; this one is for prefill-sized M, where
a product is bound by the tensor cores. A CTA computes a 128 x BN tile of x W^T (BN rows of W:
gated, BN / 2 gate rows and the same BN / 2 up rows, so act(gate) * up is formed in registers)
with three warpgroups, the structure of the Hopper attention prefill (templates/cuda/
hopper.cuh.jinja is the shared toolkit): a producer warpgroup copies 64-wide K slices of the x
and W tiles by cp.async into a ring of STAGES buffers in the 128-byte swizzle layout the wgmma
descriptors read and signals each on a "full" mbarrier; two consumer warpgroups (64 rows each)
run wgmma with both operands from shared memory, keep one k-slice of MMAs in flight and hand
each buffer back on its "empty" mbarrier. The epilogue goes from the accumulators to memory.
Not yet here: TMA loads (host-encoded tensor maps), a persistent tile scheduler, FP8 / 4-bit
weights on this path (the small-token kernel has them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from .abi import KernelABI, SharedLayout
from .gemv import _TYPES, check_product, product_args
from .plan import KernelPlan
from .render import read_template, render

__all__ = ["GemmPlan", "plan_gemm", "BM"]

BM = 128                 # rows (tokens) per CTA: two consumer warpgroups of 64
BK = 64                  # K per stage: one 128-byte swizzle row
SHARED_LIMIT = 227 * 1024


@dataclass(frozen=True, kw_only=True)
class GemmPlan(KernelPlan):
    family: ClassVar[str] = "gemm"
    dtype: str                   # "bf16" | "f16": x, W, bias, residual and y
    n: int                       # W's rows (gated: 2 x the output columns)
    k: int                       # the reduction length, a multiple of 8
    gated: str | None = None
    bias: bool = False
    residual: bool = False
    arch: str = "sm_90a"
    bn: int = 256                # W rows per CTA tile (the wgmma N)
    stages: int = 4
    producer_regs: int = 40
    consumer_regs: int = 232

    def __post_init__(self):
        check_product(self, "gemm", ("n", "k", "bn", "stages"))
        if self.bn not in (64, 128, 256) or self.stages < 2:
            raise ValueError(f"gemm: bn must be 64, 128 or 256 and stages >= 2, got {self.bn}, {self.stages}")
        if self.arch != "sm_90a":
            raise ValueError(f"gemm: the kernel uses sm_90a's wgmma and setmaxnreg, not {self.arch}")
        if 128 * (self.producer_regs + 2 * self.consumer_regs) > 65536:
            raise ValueError(f"gemm: register budgets {self.producer_regs}/{self.consumer_regs} exceed the SM's 64K")
        if self.shared_bytes > SHARED_LIMIT:
            raise ValueError(f"gemm: {self.shared_bytes} bytes of shared memory pass the {SHARED_LIMIT} a CTA can have")

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.gated else self.n

    @property
    def bn_out(self) -> int:
        """Output columns per CTA tile."""
        return self.bn // 2 if self.gated else self.bn

    @property
    def key(self) -> str:
        parts = ["gemm", f"n{self.n}", f"k{self.k}", self.dtype]
        if self.gated:
            parts.append(self.gated)
        if self.bias:
            parts.append("bias")
        if self.residual:
            parts.append("res")
        parts.append(f"bn{self.bn}s{self.stages}")
        parts.append(self.arch.replace("_", ""))
        return "_".join(parts)

    @property
    def shared_layout(self) -> SharedLayout:
        """The x and W stages (1024-byte aligned: the swizzle reads address bits 7-9), then the
        full / empty mbarriers."""
        return SharedLayout((("sA", self.stages * BM * BK * 2), ("sB", self.stages * self.bn * BK * 2),
                             ("bars", 8 * 2 * self.stages)), align=1024)

    @property
    def shared_bytes(self) -> int:
        return self.shared_layout.bytes + 1024   # the kernel aligns its base up to 1024 bytes

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def source(self) -> str:
        return _render(self)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "n": self.n, "k": self.k, "gated": self.gated, "bias": self.bias,
                "residual": self.residual, "n_out": self.n_out, "tile": [BM, self.bn, BK], "stages": self.stages}


@functools.lru_cache(maxsize=256)
def _abi(plan: GemmPlan) -> KernelABI:
    return KernelABI(name=plan.kernel_name, args=tuple(product_args(plan)),
                     grid=(f"cdiv({plan.n_out}, {plan.bn_out})", f"cdiv(M, {BM})"), block=(384,),
                     shared_bytes=plan.shared_bytes, problem=("M",))


@functools.lru_cache(maxsize=256)
def _render(plan: GemmPlan) -> str:
    t, mma = _TYPES[plan.dtype]
    return render("cuda/gemm_wgmma.cu.jinja", kernel_name=plan.kernel_name, signature=plan.abi.signature,
                  plan_key=plan.key, common=read_template("cuda/common.cuh"), T=t, MMA_T=mma, N=plan.n, K=plan.k,
                  NOUT=plan.n_out, BN=plan.bn, STAGES=plan.stages, GATED=plan.gated, BIAS=plan.bias,
                  RESIDUAL=plan.residual, smem=plan.shared_layout.offsets, PRODUCER_REGS=plan.producer_regs,
                  CONSUMER_REGS=plan.consumer_regs, wgmma_ops=[{"n": plan.bn, "a": "ss", "t": mma}])


def plan_gemm(dtype: str, *, n: int, k: int, gated: str | None = None, bias: bool = False, residual: bool = False,
              arch: str = "sm_90a", bn: int | None = None, stages: int | None = None) -> GemmPlan:
    """The Hopper plan of a product; bn and stages override the tile (128 x 256 x 64, 4 stages:
    192 KB of shared memory, one CTA an SM)."""
    bn = 256 if bn is None else bn
    if stages is None:
        stages = max(2, min(6, (SHARED_LIMIT - 2048) // ((BM + bn) * BK * 2)))
    return GemmPlan(dtype=dtype, n=n, k=k, gated=gated, bias=bias, residual=residual, arch=arch, bn=bn,
                    stages=stages)
