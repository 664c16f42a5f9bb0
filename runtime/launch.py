"""The one compile path and the one launcher of every kernel family.

    result = compile_plan(plan)                      # render -> NVRTC -> disk cache (cubin + ptxas report)
    kernels = load_kernels(result.cubin, plan.kernels, device)   # Launcher per KernelABI, by name
    kernels[plan.abi.name](problem=(rows,), args=[...])          # grid from the ABI, args in its order

Packs (runtime/pack.py) call `load_kernels` with the ABIs read from the manifest: no NVRTC.
Tile searches take `compile_fn(cache)`, so codegen never imports the runtime.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..codegen.abi import KernelABI
from ..codegen.plan import CompileFn, KernelPlan
from .driver import CudaModule, LoadedKernel

__all__ = ["compile_plan", "compile_fn", "load_kernels", "load_plan", "Launcher"]

_DEFAULT_SMEM = 48 * 1024


def compile_plan(plan: KernelPlan, cache=None):
    """The plan's cubin and ptxas report, through the disk cache (compiling on a miss unless
    compiling at run time is disabled: then KernelNotCachedError)."""
    from .cache import default_cache
    return (cache or default_cache()).get_or_compile(*_cache_args(plan))


def plan_cache_key(plan: KernelPlan, cache) -> str:
    """The key under which compile_plan stores `plan` in `cache`."""
    return cache.key(*_cache_args(plan))


def _cache_args(plan: KernelPlan) -> tuple:
    from .nvrtc import CompileOptions
    return plan.source(), plan.kernel_name, CompileOptions(plan.arch), plan.key


def compile_fn(cache=None) -> CompileFn:
    """A compile function for the tile searches: resources by kernel name, or None for a plan
    that cannot be compiled now (compiling at run time disabled and the plan not cached; a
    build would have cached the candidate it chose)."""
    from .cache import KernelNotCachedError

    def run(plan: KernelPlan):
        try:
            return compile_plan(plan, cache).resources
        except KernelNotCachedError:
            return None
    return run


def pdl_enabled() -> bool:
    """Whether kernels that allow it are launched as programmatic dependent launches
    (LAYERFORGE_PDL=1). Off by default: measured on an H200 (benchmarks/NOTES.md), a batch-1
    decode step of the 8-layer Llama-3-8B shape took 1.296 ms of graph replay with it against
    1.264 without, batch 8 1.462 against 1.418."""
    from ..codegen.plan import env_switch
    return env_switch("LAYERFORGE_PDL", False)


class Launcher:
    """One loaded kernel and its ABI: computes the grid from the problem sizes and launches on
    torch's current stream. Arguments come in the ABI's order (`abi.args`)."""

    __slots__ = ("abi", "function", "_grid", "_block", "_smem", "_pdl")

    def __init__(self, abi: KernelABI, function: LoadedKernel):
        self.abi, self.function = abi, function
        self._grid, self._block, self._smem = abi.grid_for, abi.block, abi.shared_bytes
        self._pdl = abi.pdl and pdl_enabled()
        if self._smem > _DEFAULT_SMEM:
            function.set_max_dynamic_shared_mem(self._smem)   # at load: before any graph capture

    def grid(self, *problem: int) -> tuple[int, int, int]:
        return self._grid(*problem)

    def __call__(self, problem: Sequence[int], args: Sequence[Any]) -> None:
        self.function.launch(self._grid(*problem), self._block, args, shared_mem=self._smem, pdl=self._pdl)


def load_kernels(cubin: bytes, abis: Sequence[KernelABI], device: Any) -> dict[str, Launcher]:
    """Load a cubin into `device`'s primary context; a Launcher for each ABI, by kernel name."""
    module = CudaModule(cubin, device)
    return {abi.name: Launcher(abi, module.function(abi.name, abi.launch_types)) for abi in abis}


def load_plan(plan: KernelPlan, device: Any, cache=None) -> Launcher:
    """The plan's main kernel compiled (or taken from the cache) and loaded on `device`."""
    return load_kernels(compile_plan(plan, cache).cubin, plan.kernels, device)[plan.kernel_name]


def device_arch(device: Any = None) -> str:
    """'sm_90' for the device's compute capability (the arch the runtime compiles for). The runtime plans for
    this device next: the tuning tables learn which card the arch is here (codegen/tuning.note_device), so a
    problem takes the splits measured on that card before another card's."""
    from ..codegen import tuning
    arch = "sm_%d%d" % torch.cuda.get_device_capability(device)
    if torch.cuda.is_available():
        tuning.note_device(arch, torch.cuda.get_device_name(device))
    return arch
