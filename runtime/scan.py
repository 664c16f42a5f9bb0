"""Mamba (v1)'s causal depthwise convolution and selective scan, as generated kernels
(codegen/scan.py) with the torch references that define them. Layouts follow transformers'
MambaMixer: channels before time, x [B, D, L].

    y = causal_conv1d(x, weight, bias, activation="silu")                  # prefill, x [B, D, L]
    y, conv = causal_conv1d(x, weight, bias, initial_state=s, return_final_state=True)   # s, conv [B, D, K-1]
    y = causal_conv1d_update(x, conv_state, weight, bias)                  # decode, x [B, D], conv_state [B, D, K]
    y, ssm = selective_scan(u, delta, A, B, C, D, z, delta_bias, return_final_state=True)  # ssm f32 [B, D, N]
    y = selective_state_update(ssm, x, dt, A, B, C, D, z, dt_bias)         # decode, ssm updated in place

What they compute (dsl/recurrences.py holds the definitions; the references here call them in
float64 and the DSL's stdlib layers in dsl/stdlib/ssm.lf are checked against these references):

  causal_conv1d   xs = initial_state ++ x along L (zeros when None);
                  y[b, d, t] = act(bias[d] + sum_k weight[d, k] * xs[b, d, t + k]), act SiLU or none;
                  final_state = the last K - 1 columns of xs.
  conv update     conv_state (width K, newest input last, as transformers' MambaCache) shifts left by
                  one and takes x as its last column; y = act(bias + sum_k weight[:, k] * conv_state[..., k]).
  selective_scan  dt = softplus(delta + delta_bias) (softplus when delta_softplus);
                  h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t   (h [B, D, N], h_{-1} = initial_state or 0);
                  y_t = sum_n h_t C_t + D u_t, times silu(z_t) when z is given.
  state update    the same step once: state <- exp(dt A) state + dt B x; y = sum_n state C + D x (* silu(z)).

Inputs are bf16, f16 or f32 (u, delta, B, C, z and x of one dtype; A, D and the biases f32 or
that dtype); the outputs take the input's dtype; the SSM state is float32; the conv state takes
x's dtype (or f32). The kernels accumulate in f32. On the CPU float64 inputs are taken too (all
of them float64, the SSM state as well): the references then run exactly as written.

CUDA tensors run the kernels (codegen/scan.py; loaded once per plan and device, launched on
torch's current stream, outputs from torch.empty, nothing synchronises); CPU tensors (and torch.compile
tracing) run the references. Shapes, dtypes, devices and contiguity are checked first: a
mismatch raises ScanInputError (a ValueError), before any launch.
"""
from __future__ import annotations

import functools

import torch

from ..codegen.scan import (conv_update_vectorizable, plan_conv, plan_conv_update, plan_selective_scan,
                            plan_state_update, scan_tiles)
from ..dsl.recurrences import causal_conv1d as _conv_definition
from ..dsl.recurrences import linear_recurrence, softplus

__all__ = ["causal_conv1d", "causal_conv1d_channels_last", "causal_conv1d_update", "selective_scan", "selective_state_update",
           "vector_aligned",
           "causal_conv1d_reference", "causal_conv1d_update_reference", "selective_scan_reference",
           "selective_state_update_reference", "ScanInputError", "ACTIVATIONS", "CONV_WIDTHS"]

ACTIVATIONS = (None, "silu")
CONV_WIDTHS = (2, 3, 4)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_F64 = torch.float64
_KERNELS: dict[tuple, object] = {}   # (kernel, plan fields..., device index) -> Launcher
_INPUT_DTYPES = (*_DTYPES, _F64)   # float64 on the CPU only: the references, for checks against other float64 code


class ScanInputError(ValueError):
    """Inputs a scan or convolution kernel cannot take (shape, dtype, device, layout), raised before any launch."""


# ---- references: what the kernels compute ----------------------------------------------------
def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return torch.nn.functional.silu(y) if activation == "silu" else y


def causal_conv1d_reference(x, weight, bias=None, *, activation="silu", initial_state=None,
                            return_final_state=False, precision=_F64):
    """causal_conv1d in `precision` (float64 by default), y in x's dtype; final_state [B, D, K-1]
    in x's dtype."""
    y, state = _conv_definition(x.to(precision), weight.to(precision), -1,
                                None if initial_state is None else initial_state.to(precision))
    if bias is not None:
        y = y + bias.to(precision)[:, None]
    y = _act(y, activation).to(x.dtype)
    return (y, state.to(x.dtype).contiguous()) if return_final_state else y


