"""Mamba2's state-space duality (SSD) layer pieces: the chunked scan for prefill, the one-token state
update for decode and the gated RMSNorm, with the float references that define them.

    y, h = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=lim, chunk_size=256,
                    initial_state=h0, return_final_state=True)       # prefill: y [B, L, H, P], h [B, H, P, N]
    y1 = ssd_state_update(h, x1, dt1, A, B1, C1, D=D, dt_bias=dt_bias)   # decode: h updated in place
    out = gated_rms_norm(y, gate, norm_weight, eps, group_size=H * P // G)

Shapes: batch Bt, length L, heads H of head dim P, G groups of B/C (heads h * G // H .. share
group g = h // (H / G)), state size N. Per head and token, with the step
    dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit)      (softplus and dt_bias optional),
the recurrence is
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (h [P, N], A < 0 a per-head scalar)
    y_t = h_t C_t + D x_t,  then  y_t *= silu(z_t)    (D and z optional),
which is what transformers' Mamba2Mixer computes (torch_forward's chunked segment-sum form for
prefill, the selective state update for decode); transformers gates with z in the norm instead
(MambaRMSNormGated: rms_norm(y * silu(z))), which is the same product normalised: runtime/mamba's
mixer passes z=None to the prefill scan and the gate to `gated_rms_norm`, and z to the decode
step's update (read inside in_proj's output, no copy), whose norm then runs ungated.

The chunked form (`ssd_scan_reference`, the kernels' plan): split L into chunks of Q tokens
(the last may be short; its missing tokens act as dt = 0, which neither decays nor adds). With
s_l the cumulative sum of dt A within a chunk,
    intra-chunk  y_l  = sum_{j <= l} (C_l . B_j) exp(s_l - s_j) dt_j x_j       (a masked matrix form)
    chunk state  S    = sum_j exp(s_last - s_j) dt_j x_j B_j^T
    passing      h_c+1 = exp(s_last) h_c + S_c,  h_0 = initial_state           (sequential over chunks)
    inter-chunk  y_l += exp(s_l) C_l h_c^T
CUDA tensors run generated kernels (codegen/ssd.py; loaded once per plan and device, launched
on torch's current stream, outputs from torch.empty, nothing synchronises); CPU tensors run the
references here, in float32 (float64 for float64 inputs). Shapes, dtypes, devices and layouts
are checked before any launch: a mismatch raises SSDInputError (a ValueError).
"""
from __future__ import annotations

import math

import torch

from ..codegen.ssd import (cb_table_default, plan_ssd_chunk_cb, plan_ssd_chunk_scan, plan_ssd_chunk_state,
                           plan_ssd_state_passing, plan_ssd_state_update)
from .scan import vector_aligned

