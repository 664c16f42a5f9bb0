"""Kernel plans: what one generated kernel (or a kernel and its helpers) is, as a frozen,
hashable value with keyword fields and a readable key.

Every family's plan (rows here; attention in attention.py / attention_tc.py; the KV-cache
append in kv_append.py) is a `KernelPlan`:

    plan.key        'add_rms_norm_h4096_bf16_sm90'  (readable; names the cubin and the cache entry)
    plan.source()   CUDA C (deterministic: same plan, same bytes)
    plan.kernels    the KernelABI of every __global__ function in the source, main kernel first
    plan.describe() what the runtime needs besides the ABI, as JSON (the manifest's entry)

The build, the runtime and the TensorRT generator handle every family through this
interface alone. Tile searches take a `CompileFn` (codegen never imports the runtime).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol

from ..dsl.program import Layer
from .abi import KernelABI
from .render import read_template, render
from . import ops
from .ops import Q8_C_TYPE as ROW_8BIT
from .row import LoweringError, RowKernel, RowLowering

__all__ = ["KernelPlan", "RowPlan", "plan_layer", "layer_key", "layer_interface", "LoweringError", "CompileFn",
           "Resources"]


class Resources(Protocol):
    """What ptxas reports for one kernel (runtime.nvrtc.KernelResources has these fields)."""
    registers: int
    spill_stores: int
    spill_loads: int


# plan -> ptxas resources by kernel name, or None when it cannot compile now (e.g. compiling
# at run time is disabled and the plan is not in the cache). Given by the runtime.
CompileFn = Callable[["KernelPlan"], "Mapping[str, Resources] | None"]


class KernelPlan:
    """The interface every family's plan has (subclasses are frozen keyword dataclasses)."""

    family: ClassVar[str]
    arch: str

    @property
    def key(self) -> str:
        raise NotImplementedError

    @property
    def kernel_name(self) -> str:
        return "lf_" + self.key

    def source(self) -> str:
        raise NotImplementedError

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        raise NotImplementedError

    @property
    def abi(self) -> KernelABI:
        """The main kernel's ABI."""
        return self.kernels[0]

    def describe(self) -> dict[str, Any]:
        """Family fields of the manifest entry: what the runtime needs besides the ABIs."""
        raise NotImplementedError


def spill_free(plan: KernelPlan, compile_fn: CompileFn | None) -> bool:
    """True when the main kernel of `plan` compiles without register spills. Without a compile
    function (or when it cannot compile now) a candidate counts as spilling."""
    if compile_fn is None:
        return False
    res = compile_fn(plan)
    if res is None:
        return False
    main = res.get(plan.abi.name)
    return main is not None and main.spill_stores == 0 and main.spill_loads == 0


@dataclass(frozen=True, kw_only=True)
class RowPlan(KernelPlan):
    """Elementwise work plus reductions along the last axis, fused into one kernel."""

    family: ClassVar[str] = "row"
    layer: Layer
    arch: str              # "sm_90"
    vec_bytes: int = 16    # widest vector access; 0..16 (a plan with 2 serves unaligned tensors)
    tpr: int | None = None # threads per row (per block in split rows); None = chosen from the widths
    split: int | None = None  # blocks per row (consecutive blocks), rows without reductions; None = chosen
    #                            (wide rows split, others 1), 1 = one block per row
    cluster: int = 1       # > 1 (sm_90): a row with reductions split over the CTAs of a cluster of this size

    @property
    def key(self) -> str:
        extra = [f"v{self.vec_bytes}"] if self.vec_bytes != 16 else []
        extra += [f"t{self.tpr}"] if self.tpr is not None else []
        extra += [f"s{self.split}"] if self.split is not None else []
        extra += [f"c{self.cluster}"] if self.cluster > 1 else []
        return layer_key(self.layer, *extra, self.arch.replace("_", ""))

    def lowered(self) -> RowKernel:
        return _lower(self)

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_row_abi(self),)

    def source(self) -> str:
        k = self.lowered()
        # casts to and from i8 / f8e4m3: their helpers (quant8.cuh builds on fp8.cuh's exact e4m3 widening)
        quant = read_template("cuda/fp8.cuh") + read_template("cuda/quant8.cuh") if "quant8" in k.uses else ""
        return render("cuda/row_kernel.cu.jinja", kernel_name=self.kernel_name, plan_key=self.key,
                      common=read_template("cuda/common.cuh"), quant=quant, signature=self.abi.signature,
                      tpr=k.tpr, rpb=k.rpb, split=k.split, cluster=k.cluster,
                      smem_floats=max(1, k.smem_floats), topk=k.topk_smem, body=k.body)

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer.name, "dims": dict(self.layer.dims), "consts": dict(self.layer.consts),
                "dtype": str(self.layer.dtype), "vec_bytes": self.vec_bytes,
                "rows": [str(d) for d in self.lowered().lead_dims], "interface": layer_interface(self.layer)}