def causal_conv1d_update_reference(x, conv_state, weight, bias=None, *, activation="silu", precision=_F64):
    """causal_conv1d_update: conv_state shifted and written in place; y [B, D] in x's dtype."""
    window = torch.cat([conv_state[..., 1:].to(precision), x.to(precision)[..., None]], -1)
    y, _ = _conv_definition(window, weight.to(precision), -1, None)
    y = y[..., -1]    # the last position sees the whole window (the zero padding only meets earlier ones)
    if bias is not None:
        y = y + bias.to(precision)
    conv_state.copy_(window.to(conv_state.dtype))
    return _act(y, activation).to(x.dtype)


def _discretise(delta, A, B, u, delta_bias, delta_softplus, precision):
    """(dA [B, D, L, N], dBu [B, D, L, N]) of the selective scan, in `precision`."""
    dt = delta.to(precision)
    if delta_bias is not None:
        dt = dt + delta_bias.to(precision)[:, None]
    if delta_softplus:
        dt = softplus(dt)
    dA = torch.exp(dt[..., None] * A.to(precision)[:, None, :])
    dBu = (dt * u.to(precision))[..., None] * B.to(precision).transpose(1, 2)[:, None, :, :]
    return dA, dBu


def _gate(y, u, D, z, precision):
    if D is not None:
        y = y + u.to(precision) * D.to(precision)[:, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(precision))
    return y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=True,
                             initial_state=None, return_final_state=False, precision=_F64):
    """selective_scan in `precision` (float64 by default); y in u's dtype, final_state float32
    (float64 for float64 inputs)."""
    dA, dBu = _discretise(delta, A, B, u, delta_bias, delta_softplus, precision)
    h0 = None if initial_state is None else initial_state.to(precision)
    h, last = linear_recurrence(dA, dBu, 2, h0)                           # [B, D, L, N]
    y = (h * C.to(precision).transpose(1, 2)[:, None, :, :]).sum(-1)      # [B, D, L]
    y = _gate(y, u, D, z, precision).to(u.dtype)
    return (y, last.to(_state_dtype(u.dtype))) if return_final_state else y


def selective_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, *, dt_softplus=True,
                                     precision=_F64, a_log=False):
    """selective_state_update: `state` (float32 [B, D, N]) advanced one step in place; y [B, D]
    in x's dtype. The step is the selective scan's over a sequence of length 1. a_log: A holds
    A_log (A = -exp(A_log))."""
    if a_log:
        A = -torch.exp(A.to(precision))
    y, last = selective_scan_reference(x[..., None], dt[..., None], A, B[..., None], C[..., None], D,
                                       None if z is None else z[..., None], dt_bias, delta_softplus=dt_softplus,
                                       initial_state=state, return_final_state=True, precision=precision)
    state.copy_(last)
    return y[..., 0]


