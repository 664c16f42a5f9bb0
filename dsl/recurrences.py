"""Scans and causal convolutions on torch tensors: the one definition of what they compute.

The reference evaluator (dsl/evaluator.py: `cumsum`, `cumprod`, `scan`, `conv1d_causal`) and the
scan kernels' torch references (runtime/scan.py) both call these functions, so the DSL's
meaning and the kernels' tests cannot drift apart.

    linear_recurrence(a, b, axis, initial)   h_t = a_t * h_{t-1} + b_t, h_{-1} = initial (or 0)
    causal_conv1d(x, w, axis, state)         y_t = sum_k w[k] * xs[t + k], xs = state ++ x
    softplus(x)                              log(1 + exp(x)), x itself above 20 (torch's threshold)

All of them compute in the dtype they are given (callers pass float64 for the reference);
the recurrence runs step by step along the axis, in order, as the definition reads.
"""
from __future__ import annotations

import torch

__all__ = ["linear_recurrence", "causal_conv1d", "softplus", "SOFTPLUS_THRESHOLD"]

SOFTPLUS_THRESHOLD = 20.0   # torch.nn.functional.softplus's default: above it, softplus(x) = x


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x, beta=1.0, threshold=SOFTPLUS_THRESHOLD)


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, axis: int, initial: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, last): h_t = a_t * h_{t-1} + b_t along `axis` (a and b broadcast together), h_{-1} =
    `initial` (broadcast to a step's shape; zeros when None); `last` is the final step's h (the
    initial state itself when the axis is empty)."""
    a, b = torch.broadcast_tensors(a, b)
    axis = axis % a.dim() if a.dim() else 0
    a_t, b_t = a.movedim(axis, 0), b.movedim(axis, 0)
    step_shape = a_t.shape[1:]
    h = torch.zeros(step_shape, dtype=b.dtype, device=b.device) if initial is None \
        else torch.broadcast_to(initial.to(b.dtype), step_shape).clone()
    out = torch.empty_like(b_t)
    for t in range(a_t.shape[0]):
        h = a_t[t] * h + b_t[t]
        out[t] = h
    return out.movedim(0, axis), h


def causal_conv1d(x: torch.Tensor, w: torch.Tensor, axis: int, state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, new_state) of a causal 1-D convolution along `axis` of x, one filter per position of
    the other axes (depthwise): w has x's shape without the axis, plus the K taps last
    (broadcasting like x's other axes); `state` holds the K - 1 inputs before x (x's shape with
    K - 1 along the axis; zeros when None). y_t = sum_k w[..., k] * xs_{t + k} where xs = state
    followed by x, so the last tap meets the newest input; new_state is the last K - 1 of xs."""
    axis = axis % x.dim()
    k = w.shape[-1]
    xm = x.movedim(axis, -1)
    if state is None:
        prev = torch.zeros(*xm.shape[:-1], k - 1, dtype=x.dtype, device=x.device)
    else:
        prev = state.to(x.dtype).movedim(axis, -1)
    xs = torch.cat([torch.broadcast_to(prev, (*xm.shape[:-1], k - 1)), xm], -1)
    length = xm.shape[-1]
    y = sum(w[..., j:j + 1].to(x.dtype) * xs[..., j:j + length] for j in range(k))
    if not isinstance(y, torch.Tensor):   # K = 0 cannot pass the checks; keep the type honest
        raise ValueError("causal_conv1d: the filter needs at least one tap")
    return y.movedim(-1, axis), xs[..., xs.shape[-1] - (k - 1):].movedim(-1, axis)