__all__ = ["ssd_scan", "ssd_state_update", "gated_rms_norm", "ssd_scan_reference", "ssd_state_update_reference",
           "gated_rms_norm_reference", "SSDInputError"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_KERNEL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_KERNELS: dict[tuple, object] = {}   # (kernel, plan fields..., device index) -> Launcher
_NORMS: dict[tuple, object] = {}     # (layer, F, groups, dtype, device) -> LayerModule
MAX_GRID_Y = 65535                   # the batch is a grid's y (decode) or z (prefill) dimension


class SSDInputError(ValueError):
    """Inputs an SSD kernel cannot take (shape, dtype, device, layout), raised before any launch."""


# ---- references: what the kernels compute ----------------------------------------------------
def _step(dt: torch.Tensor, dt_bias, dt_softplus: bool, dt_limit, cdt: torch.dtype) -> torch.Tensor:
    """dt processed as the model does: + dt_bias, softplus, clamp into dt_limit (always, as
    transformers' chunked scan does; NaN stays NaN); in cdt."""
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _heads(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """B or C [..., G, N] -> [..., H, N] at axis `dim`: head h reads group h // (H / G)."""
    return t.repeat_interleave(heads // t.shape[dim], dim=dim)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssd_scan_reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True,
                       dt_limit=(0.0, math.inf), chunk_size=256, initial_state=None, return_final_state=False,
                       compute_dtype: torch.dtype | None = None):
    """The chunked SSD form above in compute_dtype (float32, float64 for float64 x unless given):
    y [Bt, L, H, P] in x's dtype, and with return_final_state the state after the last token
    [Bt, H, P, N] in compute_dtype."""
    cdt = compute_dtype or _compute_dtype(x)
    bt, length, heads, hp = x.shape
    n = B.shape[-1]
    q = chunk_size
    nc = max(1, -(-length // q))
    pad = nc * q - length
    step = _step(dt, dt_bias, dt_softplus, dt_limit, cdt)                      # [Bt, L, H]

    def chunks(t):   # [Bt, L, ...] -> [Bt, nc, Q, ...], padded with zeros (dt = 0: no decay, no input)
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(bt, nc, q, *t.shape[2:])

    xs = chunks(x.to(cdt))                                                    # [Bt, nc, Q, H, P]
    dts = chunks(step)                                                        # [Bt, nc, Q, H]
    bs = chunks(_heads(B.to(cdt), heads, 2))                                  # [Bt, nc, Q, H, N]
    cs = chunks(_heads(C.to(cdt), heads, 2))
    s = torch.cumsum(dts * A.to(cdt), dim=2)                                  # [Bt, nc, Q, H]
    xdt = xs * dts[..., None]

    # intra-chunk: (C_l . B_j) exp(s_l - s_j) for j <= l (the exponent is <= 0 there; masked before exp)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    diff = s[:, :, :, None, :] - s[:, :, None, :, :]                          # [Bt, nc, l, j, H]
    decay = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], -math.inf))
    scores = torch.einsum("bclhn,bcjhn->bcljh", cs, bs) * decay
    y = torch.einsum("bcljh,bcjhp->bclhp", scores, xdt)

    # chunk states and the sequential passing between chunks
    last = s[:, :, -1:, :]                                                    # [Bt, nc, 1, H]
    states = torch.einsum("bcjhn,bcjhp->bchpn", bs * torch.exp(last - s)[..., None], xdt)
    h = (initial_state.to(cdt) if initial_state is not None
         else torch.zeros(bt, heads, hp, n, dtype=cdt, device=x.device))
    starts = []
    for c in range(nc):
        starts.append(h)
        h = torch.exp(last[:, c, 0, :])[:, :, None, None] * h + states[:, c]
    starts = torch.stack(starts, dim=1)                                       # [Bt, nc, H, P, N]
    y = y + torch.einsum("bclhn,bchpn->bclhp", cs, starts) * torch.exp(s)[..., None]

    y = y.reshape(bt, nc * q, heads, hp)[:, :length]
    if D is not None:
        y = y + D.to(cdt)[:, None] * x.to(cdt)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(cdt))
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def ssd_state_update_reference(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True,
                               dt_limit=(0.0, math.inf), a_log: bool = False):
    """One token per sequence: state [Bt, H, P, N] <- exp(dt A) state + dt x B^T in place (in the
    state's dtype, computed in float32, float64 for a float64 state); y [Bt, H, P] in x's dtype.
    a_log: A holds A_log (A = -exp(A_log))."""
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32
    heads = x.shape[1]
    if a_log:
        A = -torch.exp(A.to(cdt))
    step = _step(dt, dt_bias, dt_softplus, dt_limit, cdt)                      # [Bt, H]
    bh = _heads(B.to(cdt), heads, 1)                                          # [Bt, H, N]
    ch = _heads(C.to(cdt), heads, 1)
    xf = x.to(cdt)
    h = torch.exp(step * A.to(cdt))[:, :, None, None] * state.to(cdt) + (step[:, :, None] * xf)[..., None] * bh[:, :, None, :]
    state.copy_(h)
    y = torch.einsum("bhpn,bhn->bhp", h, ch)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(cdt))
    return y.to(x.dtype)


