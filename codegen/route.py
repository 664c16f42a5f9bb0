"""The grouped MoE routing kernel (DeepSeek-V2/V3): the standard library's `moe_route_grouped`
(V3's sigmoid scores plus a bias, groups scored by their best two) and `moe_route_limited` (V2's
softmax scores, groups scored by their best expert, no bias).

    plan = plan_route(stdlib().specialise("moe_route_grouped", E=256, n_group=8, topk_group=4, k=8), "sm_90")
    plan.key   'moe_route_grouped_e256_k8_n_group8_topk_group4_f32_sm90'

Its math reduces rows of two shapes (each group's best two, then the groups, then the
experts), which the row family's one row space cannot hold; a token's experts fit one warp's
registers (E <= 512), so one warp per token does all of it (templates/cuda/moe_route_grouped.cu.jinja).
The plan reads the layer's consts; the reference evaluator runs the same definition, so the
kernel and the reference agree by construction of the DSL text, ties included (lowest index).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..dsl.program import Layer
from . import ops
from .abi import Arg, KernelABI
from .plan import KernelPlan, layer_interface, layer_key
from .render import read_template, render
from .row import LoweringError

__all__ = ["RoutePlan", "RouteRows", "plan_route", "serves"]

ROUTE_LAYER = "moe_route_grouped"
ROUTE_LAYERS = (ROUTE_LAYER, "moe_route_limited")   # the layers this kernel serves: scoring mode "sigmoid", "softmax"
STDLIB_FILE = "<stdlib>/rows.lf"
MAX_EXPERTS = 512     # 16 per lane: two f32 and one 64-bit key each, in registers
MAX_GROUPS = 32       # one bit each of the kept mask
MAX_K = 32            # one output per lane
WARPS = 4             # tokens per block


def serves(layer: Layer) -> bool:
    """The standard library's grouped routing layers (a user's layer of those names is not one)."""
    fn = layer.function
    return fn.name in ROUTE_LAYERS and fn.span.file == STDLIB_FILE


@dataclass(frozen=True)
class RouteRows:
    """What the runtime reads of a lowered row-space kernel (RowKernel has it too): its rows."""
    lead_dims: tuple


def _consts(layer: Layer) -> dict[str, Any]:
    """Every const of the layer: the bound ones over the declared defaults."""
    out = {p.name: p.default for p in layer.function.params if p.kind == "const"}
    out.update(dict(layer.consts))
    return out


@dataclass(frozen=True, kw_only=True)
class RoutePlan(KernelPlan):
    """One warp per token: logits [N, E] (T), bias [E] (f32; moe_route_grouped only) -> weights f32 [N, k],
    ids i32 [N, k]."""

    family: ClassVar[str] = "moe_route"
    layer: Layer
    arch: str
    vec_bytes: int = 16    # accepted for the row family's interface; the kernel loads scalars

    def __post_init__(self):
        c, e = self.consts, self.experts
        g, tg, k = c["n_group"], c["topk_group"], c["k"]
        why = None
        if not 1 <= e <= MAX_EXPERTS:
            why = f"E = {e} experts (the kernel holds up to {MAX_EXPERTS})"
        elif not 1 <= g <= MAX_GROUPS or e % g:
            why = f"n_group = {g} (1 to {MAX_GROUPS}, dividing E = {e})"
        elif e // g < 2 and not self.softmax:
            why = f"groups of {e // g} expert (a group scores its best two)"
        elif not 1 <= tg <= g:
            why = f"topk_group = {tg} (1 to n_group = {g})"
        elif not 1 <= k <= min(MAX_K, e):
            why = f"k = {k} (1 to {min(MAX_K, e)})"
        if why is not None:
            raise LoweringError(f"{self.layer.name}: no routing kernel for {why}")

    @property
    def consts(self) -> dict[str, Any]:
        return _consts(self.layer)

    @property
    def softmax(self) -> bool:
        """moe_route_limited: softmax scores, a group's best expert, no bias."""
        return self.layer.function.name == "moe_route_limited"

    @property
    def experts(self) -> int:
        return int(self.layer.function.params[0].shape[-1])

    @property
    def key(self) -> str:
        return layer_key(self.layer, self.arch.replace("_", ""))

    def lowered(self) -> RouteRows:
        return RouteRows(lead_dims=tuple(self.layer.function.outputs[0].shape[:-1]))

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        logits = self.layer.function.params[0]
        bias = () if self.softmax else (Arg("p_bias", "const float* __restrict__", "input", "bias"),)
        args = (Arg("p_logits", f"const {ops.STORAGE_TYPE[logits.dtype]}* __restrict__", "input", "logits"),
                *bias,
                Arg("o_0", "float* __restrict__", "output", "0"),
                Arg("o_1", "int* __restrict__", "output", "1"),
                Arg("n_rows", "long long", "dim", "rows"))
        return (KernelABI(name=self.kernel_name, args=args, grid=(f"cdiv(rows, {WARPS})",), block=(32, WARPS),
                          problem=("rows",)),)

    def source(self) -> str:
        c, e = self.consts, self.experts
        return render("cuda/moe_route_grouped.cu.jinja", kernel_name=self.kernel_name, plan_key=self.key,
                      common=read_template("cuda/common.cuh"), signature=self.abi.signature,
                      x_type=ops.STORAGE_TYPE[self.layer.function.params[0].dtype], experts=e,
                      epl=-(-e // 32), n_group=c["n_group"], group_size=e // c["n_group"],
                      topk_group=c["topk_group"], k=c["k"], norm=bool(c["norm_topk_prob"]),
                      scale=f"{float(c['routed_scaling_factor'])!r}f", warps=WARPS, softmax=self.softmax)

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer.name, "dims": dict(self.layer.dims), "consts": self.consts,
                "dtype": str(self.layer.dtype), "vec_bytes": self.vec_bytes,
                "rows": [str(d) for d in self.lowered().lead_dims], "interface": layer_interface(self.layer)}


def plan_route(layer: Layer, arch: str, *, vec_bytes: int = 16) -> RoutePlan:
    if not serves(layer):
        raise LoweringError(f"{layer.name}: not the standard library's {' or '.join(ROUTE_LAYERS)}")
    return RoutePlan(layer=layer, arch=arch, vec_bytes=vec_bytes)
