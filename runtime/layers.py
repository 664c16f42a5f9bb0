"""PyTorch layers made from DSL layers.

    norm = LayerModule(stdlib().specialise("rms_norm", H=4096, dtype="bf16"), eps=1e-5)
    norm.load_state_dict({"weight": w})        # tensor parameters of static shape are weights
    y = norm(x)                                # CUDA: the generated kernel; CPU: the reference

Weights are the layer's tensor parameters whose shape has no dynamic dim, registered under
conventional names (`w` -> `weight`, `b` -> `bias`) so Hugging Face state dicts load. The
other tensor parameters are `forward` arguments, in declaration order; runtime scalars
(`eps`) are attributes, set at construction or passed to `forward` by name.

Before a launch every input is checked (dtype, device, shape, contiguity) with per-shape
work done once; the launch goes on torch's current stream and allocates only the outputs
(or writes into `out=`), so a call is capturable in a CUDA graph.

Layers no kernel family lowers yet (matrix products, e.g. `lora`) run the reference
evaluator on CUDA tensors too: torch operations, so cuBLAS for the products.
`module.kernel_reason` says why (None when a generated kernel runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch

from ..codegen.plan import RowPlan, plan_layer
from ..dsl.evaluator import LayerInputError, evaluate
from ..dsl.program import Layer
from ..dsl.types import shape_str

WEIGHT_NAMES = {"w": "weight", "b": "bias"}


def _dim_spec(d) -> int | str | sympy.Expr:
    d = sympy.sympify(d)
    if d.is_Integer:
        return int(d)
    if d.is_Symbol:
        return d.name
    return d


@dataclass
class _Launch:
    kernel: Any          # runtime.launch.Launcher
    plan: RowPlan
    arg_refs: list       # (role, ref) of each kernel argument, in the ABI's order


class LayerModule(torch.nn.Module):
    def __init__(self, layer: Layer, *, arch: str | None = None, cache=None, device=None, **scalars: Any):
        super().__init__()
        fn = layer.function
        if fn.kind != "layer":
            raise TypeError(f"{layer.name} is an attention block; use the attention module")
        self.layer = layer
        self.function = fn
        self.arch = arch
        self._cache = cache
        self._weights: dict[str, str] = {}   # DSL name -> attribute name
        self._inputs: list[str] = []          # DSL names of forward() tensor arguments
        self._scalars: dict[str, Any] = {}
        self._specs = {p.name: [_dim_spec(d) for d in p.shape] for p in fn.tensor_params}
        for p in fn.params:
            if p.kind == "tensor":
                if all(isinstance(s, int) for s in self._specs[p.name]):
                    attr = WEIGHT_NAMES.get(p.name, p.name)
                    init = torch.zeros if attr == "bias" else torch.ones
                    t = init(*self._specs[p.name], dtype=p.dtype.torch, device=device)
                    self.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))
                    self._weights[p.name] = attr
                else:
                    self._inputs.append(p.name)
            elif p.kind == "scalar":
                self._scalars[p.name] = scalars.pop(p.name, p.default)
        if scalars:
            raise TypeError(f"{layer.name}: unknown scalar arguments {sorted(scalars)}; "
                            f"it takes {sorted(self._scalars) or 'none'}")
        self._out_specs = [[_dim_spec(d) for d in o.shape] for o in fn.outputs]
        self._out_dtypes = [o.dtype.torch for o in fn.outputs]
        self._launches: dict[tuple, _Launch] = {}
        self._lead: list | None = None
        self._recipes: dict[tuple, tuple] = {}  # per input shapes: everything but the pointers
        self._no_kernel: str | None | bool = False   # False: not decided yet

    @property
    def kernel_reason(self) -> str | None:
        """None when CUDA tensors run a generated kernel; otherwise why they run the reference
        evaluator's torch operations instead (no kernel family lowers this layer yet)."""
        if self._no_kernel is False:
            from ..codegen.row import LoweringError
            try:
                plan_layer(self.layer, self.arch or "sm_90").lowered()
                self._no_kernel = None
            except LoweringError as e:
                self._no_kernel = str(e)
        return self._no_kernel

    # ---- public -----------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def extra_repr(self) -> str:
        return f"{self.layer.name}, inputs={self._inputs}, scalars={self._scalars}"

    def forward(self, *args: torch.Tensor, out: tuple[torch.Tensor, ...] | None = None, **kwargs: Any):
        if len(args) != len(self._inputs):
            raise LayerInputError(f"{self.layer.name}: expected {len(self._inputs)} tensor argument"
                                  f"{'s' * (len(self._inputs) != 1)} ({', '.join(self._inputs)}), got {len(args)}")
        for k in kwargs:
            if k not in self._scalars:
                raise LayerInputError(f"{self.layer.name}: unknown argument '{k}' "
                                      f"(scalars: {', '.join(self._scalars) or 'none'})")
        tensors = dict(zip(self._inputs, args))
        for name, attr in self._weights.items():
            tensors[name] = getattr(self, attr)
        scalars = {**self._scalars, **kwargs}
        first = args[0] if args else next(iter(tensors.values()))
        if not isinstance(first, torch.Tensor):
            raise LayerInputError(f"{self.layer.name}: '{self._inputs[0]}' must be a torch.Tensor")
        if first.device.type != "cuda" or self.kernel_reason is not None:
            self._bind(tensors, first.device, contiguous=False)
            outs = evaluate(self.function, {**tensors, **scalars})
            if out is not None:
                if len(out) != len(outs) or any(o.shape != r.shape or o.dtype != r.dtype for o, r in zip(out, outs)):
                    raise LayerInputError(f"{self.layer.name}: out= must be {len(outs)} tensor(s) shaped "
                                          f"{[tuple(r.shape) for r in outs]}")
                for o, r in zip(out, outs):
                    o.copy_(r)
                outs = tuple(out)
            return outs[0] if len(outs) == 1 else outs
        return self._run_cuda(tensors, scalars, out)

    # ---- CUDA path ------------------------------------------------------------------------
    def _bind(self, tensors: dict[str, torch.Tensor], device: torch.device, contiguous: bool = True
              ) -> dict[str, int]:
        dims: dict[str, int] = {}
        fn = self.function
        for p in fn.tensor_params:
            x = tensors[p.name]
            if not isinstance(x, torch.Tensor):
                raise LayerInputError(f"{fn.name}: '{p.name}' must be a torch.Tensor, got {type(x).__name__}")
            if x.dtype != p.dtype.torch:
                raise LayerInputError(f"{fn.name}: '{p.name}' must be {p.dtype} ({p.dtype.torch}), got {x.dtype}")
            if x.device != device:
                raise LayerInputError(f"{fn.name}: '{p.name}' is on {x.device}, expected {device} "
                                      f"(all inputs and weights on one device)")
            spec = self._specs[p.name]
            if x.dim() != len(spec):
                raise LayerInputError(f"{fn.name}: '{p.name}' must have shape {shape_str(p.shape)}, "
                                      f"got {tuple(x.shape)}")
            for axis, (s, n) in enumerate(zip(spec, x.shape)):
                if s.__class__ is int:
                    if n != s:
                        raise LayerInputError(f"{fn.name}: '{p.name}' must have shape {shape_str(p.shape)}; "
                                              f"dim {axis} is {n}, expected {s}")
                elif s.__class__ is str:
                    if dims.setdefault(s, n) != n:
                        raise LayerInputError(f"{fn.name}: '{p.name}' dim {axis} is {n} but {s} = {dims[s]} "
                                              f"from an earlier input")
                else:
                    from ..dsl.evaluator import _bind_dim
                    _bind_dim(fn, p.name, axis, s, int(n), dims)
            if contiguous and not x.is_contiguous():
                raise LayerInputError(f"{fn.name}: '{p.name}' must be contiguous (strides {x.stride()}); "
                                      f"call .contiguous() first")
        return dims

    def _size(self, spec, dims: dict[str, int]) -> int:
        if spec.__class__ is int:
            return spec
        if spec.__class__ is str:
            return dims[spec]
        return int(spec.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}))

    def _launch_for(self, device: torch.device, vec_bytes: int) -> _Launch:
        key = (device.index, vec_bytes)
        hit = self._launches.get(key)
        if hit is not None:
            return hit
        from .launch import compile_plan, load_kernels
        arch = self.arch or "sm_%d%d" % torch.cuda.get_device_capability(device)
        plan = plan_layer(self.layer, arch, vec_bytes=vec_bytes)
        result = compile_plan(plan, self._cache)
        kernel = load_kernels(result.cubin, plan.kernels, device)[plan.kernel_name]
        launch = _Launch(kernel, plan, [(a.role, a.ref) for a in plan.abi.args])
        self._launches[key] = launch
        if self._lead is None:
            self._lead = [_dim_spec(d) for d in plan.lowered().lead_dims]
        return launch

    def _run_cuda(self, tensors, scalars, out):
        # Per-call host work is kept to checks that depend on the tensors themselves; what
        # depends only on shapes (dims, output shapes, grid, argument layout) is a recipe
        # computed once per shape signature.
        ts = list(tensors.values())
        sig = tuple((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in ts)
        recipe = self._recipes.get(sig)
        if recipe is None:
            recipe = self._recipe(tensors, sig)
        dims, out_shapes, rows = recipe[0], recipe[1], recipe[2]
        device = sig[0][2]
        for t in ts:
            if not t.is_contiguous():
                self._bind(tensors, device)  # raises the detailed error
        if out is not None:
            outs = list(out)
            for i, (o, shape, dt) in enumerate(zip(outs, out_shapes, self._out_dtypes)):
                if o.shape != shape or o.dtype != dt or o.device != device or not o.is_contiguous():
                    raise LayerInputError(f"{self.layer.name}: out[{i}] must be a contiguous {dt} tensor of shape "
                                          f"{tuple(shape)} on {device}")
        else:
            outs = [torch.empty(shape, dtype=dt, device=device) for shape, dt in zip(out_shapes, self._out_dtypes)]
        align = 16
        for t in (*ts, *outs):
            while align > 1 and t.data_ptr() % align:
                align //= 2
        launch = self._launches.get((device.index, align)) or self._launch_for(device, align)
        if rows > 0:
            argv = []
            for role, ref in launch.arg_refs:
                if role == "input":
                    argv.append(tensors[ref])
                elif role == "output":
                    argv.append(outs[int(ref)])
                elif role == "scalar":
                    v = scalars[ref]
                    if v is None:
                        raise LayerInputError(f"{self.layer.name}: scalar '{ref}' has no value")
                    argv.append(v)
                elif ref == "rows":
                    argv.append(rows)
                else:
                    argv.append(dims[ref])
            launch.kernel((rows,), argv)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _recipe(self, tensors, sig):
        device = sig[0][2]
        dims = self._bind(tensors, device)
        out_shapes = [torch.Size([self._size(s, dims) for s in spec]) for spec in self._out_specs]
        self._launch_for(device, 16)  # loads the kernel and fixes the row space (self._lead)
        rows = 1
        for s in self._lead:
            rows *= self._size(s, dims)
        recipe = (dims, out_shapes, rows)
        if len(self._recipes) > 64:
            self._recipes.clear()
        self._recipes[sig] = recipe
        return recipe


def module(name: str, *, program=None, dims: dict | None = None, dtype: str | None = None, config=None,
           arch: str | None = None, device=None, **kwargs) -> LayerModule:
    """Specialise a (standard-library) layer and wrap it: `module("rms_norm", H=4096, dtype="bf16", eps=1e-5)`."""
    from ..dsl.program import Program
    prog = program or Program.stdlib()
    d = prog.definition(name)
    scalar_names = {p.name for p in d.params if not p.is_const and not hasattr(p.type, "dims")}
    scalars = {k: kwargs.pop(k) for k in list(kwargs) if k in scalar_names}
    layer = prog.specialise(name, dims=dims, dtype=dtype, config=config, **kwargs)
    return LayerModule(layer, arch=arch, device=device, **scalars)