@functools.lru_cache(maxsize=512)
def _lower(plan: RowPlan) -> RowKernel:
    if plan.cluster > 1 and ops.arch_number(plan.arch) < 90:
        raise LoweringError(f"{plan.layer.name}: a row split over a cluster needs sm_90 (thread block clusters), "
                            f"not {plan.arch}")
    return RowLowering(plan.layer.function, plan.kernel_name, max_vec_bytes=max(1, plan.vec_bytes),
                       tpr=plan.tpr, split=plan.split, cluster=plan.cluster).lower()


@functools.lru_cache(maxsize=512)
def _row_abi(plan: RowPlan) -> KernelABI:
    k = plan.lowered()
    grid = (f"rows * {k.split}",) if k.split > 1 else (f"cdiv(rows, {k.rpb})",)   # split: one row per block
    return KernelABI(name=plan.kernel_name, args=tuple(k.args), grid=grid, block=(k.tpr, k.rpb), problem=("rows",))


# A row with reductions at least this wide (its widest loop's elements) may be split over a cluster of 4 CTAs
# at few rows (sm_90), over 8 from twice as wide: one CTA a row reads it at one SM's share of the bandwidth
# (the runtime takes it by default only from runtime/layers.ROW_CLUSTER_DEFAULT_WIDTH, where it was faster)
ROW_CLUSTER_MIN_WIDTH = 4096


def row_cluster_size(plan: KernelPlan, min_width: int = ROW_CLUSTER_MIN_WIDTH) -> int:
    """The cluster a row plan's layer splits a row over at few rows (RowPlan.cluster): 8 or 4 CTAs for a
    row with reductions (no top-k) from 2 x / 1 x ROW_CLUSTER_MIN_WIDTH columns on sm_90, else 1; rows
    narrower than min_width (a caller's threshold above ROW_CLUSTER_MIN_WIDTH) stay on one CTA."""
    if not isinstance(plan, RowPlan) or ops.arch_number(plan.arch) < 90 or plan.cluster > 1:
        return 1
    k = plan.lowered()
    if not k.reduces or k.topk or k.width < max(min_width, ROW_CLUSTER_MIN_WIDTH):
        return 1
    return 8 if k.width >= 2 * ROW_CLUSTER_MIN_WIDTH else 4


def layer_interface(layer: Layer) -> dict[str, Any]:
    """A layer's parameters and outputs as JSON (dims as expressions over the dynamic dims):
    what a module needs to check inputs and shape outputs without the DSL."""
    fn = layer.function
    params = []
    for p in fn.params:
        if p.kind in ("tensor", "state"):   # a state: a tensor argument the layer also rewrites
            params.append({"name": p.name, "kind": p.kind, "dtype": str(p.dtype), "shape": [str(d) for d in p.shape]})
        elif p.kind == "scalar":
            params.append({"name": p.name, "kind": "scalar", "dtype": str(p.dtype), "default": p.default})
    outputs = [{"dtype": str(o.dtype), "shape": [str(d) for d in o.shape]} for o in fn.outputs]
    return {"params": params, "outputs": outputs}


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


