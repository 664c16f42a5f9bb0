"""The token permutation of a mixture-of-experts layer as three generated kernels (codegen/moe.py),
with the torch references that define them.

    offsets, pos, src = moe_align(ids, num_experts)   # ids int32 [T, k] from the routing kernels
    xs = moe_gather(x, src)                           # x [T, H] -> xs [P, H], P = T * k, by expert
    ...                                               # expert e: rows offsets[e] .. offsets[e+1] - 1 of xs -> y
    out = moe_combine(y, pos, w, shared=s, gate_logit=g, residual=r)   # w f32 [T, k] -> out [T, H]

Pair p = t * k + s is token t's s-th choice. `moe_align` sorts the pairs by expert, stably
(within an expert, increasing p): offsets int32 [E + 1] (offsets[0] = 0, offsets[E] = P, expert
e's count is offsets[e + 1] - offsets[e]), pos int32 [P] (the sorted slot of pair p), src int32
[P] (the token of the pair in slot j). Ids outside [0, E) are clamped into it, on both paths:
the kernel cannot raise without a host synchronisation, and clamping keeps every output a
permutation (no write outside them). The gather clamps src into [0, T), the combine pos into
[0, P), likewise.

CUDA tensors run the kernels (loaded once per plan and device, launched on torch's current
stream, outputs from torch.empty, nothing synchronises: graph-capturable); CPU tensors (and
torch.compile tracing) run the references. Shapes, dtypes, devices, contiguity and (on CUDA)
16-byte alignment are checked before any launch: a mismatch raises MoEInputError (a ValueError).
"""
from __future__ import annotations

import torch

from ..codegen.moe import MAX_EXPERTS, MAX_K, VEC, plan_moe_align, plan_moe_combine, plan_moe_gather

__all__ = ["moe_align", "moe_gather", "moe_combine", "moe_align_reference", "moe_active_reference", "moe_gather_reference",
           "moe_combine_reference", "MoEInputError", "MAX_PAIRS"]

MAX_PAIRS = 1 << 30   # the align kernel's pair indices and slots are ints
_TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}
_KERNELS: dict[tuple, object] = {}   # (family, plan fields..., device index) -> Launcher


class MoEInputError(ValueError):
    """Inputs an MoE permutation kernel cannot take (shape, dtype, device, layout), raised before any launch."""


# ---- references: what the kernels compute ----------------------------------------------------
def _with_fixed(ids: torch.Tensor, num_experts: int, fixed: int) -> torch.Tensor:
    """ids [T, k] clamped into [0, E), then the fixed experts E .. E + fixed - 1 as more columns."""
    ids = ids.long().clamp(0, num_experts - 1)
    if not fixed:
        return ids
    extra = torch.arange(num_experts, num_experts + fixed, device=ids.device).expand(ids.shape[0], fixed)
    return torch.cat([ids, extra], 1)


