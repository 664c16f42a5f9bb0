"""Kernel plans: what one generated kernel is, as a frozen, hashable value with a readable key.

    plan = plan_layer(program.specialise("add_rms_norm", H=4096, dtype="bf16"), arch="sm_90")
    plan.key        -> 'add_rms_norm_h4096_bf16_sm90'
    plan.source()   -> CUDA C (deterministic: same plan, same bytes)
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..dsl.program import Layer
from .render import read_template, render
from .row import KernelArg, LoweringError, RowKernel, RowLowering

__all__ = ["KernelPlan", "plan_layer", "LoweringError"]


@dataclass(frozen=True)
class KernelPlan:
    layer: Layer
    family: str            # "row"
    arch: str              # "sm_90"
    vec_bytes: int = 16    # widest vector access; 0..16 (a plan with 2 serves unaligned tensors)
    tpr: int | None = None # threads per row; None = chosen from the widths

    @property
    def key(self) -> str:
        extra = [f"v{self.vec_bytes}"] if self.vec_bytes != 16 else []
        extra += [f"t{self.tpr}"] if self.tpr is not None else []
        return layer_key(self.layer, *extra, self.arch.replace("_", ""))

    @property
    def kernel_name(self) -> str:
        return "lf_" + self.key

    def lowered(self) -> RowKernel:
        return _lower(self)

    def source(self) -> str:
        k = self.lowered()
        return render("cuda/row_kernel.cu.jinja", kernel_name=self.kernel_name, plan_key=self.key,
                      common=read_template("cuda/common.cuh"), args=k.args, tpr=k.tpr, rpb=k.rpb,
                      smem_floats=max(1, k.smem_floats), topk=k.topk_smem, body=k.body)

    @property
    def args(self) -> list[KernelArg]:
        return self.lowered().args


@functools.lru_cache(maxsize=512)
def _lower(plan: KernelPlan) -> RowKernel:
    return RowLowering(plan.layer.function, plan.kernel_name, max_vec_bytes=max(1, plan.vec_bytes),
                       tpr=plan.tpr).lower()


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "T" if v else "F"
    if isinstance(v, float):
        return f"{v:g}".replace(".", "p").replace("-", "m").replace("+", "")
    return str(v)


def layer_key(layer: Layer, *suffix: str) -> str:
    """A readable kernel key: name, bound dims, consts, dtype, then `suffix` (arch, variant)."""
    parts = [layer.name] + [f"{k.lower()}{v}" for k, v in layer.dims]
    parts += [f"{k}{_fmt(v)}" for k, v in layer.consts]
    if layer.dtype is not None:
        parts.append(str(layer.dtype))
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts + list(suffix)))


def plan_layer(layer: Layer, arch: str, *, vec_bytes: int = 16, tpr: int | None = None) -> KernelPlan:
    """The kernel plan for a specialised layer; raises LoweringError if no family fits."""
    if layer.function.kind != "layer":
        raise LoweringError(f"{layer.name}: attention blocks use the attention kernel family")
    plan = KernelPlan(layer, "row", arch, vec_bytes, tpr)
    plan.lowered()  # fail early, with the reason
    return plan