# ---- checks ----------------------------------------------------------------------------------
def _tensor(what: str, name: str, v, shape: tuple[int, ...], dtypes) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise ScanInputError(f"{what}: '{name}' must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype not in dtypes:
        raise ScanInputError(f"{what}: '{name}' must be {' or '.join(map(str, dtypes))}, got {v.dtype}")
    if tuple(v.shape) != tuple(shape):
        raise ScanInputError(f"{what}: '{name}' must have shape {list(shape)}, got {list(v.shape)}")
    if not v.is_contiguous():
        raise ScanInputError(f"{what}: '{name}' must be contiguous")
    return v


def _optional(what, name, v, shape, dtypes):
    return None if v is None else _tensor(what, name, v, shape, dtypes)


def _leading(what: str, name: str, v, dims: int) -> tuple[int, ...]:
    if not isinstance(v, torch.Tensor):
        raise ScanInputError(f"{what}: '{name}' must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype not in _INPUT_DTYPES:
        raise ScanInputError(f"{what}: '{name}' must be bfloat16, float16 or float32, got {v.dtype}")
    if v.dtype == _F64 and v.is_cuda:
        raise ScanInputError(f"{what}: the kernels take bfloat16, float16 or float32; float64 runs on the CPU only")
    if v.dim() != dims:
        raise ScanInputError(f"{what}: '{name}' must have {dims} dimensions, got shape {list(v.shape)}")
    return tuple(v.shape)


def _same_device(what: str, first: torch.Tensor, **others) -> None:
    for name, v in others.items():
        if v is not None and v.device != first.device:
            raise ScanInputError(f"{what}: '{name}' is on {v.device}, the others on {first.device}")


def _params(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a weight, bias, A or D may have next to inputs of `dtype`."""
    return (dtype,) if dtype in (torch.float32, _F64) else (dtype, torch.float32)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The SSM state's dtype next to inputs of `dtype`: float32 (float64 for float64 inputs)."""
    return _F64 if dtype == _F64 else torch.float32


def _activation(what: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ScanInputError(f"{what}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _width(what: str, weight) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ScanInputError(f"{what}: 'weight' must be a [D, K] tensor")
    k = weight.shape[1]
    if k not in CONV_WIDTHS:
        raise ScanInputError(f"{what}: the kernel width K must be one of {CONV_WIDTHS}, got {k}")
    return k


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and not torch.compiler.is_compiling()


# ---- the API ---------------------------------------------------------------------------------
def causal_conv1d(x, weight, bias=None, *, activation="silu", initial_state=None, return_final_state=False,
                  cache=None):
    """Causal depthwise conv of x [B, D, L] (bf16/f16/f32) with weight [D, K] (K in 2..4) and
    bias [D] (f32 or x's dtype), SiLU after when activation="silu". initial_state [B, D, K-1]
    (x's dtype): the inputs before x. Returns y [B, D, L], and final_state [B, D, K-1] (the last
    K - 1 inputs, initial state included) when return_final_state."""
    what = "causal_conv1d"
    b, d, length = _leading(what, "x", x, 3)
    _tensor(what, "x", x, (b, d, length), _INPUT_DTYPES)
    _check_conv(what, x, weight, bias, initial_state, activation, b, d)
    if not _use_kernel(x):
        return causal_conv1d_reference(x, weight, bias, activation=activation, initial_state=initial_state,
                                       return_final_state=return_final_state)
    return _launch_conv(x, weight, bias, activation, initial_state, return_final_state, cache)


def _check_conv(what, x, weight, bias, initial_state, activation, b: int, d: int) -> None:
    """The checks of a conv's weight [D, K], bias [D], initial state [B, D, K-1] and activation."""
    k = _width(what, weight)
    _tensor(what, "weight", weight, (d, k), _params(x.dtype))
    _optional(what, "bias", bias, (d,), _params(x.dtype))
    _optional(what, "initial_state", initial_state, (b, d, k - 1), (x.dtype,))
    _activation(what, activation)
    _same_device(what, x, weight=weight, bias=bias, initial_state=initial_state)


def causal_conv1d_channels_last(x, weight, bias=None, *, activation="silu", initial_state=None,
                                return_final_state=False, cache=None):
    """causal_conv1d over x [B, L, D] with the channels adjacent (stride 1; any batch and step
    strides, e.g. a column slice of a projection's output, read in place): y [B, L, D]
    contiguous, and final_state [B, D, K-1] when return_final_state; the rest as causal_conv1d.
    The kernel loads 16-byte vectors when x's start, step and batch strides and D allow, else one
    element at a time."""
    what = "causal_conv1d_channels_last"
    b, length, d = _leading(what, "x", x, 3)
    if d > 1 and x.stride(2) != 1:
        raise ScanInputError(f"{what}: 'x' must have its channels adjacent (stride 1 along D), got strides "
                             f"{x.stride()}")
    _check_conv(what, x, weight, bias, initial_state, activation, b, d)
    if not _use_kernel(x):
        out = causal_conv1d_reference(x.transpose(1, 2), weight, bias, activation=activation,
                                      initial_state=initial_state, return_final_state=return_final_state)
        if return_final_state:
            return out[0].transpose(1, 2).contiguous(), out[1]
        return out.transpose(1, 2).contiguous()
    return _launch_conv(x, weight, bias, activation, initial_state, return_final_state, cache, channels_last=True)


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation="silu", cache=None):
    """One decode step of causal_conv1d: x [B, D] joins conv_state [B, D, K] (x's dtype or f32;
    updated in place, newest input last) and y [B, D] = act(bias + sum_k weight[:, k] * conv_state[..., k]).
    x's rows may be apart (a column slice of a wider tensor: read in place); y is contiguous."""
    what = "causal_conv1d_update"
    b, d = _leading(what, "x", x, 2)
    if d > 1 and x.stride(1) != 1:
        raise ScanInputError(f"{what}: 'x' must have contiguous rows (strides {x.stride()}); call .contiguous() first")
    k = _width(what, weight)
    _tensor(what, "conv_state", conv_state, (b, d, k), _params(x.dtype))
    _tensor(what, "weight", weight, (d, k), _params(x.dtype))
    _optional(what, "bias", bias, (d,), _params(x.dtype))
    _activation(what, activation)
    _same_device(what, x, conv_state=conv_state, weight=weight, bias=bias)
    if not _use_kernel(x):
        return causal_conv1d_update_reference(x, conv_state, weight, bias, activation=activation)
    return _launch_conv_update(x, conv_state, weight, bias, activation, cache)


def _check_scan(what, u, delta, A, B, C, D, z, delta_bias, state, state_name, steps):
    """Checks of the selective scan's inputs: u [B, D(, L)], A [D, N], B and C [B, N(, L)]."""
    lead = _leading(what, "u" if steps else "x", u, 3 if steps else 2)
    b, d = lead[:2]
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d:
        raise ScanInputError(f"{what}: 'A' must be a [D, N] tensor with D = {d}")
    n = A.shape[1]
    seq = lead[2:]
    dt = u.dtype
    _tensor(what, "u" if steps else "x", u, lead, _INPUT_DTYPES)
    _tensor(what, "delta" if steps else "dt", delta, lead, (dt,))
    _tensor(what, "A", A, (d, n), _params(dt))
    _tensor(what, "B", B, (b, n, *seq), (dt,))
    _tensor(what, "C", C, (b, n, *seq), (dt,))
    _optional(what, "D", D, (d,), _params(dt))
    _optional(what, "z", z, lead, (dt,))
    _optional(what, "delta_bias" if steps else "dt_bias", delta_bias, (d,), _params(dt))
    _optional(what, state_name, state, (b, d, n), (_state_dtype(dt),))
    _same_device(what, u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, **{state_name: state})
    return b, d, n


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=True, initial_state=None,
                   return_final_state=False, cache=None):
    """Mamba's selective scan over u [B, D, L]: see the module's docstring. delta, z [B, D, L] and
    B, C [B, N, L] in u's dtype; A [D, N], D and delta_bias [D] f32 or u's dtype; initial_state
    float32 [B, D, N]. Returns y [B, D, L] in u's dtype, and the final state float32 [B, D, N]
    when return_final_state."""
    what = "selective_scan"
    _check_scan(what, u, delta, A, B, C, D, z, delta_bias, initial_state, "initial_state", steps=True)
    if not _use_kernel(u):
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                                        initial_state=initial_state, return_final_state=return_final_state)
    return _launch_scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state,
                            return_final_state, cache)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, *, dt_softplus=True, cache=None,
                           a_log: bool = False):
    """One decode step of the selective scan: state float32 [B, D, N] updated in place, x, dt,
    z [B, D], B, C [B, N]; returns y [B, D] in x's dtype. a_log: A holds A_log and the kernel
    takes A = -exp(A_log) (no per-step kernels for it); A, D and dt_bias may be in x's dtype."""
    what = "selective_state_update"
    if not isinstance(state, torch.Tensor):
        raise ScanInputError(f"{what}: 'state' must be a torch.Tensor, got {type(state).__name__}")
    _check_scan(what, x, dt, A, B, C, D, z, dt_bias, state, "state", steps=False)
    if not _use_kernel(x):
        return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus,
                                                a_log=a_log)
    return _launch_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), cache, a_log)