def moe_align_reference(ids: torch.Tensor, num_experts: int, fixed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets int32 [E + fixed + 1], pos int32 [P], src int32 [P]) of ids [T, k] by a stable sort of
    the pairs p = t * (k + fixed) + s by expert, ids clamped into [0, E); pair s >= k of a token is
    the fixed expert E + s - k (a shared expert every token visits: P = T (k + fixed))."""
    full = _with_fixed(ids, num_experts, fixed)
    k = full.shape[-1]
    num_experts += fixed
    expert = full.reshape(-1)
    order = torch.sort(expert, stable=True).indices            # slot j -> pair
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.bincount(expert, minlength=num_experts).cumsum(0)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=ids.device)
    return offsets.int(), pos.int(), (order // k).int()


def moe_active_reference(offsets: torch.Tensor) -> torch.Tensor:
    """int32 [E + 1]: the experts with pairs (ascending here; the kernel's order may differ), then -1s,
    their number last."""
    counts = offsets[1:] - offsets[:-1]
    hit = torch.nonzero(counts > 0).flatten().to(torch.int32)
    out = torch.full((offsets.numel(),), -1, dtype=torch.int32, device=offsets.device)
    out[: hit.numel()] = hit
    out[-1] = hit.numel()
    return out


def moe_gather_reference(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x[src] [P, H], src clamped into [0, T)."""
    if src.numel() == 0:
        return x.new_empty(0, x.shape[-1])
    return x[src.reshape(-1).long().clamp(0, x.shape[0] - 1)]


def moe_combine_reference(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, *, shared: torch.Tensor | None = None,
                          gate_logit: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                          precision: str = "float32", fixed: int = 0) -> torch.Tensor:
    """out [T, H] in y's dtype: sum_s w[t, s] * y[pos[t * k + s]] (s ascending), + shared[t] (times
    sigmoid(gate_logit[t]) when given), + residual[t], in `precision` ("float32", the kernel's, or
    "float64"), rounded once. pos clamped into [0, T * k). With `fixed`, pos holds k + fixed slots a
    token (moe_align's fixed experts) and those rows weigh sigmoid(gate_logit[t]), or 1."""
    acc_t = {"float32": torch.float32, "float64": torch.float64}[precision]
    if fixed:   # the fixed rows' weights: the gate, or 1
        g = (torch.sigmoid(gate_logit.reshape(-1, 1).to(acc_t)) if gate_logit is not None
             else torch.ones(w.shape[0], 1, dtype=acc_t, device=w.device))
        w = torch.cat([w.to(acc_t), g.expand(w.shape[0], fixed)], 1)
        gate_logit = None
    t, k = w.shape
    rows = pos.reshape(-1).long().clamp(0, max(t * k - 1, 0)).view(t, k)
    acc = torch.zeros(t, y.shape[-1], dtype=acc_t, device=y.device)
    for s in range(k):
        acc = acc + w[:, s, None].to(acc_t) * y[rows[:, s]].to(acc_t)
    if shared is not None:
        sh = shared.to(acc_t)
        if gate_logit is not None:
            sh = sh * torch.sigmoid(gate_logit.reshape(t, 1).to(acc_t))
        acc = acc + sh
    if residual is not None:
        acc = acc + residual.to(acc_t)
    return acc.to(y.dtype)


# ---- checks ----------------------------------------------------------------------------------
def _tensor(what: str, name: str, v, dtypes: tuple[torch.dtype, ...], dims: int | tuple[int, ...]) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise MoEInputError(f"{what}: '{name}' must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype not in dtypes:
        raise MoEInputError(f"{what}: '{name}' must be {' or '.join(map(str, dtypes))}, got {v.dtype}")
    dims = (dims,) if isinstance(dims, int) else dims
    if v.dim() not in dims:
        raise MoEInputError(f"{what}: '{name}' must have {' or '.join(map(str, dims))} dimension(s), "
                            f"got shape {tuple(v.shape)}")
    if not v.is_contiguous():
        raise MoEInputError(f"{what}: '{name}' must be contiguous")
    return v


def _same_device(what: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, v in others.items():
        if v is not None and v.device != first.device:
            raise MoEInputError(f"{what}: '{name}' is on {v.device}, the others on {first.device}")


def _rows(what: str, name: str, v: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(v.shape) != shape:
        raise MoEInputError(f"{what}: '{name}' must be {list(shape)}, got {list(v.shape)}")


def _aligned(what: str, **tensors: torch.Tensor | None) -> None:
    for name, v in tensors.items():
        if v is not None and v.data_ptr() % 16:
            raise MoEInputError(f"{what}: '{name}' must start on a 16-byte boundary (the kernel copies 16-byte "
                                "vectors); a view at an odd offset needs .clone()")


def _out(what: str, name: str, o, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(o, torch.Tensor) or tuple(o.shape) != shape or o.dtype != dtype or o.device != device \
            or not o.is_contiguous():
        got = f"{o.dtype} {list(o.shape)} on {o.device}" if isinstance(o, torch.Tensor) else type(o).__name__
        raise MoEInputError(f"{what}: '{name}' must be a contiguous {dtype} {list(shape)} on {device}, got {got}")


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """A reference's result, copied into `out` when given."""
    return result if out is None else out.copy_(result)


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and not torch.compiler.is_compiling()


def _launcher(key: tuple, device: torch.device, make_plan, cache):
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import device_arch, load_plan
        hit = _KERNELS[key] = load_plan(make_plan(device_arch(device)), device, cache)
    return hit


# ---- the kernels -----------------------------------------------------------------------------
def moe_align(ids: torch.Tensor, num_experts: int, *, fixed: int = 0, active: bool = False,
              out: tuple[torch.Tensor, ...] | None = None, cache=None) -> tuple[torch.Tensor, ...]:
    """ids int32 [T, k] (each in [0, num_experts); others clamped) -> (offsets int32 [E + 1],
    pos int32 [T * k], src int32 [T * k]): see the module's docstring; one launch on CUDA.
    out: the three outputs to write (contiguous int32 of those shapes on ids' device). fixed: every
    token also visits experts E .. E + fixed - 1 after its k (moe_align_reference): offsets
    [E + fixed + 1], pos and src [T (k + fixed)]. active: a fourth output, int32 [E + fixed + 1]: the
    experts with pairs in its first n entries (any order), n last (moe_active_reference)."""
    what = "moe_align"
    ids = _tensor(what, "ids", ids, (torch.int32,), 2)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or not 1 <= num_experts <= MAX_EXPERTS:
        raise MoEInputError(f"{what}: num_experts must be an int in [1, {MAX_EXPERTS}], got {num_experts!r}")
    t, k = ids.shape
    if not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 0 or num_experts + fixed > MAX_EXPERTS:
        raise MoEInputError(f"{what}: fixed must be an int >= 0 with num_experts + fixed <= {MAX_EXPERTS}, "
                            f"got {fixed!r}")
    if not 1 <= k + fixed <= MAX_K:
        raise MoEInputError(f"{what}: ids [T, k] with k + fixed in [1, {MAX_K}], got shape {tuple(ids.shape)}"
                            f" and fixed {fixed}")
    pairs = t * (k + fixed)
    if pairs > MAX_PAIRS:
        raise MoEInputError(f"{what}: {pairs} pairs (at most {MAX_PAIRS})")
    dev = ids.device
    shapes = ((num_experts + fixed + 1,), (pairs,), (pairs,)) + (((num_experts + fixed + 1,),) if active else ())
    names = ("offsets", "pos", "src", "active")[:len(shapes)]
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
            raise MoEInputError(f"{what}: out must be ({', '.join(names)})")
        for name, o, shape in zip(names, out, shapes):
            _out(what, name, o, shape, torch.int32, dev)
    if not _use_kernel(ids):
        ref = moe_align_reference(ids, num_experts, fixed)
        ref = ref + (moe_active_reference(ref[0]),) if active else ref
        return ref if out is None else tuple(_into(o, r) for o, r in zip(out, ref))
    launcher = _launcher(("align", num_experts, k, fixed, active, dev.index), dev,
                         lambda arch: plan_moe_align(experts=num_experts, k=k, fixed=fixed, active=active, arch=arch),
                         cache)
    outs = tuple(out) if out is not None else tuple(torch.empty(s, dtype=torch.int32, device=dev) for s in shapes)
    launcher((), [ids, *outs, pairs])
    return outs


def moe_gather(x: torch.Tensor, src: torch.Tensor, *, out: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """xs [P, H] = x[src] for x bf16/f16 [T, H] (H a multiple of 8) and src int32 [P] (clamped
    into [0, T)); written into `out` when given."""
    what = "moe_gather"
    x = _tensor(what, "x", x, tuple(_TORCH_DTYPES), 2)
    src = _tensor(what, "src", src, (torch.int32,), 1)
    _same_device(what, x, src=src)
    t, h = x.shape
    slots = src.shape[0]
    if h % VEC or h == 0:
        raise MoEInputError(f"{what}: x [T, H] needs H a positive multiple of {VEC}, got shape {tuple(x.shape)}")
    if t == 0 and slots:
        raise MoEInputError(f"{what}: x has no rows for src's {slots} slots")
    dev = x.device
    if out is not None:
        _out(what, "out", out, (slots, h), x.dtype, dev)
    if not _use_kernel(x):
        return _into(out, moe_gather_reference(x, src))
    _aligned(what, x=x, out=out)
    dtype = _TORCH_DTYPES[x.dtype]
    launcher = _launcher(("gather", h, dtype, dev.index), dev,
                         lambda arch: plan_moe_gather(hidden=h, dtype=dtype, arch=arch), cache)
    xs = torch.empty(slots, h, dtype=x.dtype, device=dev) if out is None else out
    if slots:
        launcher((slots,), [x, src, xs, slots, t])
    return xs


def moe_combine(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, *, shared: torch.Tensor | None = None,
                gate_logit: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                fixed: int = 0, out: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """out [T, H] = sum_s w[t, s] * y[pos[t * k + s]] (+ shared[t] * sigmoid(gate_logit[t]), or
    + shared[t] without a gate) (+ residual[t]), in f32, rounded once to y's dtype.
    y bf16/f16 [T * k, H] (H a multiple of 8), pos int32 [T * k] or [T, k] (moe_align's; clamped
    into [0, T * k)), w float32 [T, k], shared / residual [T, H] and gate_logit [T] or [T, 1] in
    y's dtype; gate_logit needs shared (or fixed). Written into `out` [T, H] when given. fixed: the
    shared expert as moe_align's fixed experts: y and pos have T (k + fixed) rows, the fixed ones
    weigh sigmoid(gate_logit[t]) (or 1 without a gate), and `shared` is not given."""
    what = "moe_combine"
    y = _tensor(what, "y", y, tuple(_TORCH_DTYPES), 2)
    pos = _tensor(what, "pos", pos, (torch.int32,), (1, 2))
    w = _tensor(what, "w", w, (torch.float32,), 2)
    t, k = w.shape
    h = y.shape[1]
    if not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 0:
        raise MoEInputError(f"{what}: fixed must be a non-negative int, got {fixed!r}")
    ka = k + fixed
    if not 1 <= ka <= MAX_K:
        raise MoEInputError(f"{what}: w [T, k] with k + fixed in [1, {MAX_K}], got shape {tuple(w.shape)}")
    if h % VEC or h == 0:
        raise MoEInputError(f"{what}: y [P, H] needs H a positive multiple of {VEC}, got shape {tuple(y.shape)}")
    if y.shape[0] != t * ka:
        raise MoEInputError(f"{what}: 'y' must have T * (k + fixed) = {t * ka} rows (w is [{t}, {k}]), got shape "
                            f"{tuple(y.shape)}")
    if pos.numel() != t * ka or (pos.dim() == 2 and tuple(pos.shape) != (t, ka)):
        raise MoEInputError(f"{what}: 'pos' must be [{t * ka}] or [{t}, {ka}] (w is [{t}, {k}]), got shape "
                            f"{tuple(pos.shape)}")
    if fixed and shared is not None:
        raise MoEInputError(f"{what}: the shared expert comes as fixed rows or as 'shared', not both")
    if gate_logit is not None and shared is None and not fixed:
        raise MoEInputError(f"{what}: 'gate_logit' gates the shared expert's output: pass shared too")
    if shared is not None:
        _rows(what, "shared", _tensor(what, "shared", shared, (y.dtype,), 2), (t, h))
    if gate_logit is not None:
        _tensor(what, "gate_logit", gate_logit, (y.dtype,), (1, 2))
        if gate_logit.numel() != t or gate_logit.shape[0] != t:
            raise MoEInputError(f"{what}: 'gate_logit' must be [{t}] or [{t}, 1], got shape {tuple(gate_logit.shape)}")
    if residual is not None:
        _rows(what, "residual", _tensor(what, "residual", residual, (y.dtype,), 2), (t, h))
    _same_device(what, y, pos=pos, w=w, shared=shared, gate_logit=gate_logit, residual=residual)
    dev = y.device
    if out is not None:
        _out(what, "out", out, (t, h), y.dtype, dev)
    if not _use_kernel(y):
        return _into(out, moe_combine_reference(y, pos, w, shared=shared, gate_logit=gate_logit, residual=residual,
                                                fixed=fixed))
    _aligned(what, y=y, shared=shared, residual=residual, out=out)
    dtype = _TORCH_DTYPES[y.dtype]
    opts = dict(shared=shared is not None, shared_gate=gate_logit is not None, residual=residual is not None,
                fixed=fixed)
    launcher = _launcher(("combine", h, k, dtype, *opts.values(), dev.index), dev,
                         lambda arch: plan_moe_combine(hidden=h, k=k, dtype=dtype, arch=arch, **opts), cache)
    out = torch.empty(t, h, dtype=y.dtype, device=dev) if out is None else out
    if t:
        launcher((t,), [y, pos, w, *(v for v in (shared, gate_logit, residual) if v is not None), out, t])
    return out