def gated_rms_norm_reference(x, z, weight, eps, *, group_size=None):
    """transformers' MambaRMSNormGated: x * silu(z) in float32 (float64 for float64 x), each group of
    group_size features (the whole row by default) scaled to unit RMS, cast to x's dtype, then times
    weight; returned in x's dtype."""
    cdt = _compute_dtype(x)
    f = x.shape[-1]
    gs = group_size or f
    h = x.to(cdt)
    if z is not None:
        h = h * torch.nn.functional.silu(z.to(cdt))
    hg = h.reshape(*h.shape[:-1], f // gs, gs)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(x.dtype) * hg.reshape(h.shape).to(x.dtype)).to(x.dtype)


# ---- checks ----------------------------------------------------------------------------------
def _shape(name: str, t, want: tuple[int, ...], dtypes=_FLOATS) -> None:
    if not isinstance(t, torch.Tensor):
        raise SSDInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(want):
        raise SSDInputError(f"{name} must be shaped {list(want)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise SSDInputError(f"{name} must be one of {[str(d).removeprefix('torch.') for d in dtypes]}, got {t.dtype}")


def _same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise SSDInputError(f"{name} is on {t.device}, x on {device}: all inputs must be on one device")


def _check_common(heads: int, groups: int, dt_limit, A, D, dt_bias, dtype: torch.dtype) -> None:
    if groups < 1 or heads % groups:
        raise SSDInputError(f"the {heads} heads must split evenly over the {groups} groups of B and C")
    lo, hi = dt_limit
    if not (0.0 <= lo <= hi):
        raise SSDInputError(f"dt_limit must be (lo, hi) with 0 <= lo <= hi, got {dt_limit}")
    _shape("A", A, (heads,), tuple(dict.fromkeys((torch.float32, torch.float64, dtype))))   # f32 / f64 or x's
    if D is not None:
        _shape("D", D, (heads,))
    if dt_bias is not None:
        _shape("dt_bias", dt_bias, (heads,))


def _check_scan(x, dt, A, B, C, D, z, dt_bias, dt_limit, chunk_size, initial_state) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise SSDInputError(f"x must be a [batch, length, heads, head_dim] tensor, got "
                            f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    bt, length, heads, hp = x.shape
    _shape("x", x, x.shape)
    if not isinstance(B, torch.Tensor) or B.dim() != 4:
        raise SSDInputError("B must be a [batch, length, groups, state] tensor")
    groups, n = B.shape[2], B.shape[3]
    _shape("dt", dt, (bt, length, heads), (x.dtype,))
    _shape("B", B, (bt, length, groups, n), (x.dtype,))
    _shape("C", C, (bt, length, groups, n), (x.dtype,))
    if z is not None:
        _shape("z", z, (bt, length, heads, hp), (x.dtype,))
    _check_common(heads, groups, dt_limit, A, D, dt_bias, x.dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SSDInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if initial_state is not None:
        _shape("initial_state", initial_state, (bt, heads, hp, n), (torch.float32, torch.float64))
    _same_device(x.device, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)


def _check_update(state, x, dt, A, B, C, D, z, dt_bias, dt_limit) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise SSDInputError(f"x must be a [batch, heads, head_dim] tensor (one token), got "
                            f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    bt, heads, hp = x.shape
    _shape("x", x, x.shape)
    if not isinstance(B, torch.Tensor) or B.dim() != 3:
        raise SSDInputError("B must be a [batch, groups, state] tensor")
    groups, n = B.shape[1], B.shape[2]
    _shape("state", state, (bt, heads, hp, n), (torch.float32, torch.float64))
    _shape("dt", dt, (bt, heads), (x.dtype,))
    _shape("B", B, (bt, groups, n), (x.dtype,))
    _shape("C", C, (bt, groups, n), (x.dtype,))
    if z is not None:
        _shape("z", z, (bt, heads, hp), (x.dtype,))
    _check_common(heads, groups, dt_limit, A, D, dt_bias, x.dtype)
    _same_device(x.device, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def _check_out(out, shape, x, align: int = 1) -> None:
    """out: None, or a contiguous tensor of x's dtype and device, of `shape`, starting at an `align`-byte
    address (the chunk scan stores y's rows as 16-byte vectors)."""
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape)
                            or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous()):
        got = f"{out.dtype} {list(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise SSDInputError(f"out must be a contiguous {x.dtype} {list(shape)} on {x.device}, got {got}")
    if out is not None and out.data_ptr() % align:
        raise SSDInputError(f"out must start at a {align}-byte aligned address (got {out.data_ptr():#x}); pass a "
                            "tensor of its own, not a view from an odd offset")


def _check_norm(x, z, weight, eps, group_size) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise SSDInputError("x must be a tensor [..., features]")
    f = x.shape[-1]
    _shape("x", x, x.shape)
    if z is not None:
        _shape("z", z, x.shape)
    _shape("weight", weight, (f,))
    gs = f if group_size is None else group_size
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or f % gs:
        raise SSDInputError(f"group_size must divide the {f} features, got {group_size!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise SSDInputError(f"eps must be a non-negative number, got {eps!r}")
    _same_device(x.device, z=z, weight=weight)
    return gs


# ---- public ----------------------------------------------------------------------------------
def ssd_scan(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus: bool = True,
             dt_limit: tuple[float, float] = (0.0, math.inf), chunk_size: int = 256, initial_state=None,
             return_final_state: bool = False, out=None):
    """Mamba2's chunked scan over a prefill (module docstring): x [Bt, L, H, P], dt [Bt, L, H] in
    x's dtype, A [H] float32 (negative), B and C [Bt, L, G, N] in x's dtype, optional D [H],
    z [Bt, L, H, P], dt_bias [H], initial_state [Bt, H, P, N] float32 -> y [Bt, L, H, P] in x's
    dtype (written into `out` when given: contiguous, that shape and dtype), and the final state
    [Bt, H, P, N] float32 with return_final_state. dt_limit clamps the processed step (always,
    as transformers' chunked scan does). The kernels take x, B, C and z with contiguous rows at
    16-byte multiples of strides (splits of one wider row are fine)."""
    _check_scan(x, dt, A, B, C, D, z, dt_bias, dt_limit, chunk_size, initial_state)
    _check_out(out, x.shape, x, align=4 if x.dtype == torch.float32 else 16)
    if _use_kernel(x) and x.numel():
        y, final = _scan_cuda(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, chunk_size, initial_state, out)
        return (y, final) if return_final_state else y
    res = ssd_scan_reference(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                             dt_limit=dt_limit, chunk_size=chunk_size, initial_state=initial_state,
                             return_final_state=True)
    y = res[0] if out is None else out.copy_(res[0])
    return (y, res[1]) if return_final_state else y


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus: bool = True,
                     dt_limit: tuple[float, float] = (0.0, math.inf), out=None, a_log: bool = False):
    """One decode token per sequence: state [Bt, H, P, N] float32 updated in place, x [Bt, H, P],
    dt [Bt, H], A [H], B and C [Bt, G, N] -> y [Bt, H, P] in x's dtype (into `out` when given).
    a_log: A holds A_log and A = -exp(A_log) is taken inside the kernel. A, D and dt_bias may be
    float32 or x's dtype (read as they are when all are x's dtype: a model's parameters, no cast a
    step); x, dt, B, C and z are read through their batch strides (views of a projection's output)."""
    _check_update(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    _check_out(out, x.shape, x)
    if _use_kernel(x) and x.numel():
        return _update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, out, a_log)
    y = ssd_state_update_reference(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                   dt_softplus=dt_softplus, dt_limit=dt_limit, a_log=a_log)
    return y if out is None else out.copy_(y)


def gated_rms_norm(x, z, weight, eps, *, group_size: int | None = None):
    """transformers' MambaRMSNormGated on rows x [..., F] (gate z [..., F] or None, weight [F]),
    normalised per group of group_size features (the whole row by default) -> [..., F] in x's dtype."""
    gs = _check_norm(x, z, weight, eps, group_size)
    if _use_kernel(x) and x.dtype in _KERNEL_DTYPES and x.numel():
        return _norm_cuda(x, z, weight, eps, gs)
    return gated_rms_norm_reference(x, z, weight, eps, group_size=gs)


# ---- the kernels -----------------------------------------------------------------------------
def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _KERNEL_DTYPES and not torch.compiler.is_compiling()


def _launcher(key: tuple, device: torch.device, make_plan, cache=None):
    """The loaded kernel of make_plan(device's arch), once per key; sizes no kernel takes (the
    plan's refusal) raise SSDInputError before anything is launched."""
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import device_arch, load_plan
        try:
            plan = make_plan(device_arch(device))
        except ValueError as e:
            raise SSDInputError(f"no SSD kernel for these sizes: {e}") from None
        hit = _KERNELS[key] = load_plan(plan, device, cache)
    return hit


def readable_in_place(t: torch.Tensor, lead: int) -> bool:
    """Whether the kernels read t ([lead dims..., rows of 16-byte vectors]) through its strides:
    contiguous past its first `lead` dims, its start and those dims' strides 16-byte multiples.
    Otherwise a caller passes t.contiguous()."""
    try:
        strides = _strides("t", t, lead, vector=False)
    except SSDInputError:
        return False
    return vector_aligned(t, strides)


def _strides(name: str, t: torch.Tensor, lead: int, vector: bool) -> tuple[int, ...]:
    """The strides (elements) of t's `lead` leading dims; the dims after them must be contiguous
    (a row of a split of a wider tensor is fine). vector: the kernel copies 16-byte vectors of
    it, so its start and every used stride must be 16-byte multiples."""
    inner = 1
    for d in range(t.dim() - 1, lead - 1, -1):
        if t.shape[d] > 1 and t.stride(d) != inner:
            raise SSDInputError(f"{name} must be contiguous past its first {lead} dim(s) (strides {t.stride()}); "
                                f"call .contiguous() first")
        inner *= t.shape[d]
    strides = tuple(t.stride(d) if t.shape[d] > 1 else 0 for d in range(lead))
    if vector:
        if not vector_aligned(t, strides):
            raise SSDInputError(f"{name} must start on a 16-byte boundary with 16-byte multiples for strides "
                                f"(the kernels copy 16-byte vectors; got strides {t.stride()}); call .contiguous()")
    return strides


def _per_head(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else v.float().contiguous()


def _scan_cuda(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, chunk_size, initial_state, out):
    """The three launches of the chunked scan (codegen/ssd.py): chunk states, state passing, chunk scan."""
    bt, length, heads, hp = x.shape
    groups, n = B.shape[2], B.shape[3]
    dtype, dev = _KERNEL_DTYPES[x.dtype], x.device
    xs, dts = _strides("x", x, 2, True), _strides("dt", dt, 2, False)
    bs, cs = _strides("B", B, 2, True), _strides("C", C, 2, True)
    zs = _strides("z", z, 2, False) if z is not None else ()
    if bt > MAX_GRID_Y:
        raise SSDInputError(f"batch {bt} is more than the kernels' grid takes ({MAX_GRID_Y}); split the batch")
    if initial_state is not None:
        if initial_state.dtype != torch.float32 or not initial_state.is_contiguous() or initial_state.data_ptr() % 16:
            raise SSDInputError("initial_state must be a contiguous float32 tensor on the GPU")
    dims = dict(heads=heads, head_dim=hp, groups=groups, state=n, chunk=chunk_size, dtype=dtype,
                dt_bias=dt_bias is not None, softplus=bool(dt_softplus))
    idx, init = dev.index, initial_state is not None
    k_state = _launcher(("chunk_state", *dims.values(), idx), dev, lambda arch: plan_ssd_chunk_state(**dims, arch=arch))
    k_pass = _launcher(("passing", heads, hp, n, dtype, init, idx), dev,
                       lambda arch: plan_ssd_state_passing(heads=heads, head_dim=hp, state=n, dtype=dtype, initial=init,
                                                           arch=arch))
    # the scores C . B^T once per group into a table the heads read (bf16 / f16; LAYERFORGE_SSD_CB)
    opts = dict(skip=D is not None, gate=z is not None, cb_table=dtype != "f32" and cb_table_default())
    k_scan = _launcher(("chunk_scan", *dims.values(), *opts.values(), idx), dev,
                       lambda arch: plan_ssd_chunk_scan(**dims, **opts, arch=arch))
    if opts["cb_table"]:
        k_cb = _launcher(("chunk_cb", groups, n, chunk_size, dtype, idx), dev,
                         lambda arch: plan_ssd_chunk_cb(groups=groups, state=n, chunk=chunk_size, dtype=dtype,
                                                        arch=arch))
    nc = -(-length // chunk_size)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    A, D, dt_bias = _per_head(A), _per_head(D), _per_head(dt_bias)
    f32 = torch.float32
    states = torch.empty(bt, nc, heads, hp, n, dtype=f32, device=dev)
    s_last = torch.empty(bt, heads, nc, dtype=f32, device=dev)
    start = torch.empty(bt, nc, heads, hp, n, dtype=x.dtype, device=dev)
    final = torch.empty(bt, heads, hp, n, dtype=f32, device=dev)
    y = torch.empty(bt, length, heads, hp, dtype=x.dtype, device=dev) if out is None else out
    step = [A, *((dt_bias,) if dt_bias is not None else ()), lo, hi]
    k_state((nc, bt), [x, *xs, dt, *dts, B, *bs, *step, states, s_last, length, nc])
    k_pass((bt,), [states, s_last, *((initial_state,) if initial_state is not None else ()), start, final, nc])
    cb = ()
    if opts["cb_table"]:
        cb = (torch.empty(bt, nc, groups, chunk_size, chunk_size, dtype=f32, device=dev),)
        k_cb((nc, bt), [B, *bs, C, *cs, cb[0], length, nc])
    k_scan((nc, bt), [x, *xs, dt, *dts, *((B, *bs) if not cb else ()), C, *cs, *((z, *zs) if z is not None else ()),
                      *step, *((D,) if D is not None else ()), start, *cb, y, length, nc])
    return y, final


def _update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, out, a_log=False):
    """The decode step's one launch (codegen/ssd.py's state update)."""
    bt, heads, hp = x.shape
    groups, n = B.shape[1], B.shape[2]
    dtype, dev = _KERNEL_DTYPES[x.dtype], x.device
    if state.dtype != torch.float32 or not state.is_contiguous() or state.data_ptr() % 16:
        raise SSDInputError("state must be a contiguous float32 tensor on the GPU (updated in place)")
    if bt > MAX_GRID_Y:
        raise SSDInputError(f"batch {bt} is more than the kernel's grid takes ({MAX_GRID_Y}); split the batch")
    vec = x.dtype == torch.float32   # f32 B and C are read as float4
    (xs,), (dts,) = _strides("x", x, 1, False), _strides("dt", dt, 1, False)
    (bs,), (cs,) = _strides("B", B, 1, vec), _strides("C", C, 1, vec)
    zs = _strides("z", z, 1, False) if z is not None else ()
    own = all(v is None or (v.dtype == x.dtype and v.is_contiguous()) for v in (A, D, dt_bias))
    opts = dict(heads=heads, head_dim=hp, groups=groups, state=n, dtype=dtype, dt_bias=dt_bias is not None,
                softplus=bool(dt_softplus), skip=D is not None, gate=z is not None, params=dtype if own else "f32",
                a_log=bool(a_log))
    k = _launcher(("update", *opts.values(), dev.index), dev, lambda arch: plan_ssd_state_update(**opts, arch=arch))
    if not own:
        A, D, dt_bias = _per_head(A), _per_head(D), _per_head(dt_bias)
    y = torch.empty(bt, heads, hp, dtype=x.dtype, device=dev) if out is None else out
    k((bt,), [state, x, xs, dt, dts, B, bs, C, cs, *((z, *zs) if z is not None else ()), A,
              *((dt_bias,) if dt_bias is not None else ()), float(dt_limit[0]), float(dt_limit[1]),
              *((D,) if D is not None else ()), y])
    return y


def _norm_cuda(x, z, weight, eps, group_size):
    """The gated norm as the standard library's row layer (dsl/stdlib/mamba2.lf) on its row kernel:
    gated_rms_norm / gated_grouped_rms_norm, or rms_norm / grouped_rms_norm without a gate. Rows that
    are not contiguous are copied first; the weight is used in x's dtype."""
    f = x.shape[-1]
    groups = f // group_size
    name = ("gated_" if z is not None else "") + ("grouped_rms_norm" if groups > 1 else "rms_norm")
    key = (name, f, groups, x.dtype, x.device)
    mod = _NORMS.get(key)
    if mod is None:
        from .layers import module
        mod = _NORMS[key] = module(name, H=f, **({"G": groups} if groups > 1 else {}), dtype=x.dtype,
                                   device=x.device)
    rows = {"x": x.reshape(-1, f).contiguous()}
    if z is not None:
        rows["z"] = z.to(x.dtype).reshape(-1, f).contiguous()
    rows["w"] = weight.to(x.dtype).contiguous()
    return mod._forward_bound(rows, {"eps": float(eps)}, None).reshape(x.shape)
