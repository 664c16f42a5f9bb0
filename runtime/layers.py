"""PyTorch layers made from DSL layers.

    norm = LayerModule(stdlib().specialise("rms_norm", H=4096, dtype="bf16"), eps=1e-5)
    norm.load_state_dict({"weight": w})        # tensor parameters of static shape are weights
    y = norm(x)                                # CUDA: the generated kernel; CPU: the reference

Weights are the layer's tensor parameters whose shape has no dynamic dim, registered under
conventional names (`w` -> `weight`, `b` -> `bias`) so Hugging Face state dicts load. The
other tensor parameters are `forward` arguments, in declaration order; runtime scalars
(`eps`) are attributes, set at construction or passed to `forward` by name. A state parameter
(`state h: ...`) is a `forward` argument the call rewrites in place.

A layer with a scan, a causal convolution or state that codegen/scan_lower.py matches (Mamba's
conv, its decode step, the selective scan, its state update: dsl/stdlib/ssm.lf, or a layer written
the same way) runs on CUDA tensors as runtime/scan.py's kernels, its state rewritten in place
after the launch (the decode conv's K - 1 wide state through a K wide copy, as the kernel keeps
it); other such layers run the reference evaluator.

Before a launch every input is checked (dtype, device, shape, contiguity) with per-shape
work done once; the launch goes on torch's current stream and allocates only the outputs
(or writes into `out=`), so a call is capturable in a CUDA graph.

A layer with one matrix product and the math around it that codegen/linear_lower.py fuses
(an RMSNorm before it; a bias, a gated activation, a residual add after it: the stdlib's
linear.lf) runs runtime/linear.py's `gemv` on CUDA tensors: the small-token product kernel
for up to 16 rows, torch's product (cuBLAS) with the same epilogue beyond. Layers no kernel
family lowers (two products, e.g. `lora`; a product with an epilogue the kernel lacks) run
the reference evaluator on CUDA tensors too: torch operations, so cuBLAS for the products.
`module.kernel_reason` says why (None when a generated kernel serves the layer).

The FP8 W8A8 layer with one activation scale a token (dsl/stdlib/quant.lf fp8_linear_per_token, or a
layer written the same way: LinearPattern xquant "token") runs runtime/quant.py's fp8_linear_per_token
on every device, its weight wq / ws viewed as pack_fp8's per-channel layout once per weight: on sm_90
the per-token quantiser and the Hopper FP8 GEMM at every row count (the small-token e4m3 kernels
quantise x by 1 x 128 blocks: not this layer's meaning), elsewhere (CPU tensors too) the same e4m3
bytes and scales in torch's f32 product, the evaluator's arithmetic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from ..codegen.linear_lower import LinearPattern, has_matmul, match_linear
from ..codegen.plan import ROW_CLUSTER_MIN_WIDTH, env_switch, layer_interface, plan_layer, row_cluster_size
from ..codegen.row import LoweringError
from ..codegen.scan import not_lowered_reason, scan_parts
from ..codegen.scan_lower import ScanPattern, match_scan
from ..dsl.evaluator import LayerInputError, _bind_dim, evaluate
from ..dsl.program import Layer
from ..dsl.types import DType
from . import ops
from .linear import LinearInputError, _packed, gemv

WEIGHT_NAMES = {"w": "weight", "b": "bias"}
# Calls of at most this many rows of a row layer with reductions over wide rows run, on sm_90, the row split over
# a cluster of CTAs (codegen/plan.row_cluster_size; one CTA a row reads a wide row at one SM's share of the
# bandwidth), from the width row_cluster_min_width() gives
ROW_CLUSTER_MAX_ROWS = 32
# The narrowest row (its widest loop's elements) split over a cluster by default. Measured on an H200
# (benchmarks/NOTES.md, bench_quant_rows at 1-32 rows): faster at 14336 (swiglu_fp8 5.5 -> 3.6 us), slower at
# 4096 and 8192 (rms_norm_fp8 2.3 -> 2.7, 2.4 -> 3.0 us: a one-CTA row that short is near the launch floor)
ROW_CLUSTER_DEFAULT_WIDTH = 12288


def row_cluster_min_width() -> int | None:
    """The narrowest row few-row calls split over a cluster: ROW_CLUSTER_DEFAULT_WIDTH when
    LAYERFORGE_ROW_CLUSTER is unset; =1 every row row_cluster_size splits (codegen/plan.ROW_CLUSTER_MIN_WIDTH
    on), =0 none (None). Read at every few-row call (no imports here: it is on the call's path)."""
    on = env_switch("LAYERFORGE_ROW_CLUSTER", None)
    if on is None:
        return ROW_CLUSTER_DEFAULT_WIDTH
    return ROW_CLUSTER_MIN_WIDTH if on else None


def _dim_spec(d) -> int | str | sympy.Expr:
    """A dim as an int, a dim name, or an expression over dim symbols (integer, positive, as
    the DSL makes them); `d` is a sympy expression or its text (a manifest's)."""
    if isinstance(d, str):
        names = {n: sympy.Symbol(n, integer=True, positive=True) for n in re.findall(r"[A-Za-z_]\w*", d)}
        d = sympy.parse_expr(d, local_dict=names)
    d = sympy.sympify(d)
    if d.is_Integer:
        return int(d)
    if d.is_Symbol:
        return d.name
    return d


def _zero_dim(d: sympy.Expr, dims: dict[str, int]) -> str | None:
    """The one unbound dim of `d` that a size of 0 binds to 0 (an empty batch), or None. Dim
    symbols are positive, so solving for them, as the evaluator does, finds no 0."""
    free = [x for x in d.free_symbols if x.name not in dims]
    bound = {sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}
    return free[0].name if len(free) == 1 and d.subs({**bound, free[0]: 0}) == 0 else None


@dataclass
class _Launch:
    kernel: Any          # runtime.launch.Launcher
    arg_refs: list       # (role, ref) of each kernel argument, in the ABI's order


def _loaded_launch(cubin: bytes, abi, device: torch.device) -> "_Launch":
    """The kernel of `abi` loaded from `cubin` on `device`, with its arguments' roles."""
    from .launch import load_kernels
    kernel = load_kernels(cubin, (abi,), device)[abi.name]
    return _Launch(kernel, [(a.role, a.ref) for a in abi.args])


class LayerModule(torch.nn.Module):
    def __init__(self, layer: Layer | None, *, arch: str | None = None, cache=None, device=None,
                 interface: dict | None = None, name: str | None = None, **scalars: Any):
        super().__init__()
        if layer is not None and layer.function.kind != "layer":
            raise TypeError(f"{layer.name} is an attention block; use the attention module")
        self.layer = layer
        self.function = layer.function if layer is not None else None
        self.name = layer.name if layer is not None else name
        self.arch = arch
        self._cache = cache
        info = interface or layer_interface(layer)
        self._weights: dict[str, str] = {}   # DSL name -> attribute name
        self._inputs: list[str] = []          # DSL names of forward() tensor arguments
        self._scalars: dict[str, Any] = {}
        self._params = [(p["name"], p["dtype"], DType[p["dtype"]].torch, [_dim_spec(d) for d in p["shape"]])
                        for p in info["params"] if p["kind"] in ("tensor", "state")]
        self._specs = {n: spec for n, _, _, spec in self._params}
        # 4-bit tensors (u4 / i4) are held packed two a byte: their last axis is half the DSL's
        self._packed = {n for n, dt, _, _ in self._params if DType[dt].is_packed}
        self._repacked: dict[tuple, Any] = {}   # 4-bit weights in the quantised product's layout (_quant_weight)
        for p in info["params"]:
            if p["kind"] in ("tensor", "state"):
                spec = self._specs[p["name"]]
                # a state is always a forward() argument: the caller's tensor, rewritten in place
                if p["kind"] == "tensor" and all(isinstance(s, int) for s in spec):
                    attr = WEIGHT_NAMES.get(p["name"], p["name"])
                    init = torch.zeros if attr == "bias" else torch.ones
                    shape = [*spec[:-1], spec[-1] // 2] if p["name"] in self._packed else spec
                    t = init(*shape, dtype=DType[p["dtype"]].torch, device=device)
                    self.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))
                    self._weights[p["name"]] = attr
                else:
                    self._inputs.append(p["name"])
            else:
                self._scalars[p["name"]] = scalars.pop(p["name"], p["default"])
        if scalars:
            raise TypeError(f"{self.name}: unknown scalar arguments {sorted(scalars)}; "
                            f"it takes {sorted(self._scalars) or 'none'}")
        self._out_specs = [[_dim_spec(d) for d in o["shape"]] for o in info["outputs"]]
        self._out_dtypes = [DType[o["dtype"]].torch for o in info["outputs"]]
        self._launches: dict[tuple, _Launch | None] = {}   # (device, vec bytes[, "cluster"]) -> launch
        self._images: dict[int, tuple] = {}   # vec_bytes -> (cubin, KernelABI, row dims): a pack's kernels
        self._lead: list | None = None
        self._recipes: dict[tuple, tuple] = {}  # per input shapes: everything but the pointers
        self._no_kernel: str | None | bool = False if layer is not None else None   # False: not decided yet
        self._linear: LinearPattern | None = None   # a product layer's pattern (set with kernel_reason)
        self._linear_checked: set[tuple] = set()    # input signatures a product layer has checked
        self._product_kernels: dict = {}            # a pack's product layer: device index -> {rows: Launcher}
        self._scan: ScanPattern | None = None       # a scan-family layer's pattern (set with kernel_reason)
        self._token: bool | None = None             # the W8A8 per-token product (its route on every device)

    @classmethod
    def from_images(cls, name: str, interface: dict, images: dict, *, arch: str, device=None,
                    linear: dict | None = None, **scalars: Any) -> LayerModule:
        """A module over compiled kernels (a pack's): `images` maps the vector width a kernel
        assumes (16: aligned tensors) to (cubin, KernelABI, row dims). No NVRTC and no DSL; CPU
        tensors and tensors the pack has no kernel for are errors. A product layer (`linear`: its
        LinearPattern as the manifest records it): `images` maps the rows a small-token kernel
        takes (8, 16) to (cubin, KernelABI); more rows run torch's product."""
        self = cls(None, arch=arch, device=device, interface=interface, name=name, **scalars)
        self._images = dict(images)
        if linear is not None:
            self._linear = LinearPattern(**linear)
        return self

    @property
    def kernel_reason(self) -> str | None:
        """None when CUDA tensors run a generated kernel; otherwise why they run the reference
        evaluator's torch operations instead (no kernel family lowers this layer yet). The W8A8
        per-token layer: None, its route (quant.fp8_linear_per_token) taking the FP8 GEMM where the
        GPU has it (sm_90) and torch's product of the same e4m3 operands elsewhere."""
        if self._no_kernel is False:
            try:
                if scan_parts(self.function):   # scans, convolutions, state: the scan family or nothing
                    reason = not_lowered_reason(self.layer)
                    if reason:
                        raise LoweringError(reason)
                    pattern = match_scan(self.layer)
                    pattern.plan(self.arch or "sm_90")
                    self._scan = pattern
                elif has_matmul(self.function):   # the small-token product family
                    pattern = match_linear(self.layer)
                    if pattern.xquant is None:   # W8A8 per token: no small-token plan, quant.fp8_linear_per_token
                        pattern.plan(self.arch or "sm_90")
                    self._linear = pattern
                else:
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
        return f"{self.name}, inputs={self._inputs}, scalars={self._scalars}"

    def forward(self, *args: torch.Tensor, out: tuple[torch.Tensor, ...] | None = None, **kwargs: Any):
        if len(args) != len(self._inputs):
            raise LayerInputError(f"{self.name}: expected {len(self._inputs)} tensor argument"
                                  f"{'s' * (len(self._inputs) != 1)} ({', '.join(self._inputs)}), got {len(args)}")
        for k in kwargs:
            if k not in self._scalars:
                raise LayerInputError(f"{self.name}: unknown argument '{k}' "
                                      f"(scalars: {', '.join(self._scalars) or 'none'})")
        if torch.compiler.is_compiling():   # traced: one custom op (runtime/ops.py); eager: the direct launch
            return ops.row_layer(self, args, kwargs, out)
        tensors = dict(zip(self._inputs, args))
        for name, attr in self._weights.items():
            tensors[name] = getattr(self, attr)
        return self._forward_bound(tensors, {**self._scalars, **kwargs}, out)

    def _forward_bound(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], out):
        """The direct path, over every tensor (inputs and weights) and scalar by DSL name; the
        custom op's implementation calls it with the weights the graph passes."""
        first = next(iter(tensors.values()))
        if not isinstance(first, torch.Tensor):
            raise LayerInputError(f"{self.name}: '{self._inputs[0]}' must be a torch.Tensor")
        if first.device.type != "cuda" and self._token_product():   # the same route as on CUDA tensors
            return self._run_linear(tensors, scalars, out)
        if first.device.type != "cuda" or self.kernel_reason is not None:
            if self.layer is None:
                raise LayerInputError(f"{self.name}: a module loaded from a pack runs CUDA tensors only (the "
                                      f"reference evaluator on {first.device.type} tensors needs the DSL definition)")
            dims = self._bind(tensors, first.device, contiguous=False)
            outs = self._empty_outputs(dims, first.device)
            if outs is None:
                outs = evaluate(self.function, {**tensors, **scalars})
            if out is not None:
                if len(out) != len(outs) or any(o.shape != r.shape or o.dtype != r.dtype for o, r in zip(out, outs)):
                    raise LayerInputError(f"{self.name}: out= must be {len(outs)} tensor(s) shaped "
                                          f"{[tuple(r.shape) for r in outs]}")
                for o, r in zip(out, outs):
                    o.copy_(r)
                outs = tuple(out)
            return outs[0] if len(outs) == 1 else outs
        if self._linear is not None:
            return self._run_linear(tensors, scalars, out)
        if self._scan is not None:
            return self._run_scan(tensors, out)
        return self._run_cuda(tensors, scalars, out)

    def _token_product(self) -> bool:
        """Whether the layer is a W8A8 product whose activations the layer quantises (LinearPattern xquant
        "token": runtime/quant.fp8_linear_per_token; "k128": gemv_quant over 128 x 128 weight blocks), which
        runs its runtime route on CPU tensors as on CUDA ones."""
        if self._token is None:
            self._token = (self.layer is not None and has_matmul(self.function) and self.kernel_reason is None
                           and self._linear is not None and self._linear.xquant is not None)
        return self._token

    def _run_scan(self, tensors, out):
        """A scan-family layer: runtime/scan.py's launch for the pattern, after the layer's own
        input checks (by DSL name); the state parameter is rewritten in place."""
        from . import scan
        p = self._scan
        sig = tuple((t.shape, t.dtype, t.device) for t in tensors.values())
        if sig not in self._linear_checked:
            self._bind(tensors, sig[0][2])   # dtype, device, shape and contiguity errors by DSL name
            if len(self._linear_checked) > 64:
                self._linear_checked.clear()
            self._linear_checked.add(sig)
        t = {role: tensors[name] for role, name in p.operands}
        if out is not None and (len(out) != 1 or out[0].shape != t["x" if "x" in t else "u"].shape
                                or out[0].dtype != self._out_dtypes[0] or out[0].device != sig[0][2]):
            raise LayerInputError(f"{self.name}: out= must be one {self._out_dtypes[0]} tensor shaped like the output")
        act = "silu" if p.silu else None
        state = t.get("state")
        try:
            if p.kind == "conv":
                y = scan.causal_conv1d(t["x"], t["weight"], t.get("bias"), activation=act,
                                       initial_state=state if p.initial else None, return_final_state=p.final,
                                       cache=self._cache)
                if p.final:
                    y, final = y
                    state.copy_(final)
            elif p.kind == "conv_step":   # the kernel's state is K wide, its oldest column shifted out unread
                wide = torch.cat([state[..., :1], state], -1)
                y = scan.causal_conv1d_update(t["x"], wide, t["weight"], t.get("bias"), activation=act,
                                              cache=self._cache)
                state.copy_(wide[..., 1:])
            elif p.kind == "selective_scan":
                y, final = scan.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"),
                                               t.get("delta_bias"), delta_softplus=p.softplus,
                                               initial_state=state if p.initial else None,
                                               return_final_state=True, cache=self._cache)
                state.copy_(final)
            else:
                y = scan.selective_state_update(state, t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"),
                                                t.get("z"), t.get("delta_bias"), dt_softplus=p.softplus,
                                                cache=self._cache)
        except scan.ScanInputError as e:
            raise LayerInputError(f"{self.name}: {e}") from None
        if out is not None:
            out[0].copy_(y)
            return out[0]
        return y

    def _run_linear(self, tensors, scalars, out):
        """A product layer: runtime/linear.py's gemv with the pattern's prologue and epilogue (the
        kernel for up to 16 rows, torch's product beyond), after the layer's own input checks."""
        p = self._linear
        sig = tuple((t.shape, t.dtype, t.device) for t in tensors.values())
        if sig not in self._linear_checked:
            self._bind(tensors, sig[0][2], contiguous=False)   # dtype, device and shape errors by DSL name
            if len(self._linear_checked) > 64:
                self._linear_checked.clear()
            self._linear_checked.add(sig)
        if out is not None and len(out) != 1:
            raise LayerInputError(f"{self.name}: out= must be one tensor")
        norm = None
        if p.norm_weight is not None:
            eps = scalars[p.eps] if isinstance(p.eps, str) else p.eps
            if eps is None:
                raise LayerInputError(f"{self.name}: scalar '{p.eps}' has no value")
            norm = (tensors[p.norm_weight], float(eps))
        bias = None if p.bias is None else tensors[p.bias]
        residual = None if p.residual is None else tensors[p.residual]
        kernels = None
        if self.layer is None:   # a pack's module (CUDA tensors only): its kernels, loaded once per device
            device = tensors[p.x].device
            kernels = self._product_kernels.get(device.index)
            if kernels is None:
                from .launch import load_kernels
                kernels = self._product_kernels[device.index] = {
                    rows: load_kernels(cubin, (abi,), device)[abi.name] for rows, (cubin, abi) in self._images.items()}
        try:
            if p.xquant == "token":   # W8A8, x quantised per token in the layer (runtime/quant.py's route)
                from .quant import fp8_linear_per_token
                x = tensors[p.x]
                return fp8_linear_per_token(x, self._quant_weight(p, tensors, x.dtype),
                                            out=None if out is None else out[0], cache=self._cache)
            if p.wtype is not None:   # an i8 weight with its row scales: the quantised product
                return self._run_quant_linear(p, tensors, bias, residual, norm, None if out is None else out[0],
                                              kernels)
            return gemv(tensors[p.x], tensors[p.weight], bias, gated=p.gated, residual=residual, norm=norm,
                        norm_offset=p.norm_offset, out=None if out is None else out[0], cache=self._cache,
                        kernels=kernels)
        except LinearInputError as e:
            raise LayerInputError(f"{self.name}: {e}") from None

    def _run_quant_linear(self, p, tensors, bias, residual, norm, out, kernels):
        """runtime/quant.py's product of x and the layer's i8 weight (its kernel layout as the layer
        states it: q [n, K], one scale a row in x's dtype); a pack's module: its kernels for up to
        16 rows, torch's product of the dequantised W (W = T(q s), as the layer means it) past them."""
        from .linear import _reference, check_call, launch_gemv
        from .quant import dequantize, gemv_quant
        x = tensors[p.x]
        qw = self._quant_weight(p, tensors, x.dtype)
        if kernels is None:
            return gemv_quant(x, qw, bias, gated=p.gated, residual=residual, norm=norm, norm_offset=p.norm_offset,
                              out=out, cache=self._cache)
        rows = check_call(x, p.n, p.k, bias, p.gated, residual, norm, p.norm_offset, out)
        if 1 <= rows <= max(kernels):
            return launch_gemv(x, qw.kernel_tensors, p.n, p.k, bias, p.gated, residual, norm, p.norm_offset, out,
                               kernels=kernels, wtype=p.kernel_wtype, group=p.group)
        w = dequantize(qw).to(x.dtype)
        y = _reference(x, w, bias, p.gated, residual, norm, p.norm_offset)
        return y if out is None else out.copy_(y)

    def _quant_weight(self, p, tensors, dtype):
        """The layer's quantised weight in runtime/quant.py's kernel layout: i8 with row scales as the
        layer holds them; i8 with group scales (pack_i8's pairs) and u4 / i4 (packed two a byte,
        scales and u4 zero points by group) repacked into the kernels' layouts
        (u4: words and (scale, zero) pairs), once per weight (kept while its tensors are unchanged: same
        storage, same in-place version); i4 runs as u4 with q + 8 and zero point 8; f8e4m3 (W8A8 per token)
        as pack_fp8's per-channel layout, its f32 row scales as they are (K not a multiple of 16, which
        pack_fp8 refuses for the kernels' 16-byte rows: the same layout, for the torch route)."""
        from .quant import QuantWeight, pack_fp8, pack_i8, pack_u4
        q, s = tensors[p.weight], tensors[p.wscale]
        if p.wtype == "i8" and not p.group:   # (views at an odd offset copied: the kernels read 16 bytes)
            return QuantWeight(p.wtype, 0, _packed(q, 16), None, _packed(s, 16), p.n, p.k, dtype)
        z = None if p.wzero is None else tensors[p.wzero]
        key = tuple((t.data_ptr(), t._version, t.device) for t in (q, s) + (() if z is None else (z,)))
        hit = self._repacked.get(key)
        if hit is not None:
            return hit
        if len(self._repacked) >= 8:
            self._repacked.clear()
        if p.wtype == "f8e4m3" and p.group:   # W8A8 with 128 x 128 weight blocks (xquant "k128")
            hit = pack_fp8(q, s, p.group, dtype)
        elif p.wtype == "f8e4m3":
            hit = (pack_fp8(q, s, None, dtype) if p.k % 16 == 0 else
                   QuantWeight("f8e4m3", 0, q.contiguous(), None, s.float().contiguous(), p.n, p.k, dtype))
        elif p.wtype == "i8":   # scales by group: the kernel's (scale, zero) pairs
            hit = pack_i8(q, s, p.group, dtype)
        else:
            from ..dsl.types import unpack_4bit
            v = unpack_4bit(q, DType[p.wtype]).to(torch.int64)
            if p.wtype == "i4":
                v, zeros = v + 8, torch.full((p.n, p.k // p.group), 8, dtype=torch.int64, device=q.device)
            else:
                zeros = unpack_4bit(z, DType.u4).to(torch.int64)
            hit = pack_u4(v, zeros, s, p.group, dtype)
        self._repacked[key] = hit
        return hit

    def _empty_outputs(self, dims: dict[str, int], device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """An empty batch (a dynamic dim of 0, e.g. no tokens) has empty outputs and nothing to
        compute (the evaluator binds dims >= 1); None when some output is not empty."""
        if 0 not in dims.values():
            return None
        shapes = [[self._size(s, dims) for s in spec] for spec in self._out_specs]
        if not all(0 in shape for shape in shapes):
            return None
        return tuple(torch.empty(shape, dtype=dt, device=device) for shape, dt in zip(shapes, self._out_dtypes))

    # ---- CUDA path ------------------------------------------------------------------------
    def _bind(self, tensors: dict[str, torch.Tensor], device: torch.device, contiguous: bool = True
              ) -> dict[str, int]:
        dims: dict[str, int] = {}
        name = self.name
        for pname, dtype_name, dtype, spec in self._params:
            x = tensors[pname]
            shape = "[" + ", ".join(map(str, spec)) + "]"
            if not isinstance(x, torch.Tensor):
                raise LayerInputError(f"{name}: '{pname}' must be a torch.Tensor, got {type(x).__name__}")
            if x.dtype != dtype:
                raise LayerInputError(f"{name}: '{pname}' must be {dtype_name} ({dtype}), got {x.dtype}")
            if x.device != device:
                raise LayerInputError(f"{name}: '{pname}' is on {x.device}, expected {device} "
                                      f"(all inputs and weights on one device)")
            if x.dim() != len(spec):
                raise LayerInputError(f"{name}: '{pname}' must have shape {shape}, got {tuple(x.shape)}")
            packed = pname in self._packed
            for axis, (s, n) in enumerate(zip(spec, x.shape)):
                if packed and axis == len(spec) - 1:   # two values a byte
                    n = 2 * n
                if s.__class__ is int:
                    if n != s:
                        raise LayerInputError(f"{name}: '{pname}' must have shape {shape}; dim {axis} is {n}, "
                                              f"expected {s}")
                elif s.__class__ is str:
                    if dims.setdefault(s, n) != n:
                        raise LayerInputError(f"{name}: '{pname}' dim {axis} is {n} but {s} = {dims[s]} "
                                              f"from an earlier input")
                elif n == 0 and _zero_dim(s, dims):
                    dims[_zero_dim(s, dims)] = 0   # an empty batch, e.g. [2*N] with no tokens
                else:
                    _bind_dim(self, pname, axis, s, int(n), dims)
            if contiguous and not x.is_contiguous():
                raise LayerInputError(f"{name}: '{pname}' must be contiguous (strides {x.stride()}); "
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
        from .launch import compile_plan, device_arch
        if self.layer is None:   # a pack's module: the kernels it was built with
            image = self._images.get(vec_bytes) or self._images.get(16)
            if image is None or (vec_bytes < 16 and vec_bytes not in self._images):
                raise LayerInputError(f"{self.name}: the pack has no kernel for tensors aligned to {vec_bytes} bytes "
                                      f"(it has {sorted(self._images)}); pass 16-byte aligned tensors")
            cubin, abi, lead = image
        else:
            arch = self.arch or device_arch(device)
            plan = plan_layer(self.layer, arch, vec_bytes=vec_bytes)
            cubin, abi, lead = compile_plan(plan, self._cache).cubin, plan.abi, plan.lowered().lead_dims
        launch = _loaded_launch(cubin, abi, device)
        self._launches[key] = launch
        if self._lead is None:
            self._lead = [_dim_spec(d) for d in lead]
        return launch

    def _cluster_launch(self, device: torch.device, vec_bytes: int, min_width: int) -> _Launch | None:
        """The layer's row kernel split over a cluster (sm_90, rows with reductions, wide: row_cluster_size; the
        widest loop at least min_width), or None; the same arguments as _launch_for's kernel, a grid of rows x
        the cluster."""
        key = (device.index, vec_bytes, "cluster", min_width)
        if key in self._launches:
            return self._launches[key]
        from .launch import compile_plan, device_arch
        try:
            plan = plan_layer(self.layer, self.arch or device_arch(device), vec_bytes=vec_bytes)
        except LoweringError:
            plan = None
        size = row_cluster_size(plan, min_width) if plan is not None else 1
        launch = None
        if size > 1:
            plan = plan_layer(self.layer, plan.arch, vec_bytes=vec_bytes, cluster=size)
            launch = _loaded_launch(compile_plan(plan, self._cache).cubin, plan.abi, device)
        self._launches[key] = launch
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
                    raise LayerInputError(f"{self.name}: out[{i}] must be a contiguous {dt} tensor of shape "
                                          f"{tuple(shape)} on {device}")
        else:
            outs = [torch.empty(shape, dtype=dt, device=device) for shape, dt in zip(out_shapes, self._out_dtypes)]
        align = 16
        for t in (*ts, *outs):
            while align > 1 and t.data_ptr() % align:
                align //= 2
        launch = self._launches.get((device.index, align)) or self._launch_for(device, align)
        if 0 < rows <= ROW_CLUSTER_MAX_ROWS and self.layer is not None and device.type == "cuda":
            width = row_cluster_min_width()
            if width is not None:
                launch = self._cluster_launch(device, align, width) or launch
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
                        raise LayerInputError(f"{self.name}: scalar '{ref}' has no value")
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


def module(name: str, *, program=None, dims: dict | None = None, dtype: str | torch.dtype | None = None,
           config=None, arch: str | None = None, device=None, **kwargs) -> LayerModule:
    """Specialise a (standard-library) layer and wrap it: `module("rms_norm", H=4096, dtype="bf16", eps=1e-5)`;
    `dtype` is a name ('bf16', 'bfloat16', ...) or a torch dtype (torch.bfloat16). With a `config`
    of a model_type models/families.py knows, `eps` defaults to the config's norm eps."""
    from ..dsl.program import Program
    prog = program or Program.stdlib()
    d = prog.definition(name)
    scalar_names = {p.name for p in d.params if not p.is_const and not hasattr(p.type, "dims")}
    scalars = {k: kwargs.pop(k) for k in list(kwargs) if k in scalar_names}
    if config is not None and "eps" in scalar_names and "eps" not in scalars:
        from ..dsl.program import dims_from_config
        eps = dims_from_config(config).get("eps")   # a known model_type's norm eps
        if eps is not None:
            scalars["eps"] = eps
    layer = prog.specialise(name, dims=dims, dtype=_dtype_name(dtype), config=config, **kwargs)
    return LayerModule(layer, arch=arch, device=device, **scalars)


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """A torch dtype's DSL name (torch.bfloat16 -> 'bf16'); names and None pass through."""
    if not isinstance(dtype, torch.dtype):
        return dtype
    for t in (DType.f32, DType.f16, DType.bf16, DType.i32, DType.i64, DType.bool):
        if t.torch == dtype:
            return t.value
    raise ValueError(f"dtype {dtype} has no DSL dtype (f32, f16, bf16, i32, i64, bool)")