# ---- the kernels -----------------------------------------------------------------------------
def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else _DTYPES[dtype]


def _launcher(key: tuple, device: torch.device, make_plan, cache):
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import device_arch, load_plan   # (the driver loads on first use: importing stays light)
        hit = _KERNELS[key] = load_plan(make_plan(device_arch(device)), device, cache)
    return hit


def vector_aligned(t: torch.Tensor, strides) -> bool:
    """Whether 16-byte vector copies of t stay aligned: its start and the given strides (elements)
    16-byte multiples (the channels-last conv here, the SSD kernels' loads in runtime/ssd.py)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in strides)


def _launch_conv(x, weight, bias, activation, initial_state, return_final_state, cache, *, channels_last=False):
    """x [B, D, L] contiguous, or (channels_last) [B, L, D] through its batch and step strides."""
    b, length, d = x.shape if channels_last else (x.shape[0], x.shape[2], x.shape[1])
    k = weight.shape[1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    final = torch.empty(b, d, k - 1, dtype=x.dtype, device=x.device) if return_final_state else None
    if length == 0 or b == 0:   # nothing to convolve: the state passes through
        if final is not None and initial_state is not None:
            final.copy_(initial_state)
        elif final is not None:
            final.zero_()
        return (y, final) if return_final_state else y
    opts = dict(channels=d, width=k, dtype=_name(x.dtype), weight_dtype=_name(weight.dtype),
                bias=_name(None if bias is None else bias.dtype), silu=activation == "silu",
                initial=initial_state is not None, final=return_final_state)
    problem, strides = (b * d, length), ()
    if channels_last:   # 16-byte vectors of channels where the start, the strides and D allow
        strides = (x.stride(0) if b > 1 else 0), (x.stride(1) if length > 1 else 0)
        opts.update(channels_last=True, vector=d % (16 // x.element_size()) == 0 and vector_aligned(x, strides))
        problem = (b, length)
    launch = _launcher(("conv", *opts.values(), x.device.index), x.device,
                       lambda arch: plan_conv(**opts, arch=arch), cache)
    launch(problem, [x, weight, *_present(bias, initial_state), y, *_present(final), b, length, *strides])
    return (y, final) if return_final_state else y


def _launch_conv_update(x, conv_state, weight, bias, activation, cache):
    b, d = x.shape
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    if b == 0:
        return y
    k = weight.shape[1]
    opts = dict(channels=d, width=k, dtype=_name(x.dtype), state_dtype=_name(conv_state.dtype),
                weight_dtype=_name(weight.dtype), bias=_name(None if bias is None else bias.dtype),
                silu=activation == "silu")
    # rows as vectors where both tensors start on a row's bytes (fresh ones do; odd views take the
    # element-wise kernel)
    opts["vector"] = all(conv_update_vectorizable(k, _name(t.dtype)) and t.data_ptr() % (k * t.element_size()) == 0
                         for t in (conv_state, weight))
    launch = _launcher(("conv_update", *opts.values(), x.device.index), x.device,
                       lambda arch: plan_conv_update(**opts, arch=arch), cache)
    launch((b * d,), [x, x.stride(0), conv_state, weight, *_present(bias), y, b])
    return y


def _scan_options(u, A, D, z, delta_bias, softplus) -> dict:
    return dict(channels=A.shape[0], state=A.shape[1], dtype=_name(u.dtype), a_dtype=_name(A.dtype),
                d_dtype=_name(None if D is None else D.dtype),
                bias_dtype=_name(None if delta_bias is None else delta_bias.dtype), gate=z is not None,
                softplus=softplus)


def _launch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, cache):
    b, d, length = u.shape
    y = torch.empty_like(u)
    final = torch.empty(b, d, A.shape[1], dtype=torch.float32, device=u.device) if return_final_state else None
    if b:
        threads, items = scan_tiles(length)
        opts = dict(_scan_options(u, A, D, z, delta_bias, delta_softplus), initial=initial_state is not None,
                    final=return_final_state, threads=threads, items=items)
        launch = _launcher(("scan", *opts.values(), u.device.index), u.device,
                           lambda arch: plan_selective_scan(**opts, arch=arch), cache)
        launch((b * d,), [u, delta, A, B, C, *_present(D, z, delta_bias, initial_state), y, *_present(final),
                          b, length])
    return (y, final) if return_final_state else y


def _launch_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, cache, a_log=False):
    b, d = x.shape
    y = torch.empty_like(x)
    if b == 0:
        return y
    opts = dict(_scan_options(x, A, D, z, dt_bias, dt_softplus), a_log=bool(a_log))
    if _vector_state(A.shape[1]) and state.data_ptr() % 16:
        raise ScanInputError("selective_state_update: 'state' must start on a 16-byte boundary (the kernel moves "
                             "4 states at a time); a view at an odd offset needs .clone()")
    launch = _launcher(("state_update", *opts.values(), x.device.index), x.device,
                       lambda arch: plan_state_update(**opts, arch=arch), cache)
    launch((b * d,), [state, x, dt, A, B, C, *_present(D, z, dt_bias), y, b])
    return y


@functools.lru_cache(maxsize=None)
def _vector_state(n: int) -> bool:
    """Whether the decode update of N states moves them as 16-byte vectors (its plan says)."""
    return plan_state_update(channels=1, state=n, dtype="f32").vector_state


def _present(*tensors):
    return [t for t in tensors if t is not None]
