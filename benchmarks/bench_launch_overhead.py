"""Host cost of one kernel launch: runtime/driver.py's LoadedKernel.launch beside cuda.core's
`launch`, both on torch's current stream, and whether each works under CUDA graph capture.

    python -m benchmarks.bench_launch_overhead [--launches 20000] [--json FILE]

One tiny kernel (y = a * x + y, 1024 floats) is compiled once with layerforge's NVRTC wrapper
and loaded by both paths from the same cubin. Host cost is the wall time of a loop of launches
divided by their number, the GPU kept busy by the queue; the median of 5 loops is printed.
Capture: a fresh kernel of each path, never launched before, is launched inside
`torch.cuda.graph`, the graph replayed twice, and the result checked.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version

import numpy as np
import torch
from cuda.bindings import driver as cu
try:
    from cuda.core import Device, LaunchConfig, ObjectCode, Stream, launch
except ImportError:  # cuda.core before 0.5 kept its API under `experimental`
    from cuda.core.experimental import Device, LaunchConfig, ObjectCode, Stream, launch

from layerforge.runtime.driver import LoadedKernel
from layerforge.runtime.nvrtc import CompileOptions, compile_cuda

SOURCE = r"""
extern "C" __global__ void axpy(float* y, const float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""
N, BLOCK = 1024, 256
GRID = (N + BLOCK - 1) // BLOCK
ARG_TYPES = ("ptr", "ptr", "f32", "i32")


def per_launch_us(launch_once, launches: int, repeats: int = 5) -> float:
    for _ in range(200):  # warm: first-call paths, caches
        launch_once()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(launches):
            launch_once()
        samples.append((time.perf_counter() - start) / launches * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


class CoreLauncher:
    """cuda.core's launch on torch's current stream, as layerforge would have to wrap it."""

    def __init__(self, cubin: bytes):
        self.index = torch.cuda.current_device()
        self.device = Device(self.index)
        self.device.set_current()  # the primary context, which torch uses
        self.kernel = ObjectCode.from_cubin(cubin).get_kernel("axpy")
        self.config = LaunchConfig(grid=GRID, block=BLOCK)
        self._streams: dict[int, object] = {}  # raw handle -> cuda.core Stream

    def stream(self, cached: bool):
        handle = torch._C._cuda_getCurrentRawStream(self.index)  # as driver.py reads it
        if not cached:
            return self._wrap(handle)
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._streams[handle] = self._wrap(handle)
        return stream

    def _wrap(self, handle: int):
        if hasattr(Stream, "from_handle"):
            return Stream.from_handle(handle)
        return self.device.create_stream(_ForeignStream(handle))  # older cuda.core

    def launch(self, y, x, a, n, *, cached_stream=True, config_per_call=False):
        config = LaunchConfig(grid=GRID, block=BLOCK) if config_per_call else self.config
        launch(self.stream(cached_stream), config, self.kernel, y.data_ptr(),
               x.data_ptr(), np.float32(a), np.int32(n))


class _ForeignStream:
    """A raw stream handle in the `__cuda_stream__` protocol (version 0, handle)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return 0, self.handle


def capture_check(launch_once, y, x) -> str:
    """Launch once inside torch.cuda.graph (first launch ever), replay twice, check y."""
    y.zero_()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            launch_once()
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as e:  # what fails is the finding
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    expected = 2 * 2.0 * x
    return "works" if torch.equal(y, expected) else "wrong result"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launches", type=int, default=20000)
    p.add_argument("--json")
    a = p.parse_args(argv)
    major, minor = torch.cuda.get_device_capability()
    cubin = compile_cuda(SOURCE, "axpy", CompileOptions(f"sm_{major}{minor}")).cubin
    x = torch.randn(N, device="cuda")
    y = torch.zeros(N, device="cuda")

    ours = LoadedKernel.load(cubin, "axpy", ARG_TYPES)
    core = CoreLauncher(cubin)
    # both paths compute the same thing
    ours.launch(GRID, BLOCK, (y, x, 2.0, N))
    core.launch(y, x, 2.0, N)
    torch.cuda.synchronize()
    assert torch.equal(y, 2 * 2.0 * x), "the two launch paths disagree"

    params = ours._pack((y, x, 2.0, N))
    raw_stream = torch.cuda.current_stream().cuda_stream
    rows = {
        "layerforge LoadedKernel.launch": lambda: ours.launch(GRID, BLOCK, (y, x, 2.0, N)),
        "cuda.core launch (stream wrapper cached)": lambda: core.launch(y, x, 2.0, N),
        "cuda.core launch (Stream.from_handle per call)":
            lambda: core.launch(y, x, 2.0, N, cached_stream=False),
        "cuda.core launch (+ LaunchConfig per call)":
            lambda: core.launch(y, x, 2.0, N, config_per_call=True),
        "floor: cuLaunchKernel, args packed once": lambda: cu.cuLaunchKernel(
            ours.handle, GRID, 1, 1, BLOCK, 1, 1, 0, raw_stream, params, 0),
        "reference: torch y.add_(x)": lambda: y.add_(x),
    }
    results = {name: per_launch_us(fn, a.launches) for name, fn in rows.items()}

    fresh_ours, fresh_core = LoadedKernel.load(cubin, "axpy", ARG_TYPES), CoreLauncher(cubin)
    capture = {
        "layerforge LoadedKernel.launch": capture_check(
            lambda: fresh_ours.launch(GRID, BLOCK, (y, x, 2.0, N)), y, x),
        "cuda.core launch": capture_check(lambda: fresh_core.launch(y, x, 2.0, N), y, x),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuda.core {version('cuda-core')}, {a.launches} launches x 5")
    for name, us in results.items():
        print(f"  {name:48s} {us:6.2f} us/launch")
    for name, verdict in capture.items():
        print(f"  capture, {name:39s} {verdict}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"us_per_launch": results, "capture": capture}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
