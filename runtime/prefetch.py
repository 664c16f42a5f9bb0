"""prefetch_l2: ask for a tensor's bytes to come into the GPU's L2 ahead of the kernel that reads them.

    prefetch_l2(layer.out_proj.weight)   # then the norm, then the product: W comes from L2

One launch of the generated prefetch kernel (codegen/prefetch.py) on the current stream, which only
asks and returns; the bytes arrive while the next kernels run. Nothing waits for them and nothing is
written: a product after it computes the same numbers with or without it. Worth it where the kernel
between moves little (so the prefetch has DRAM to itself) and the product reading the tensor is bound
by its reads in flight rather than by bandwidth (a weight read at few rows), and where the tensor fits
in L2 beside what the kernels between touch. CUDA graphs capture it like any launch.
"""
from __future__ import annotations

import torch

from .linear import LinearInputError, device_properties

__all__ = ["prefetch_l2", "L2PrefetchError"]

_LAUNCHERS: dict = {}


class L2PrefetchError(LinearInputError):
    """A tensor prefetch_l2 cannot take (not on a CUDA GPU, not contiguous, not 16-byte aligned)."""


def prefetch_l2(t: torch.Tensor, *, cache=None) -> int:
    """Ask for t's bytes (a contiguous CUDA tensor starting 16-byte aligned) to be brought into its GPU's L2; returns
    the bytes asked for (0 for an empty tensor: no launch). sm_90: bulk prefetches of whole 16-byte pieces (a tail
    under 16 bytes is left out); sm_80 / sm_89: 128-byte lines."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        what = t.device if isinstance(t, torch.Tensor) else type(t).__name__
        raise L2PrefetchError(f"prefetch_l2: a CUDA tensor, got {what}")
    if not t.is_contiguous():
        raise L2PrefetchError("prefetch_l2: the tensor must be contiguous (its bytes one run)")
    if t.data_ptr() % 16:
        raise L2PrefetchError(f"prefetch_l2: the tensor must start 16-byte aligned, its data is at {t.data_ptr():#x}")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return 0
    dev = t.device
    hit = _LAUNCHERS.get(dev.index)
    if hit is None:
        from ..codegen.prefetch import plan_l2_prefetch
        from .launch import device_arch, load_plan
        plan = plan_l2_prefetch(arch=device_arch(dev))
        hit = _LAUNCHERS[dev.index] = (plan, load_plan(plan, dev, cache), device_properties(dev).multi_processor_count)
    plan, launch, sms = hit
    launch((plan.blocks(nbytes, sms),), [t, nbytes])
    return nbytes