def plan_layer(layer: Layer, arch: str, *, vec_bytes: int = 16, tpr: int | None = None,
               split: int | None = None, cluster: int = 1) -> KernelPlan:
    """The row-kernel plan for a specialised layer (the grouped MoE routing layer's own family,
    codegen/route.py, for it); raises LoweringError if no family fits."""
    if layer.function.kind != "layer":
        raise LoweringError(f"{layer.name}: attention blocks use the attention kernel family")
    from .scan import not_lowered_reason, scan_parts
    what = scan_parts(layer.function)
    if what:   # a row kernel would never write the state back: never lowered by accident
        raise LoweringError(not_lowered_reason(layer) or f"{layer.name}: {what}: the scan family's kernels serve "
                            "it (codegen/scan_lower.py, through codegen/families.plans_for_layer), not a row kernel")
    fn = layer.function
    quantised = [(p.name, p.dtype) for p in fn.params if p.kind not in ("const", "scalar") and p.dtype.is_storage
                 and p.dtype not in ROW_8BIT] + [("an output", o.dtype) for o in fn.outputs
                                                 if o.dtype.is_storage and o.dtype not in ROW_8BIT]
    if quantised:   # the row kernels load and store float and integer types, i8 and f8e4m3 (codegen/ops.py)
        what, dt = quantised[0]
        raise LoweringError(f"{layer.name}: {what if what == 'an output' else repr(what)} is {dt}: the quantised "
                            f"types lower only as the weight of a product layer (codegen/linear_lower.py), and i8 "
                            f"and f8e4m3 also in row kernels; this layer runs the reference evaluator")
    from . import route   # (route.py builds on this module's KernelPlan)
    if route.serves(layer):   # grouped MoE routing: rows of several shapes, one warp per token
        return route.plan_route(layer, arch, vec_bytes=vec_bytes)
    if cluster > 1 and route.serves(layer):
        raise LoweringError(f"{layer.name}: the grouped routing kernel is not split over a cluster")
    plan = RowPlan(layer=layer, arch=arch, vec_bytes=vec_bytes, tpr=tpr, split=split, cluster=cluster)
    plan.lowered()  # fail early, with the reason
    return plan


_SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


_READ: set[str] = set()   # the switches env_switch has read in this process


def env_switch(name: str, default: bool | None) -> bool | None:
    """An on/off environment variable: unset or empty gives `default` (None: the caller tells unset from
    off); 1/0, true/false, yes/no, on/off (any case) set it; anything else is an error naming the
    variable, so a misspelt value never silently keeps the default."""
    _READ.add(name)
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _SWITCH_VALUES:
        raise ValueError(f"{name}={os.environ[name]!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    return _SWITCH_VALUES[value]


def env_int(name: str, default: int) -> int:
    """A whole-number environment variable (>= 0): unset or empty gives `default`; anything else than digits is an
    error naming the variable. Read as env_switch's are (switch_read, a benchmark's A / B)."""
    _READ.add(name)
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name}={os.environ[name]!r}: expected a whole number (0, 1, 2, ...)")
    return int(value)


@contextlib.contextmanager
def switch_set(name: str, on: bool | str | None):
    """The on/off switch `name` (an environment variable env_switch reads) set to `on` inside the block (None: left
    as it is; a string: that value, for env_int's), restored after: a call's path is chosen as it is called or
    captured into a graph."""
    saved = os.environ.get(name)
    if on is not None:
        os.environ[name] = on if isinstance(on, str) else "1" if on else "0"
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def switch_read(name: str) -> bool:
    """Whether env_switch has read the switch `name` in this process (a benchmark's A / B of a switch checks that its
    plans read it: a misspelt name would measure one kernel twice)."""
    return name in _READ
