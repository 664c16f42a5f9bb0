import ctypes
import math
import threading
import time

import pytest
import torch

from layerforge.runtime.driver import CudaDriverError, CudaModule, LoadedKernel, TensorMapParam, _dim3, _make_packer
from layerforge.runtime.nvrtc import CompileOptions, compile_cuda, default_arch

from .kernels import REVERSE_IN_SMEM, SAXPY, SAXPY_ARGS

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

PTR, F32, I32, I64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int32, ctypes.c_int64


# -- argument packing (no GPU needed) --------------------------------------------------------

def read_params(address: int, types) -> list:
    """What cuLaunchKernel would read: void*[n] -> each pointed-to value."""
    array = (ctypes.c_void_p * len(types)).from_address(address)
    return [t.from_address(array[i]).value for i, t in enumerate(types)]


def test_packer_writes_each_argument_with_its_ctype():
    types = (PTR, PTR, PTR, F32, I32, I64)
    t = torch.empty(3)
    address = _make_packer(types)((t, 0x1234, None, 1.5, -7, 2**40))
    assert read_params(address, types) == [t.data_ptr(), 0x1234, None, 1.5, -7, 2**40]


def test_packer_reuses_its_slots_so_packing_allocates_nothing():
    pack = _make_packer((I32,))
    first = pack((1,))
    assert pack((2,)) == first and read_params(first, (I32,)) == [2]


def test_packer_slots_are_per_thread():
    pack = _make_packer((I32,))
    here = pack((1,))
    there = []

    def other_thread():  # reads its slots before exiting: they die with the thread
        address = pack((2,))
        there.append((address, read_params(address, (I32,))))

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert there[0][0] != here and there[0][1] == [2]
    assert read_params(here, (I32,)) == [1]


def test_packer_copies_a_tensor_map_by_value_into_a_64_byte_aligned_slot():
    types = (PTR, TensorMapParam, I32, TensorMapParam)
    pack = _make_packer(types)
    first, second = bytes(range(128)), bytes(range(255, 127, -1))
    array = (ctypes.c_void_p * 4).from_address(pack((0x1000, first, 7, bytearray(second))))
    assert [array[i] % 64 for i in (1, 3)] == [0, 0]
    assert ctypes.string_at(array[1], 128) == first and ctypes.string_at(array[3], 128) == second
    assert PTR.from_address(array[0]).value == 0x1000 and I32.from_address(array[2]).value == 7


def test_packer_copies_a_tensor_map_from_its_host_address():
    class Map:   # what cuda.bindings' CUtensorMap offers: getPtr(), the address of its 128 bytes
        def __init__(self, data):
            self.buffer = ctypes.create_string_buffer(data, 128)

        def getPtr(self):
            return ctypes.addressof(self.buffer)

    array = (ctypes.c_void_p * 1).from_address(_make_packer((TensorMapParam,))((Map(b"\x5a" * 128),)))
    assert ctypes.string_at(array[0], 128) == b"\x5a" * 128


@pytest.mark.parametrize("value, message", [(b"short", "tensor map is 128 bytes"), (5, "getPtr")])
def test_packer_names_a_bad_tensor_map(value, message):
    with pytest.raises(TypeError, match=f"argument 0 \\(tmap\\) cannot take .*{message}"):
        _make_packer((TensorMapParam,))((value,))


def test_packer_with_no_arguments():
    assert isinstance(_make_packer(())(()), int)


@pytest.mark.parametrize("args, message", [
    ((1, 2), "takes 3 arguments (ptr, f32, i32), got 2"),
    ((1, 2.0, 3, 4), "takes 3 arguments"),
    ((1, "x", 3), "argument 1 (f32) cannot take str"),
    ((1, 2.0, 3.5), "argument 2 (i32) cannot take float"),
    (("p", 2.0, 3), "argument 0 (ptr) cannot take str"),
])
def test_packer_names_the_bad_argument(args, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _make_packer((PTR, F32, I32))(args)


def test_grid_and_block_take_one_to_three_dims():
    assert _dim3((4,)) == (4, 1, 1) and _dim3((4, 5)) == (4, 5, 1) and _dim3((4, 5, 6)) == (4, 5, 6)
    with pytest.raises(ValueError):
        _dim3((1, 2, 3, 4))


def test_only_cubin_is_loaded():
    with pytest.raises(ValueError, match="cubin"):
        CudaModule(b"//\n.version 8.0\n.target sm_90\n")


# -- on the GPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saxpy_cubin():
    return compile_cuda(SAXPY, "saxpy", CompileOptions(default_arch())).cubin


def poisoned_like(t):
    return torch.full_like(t, math.nan)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype, name", [(torch.float32, "saxpy_f32"), (torch.bfloat16, "saxpy_bf16")])
def test_saxpy_matches_torch(saxpy_cubin, dtype, name):
    kernel = LoadedKernel.load(saxpy_cubin, name, SAXPY_ARGS)
    n, a = 1_000_003, 1.75  # not a multiple of the block: the tail is guarded
    x = torch.randn(n, device="cuda", dtype=dtype)
    y = torch.randn(n, device="cuda", dtype=dtype)
    out = poisoned_like(x)
    kernel.launch(cdiv(n, 256), 256, (out, x, y, a, n))
    torch.cuda.synchronize()
    expected = (a * x.float() + y.float()).to(dtype)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected)


def cdiv(a, b):
    return (a + b - 1) // b


@gpu
@needs_gpu
def test_launch_takes_raw_pointers_and_an_explicit_stream(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_f32", SAXPY_ARGS, device="cuda:0")
    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    y = torch.ones_like(x)
    out = poisoned_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    kernel.launch((4, 1, 1), (256,), (out.data_ptr(), x.data_ptr(), y.data_ptr(), 2, 1000),
                  stream=side)
    side.synchronize()
    torch.testing.assert_close(out, 2 * x + 1)


@gpu
@needs_gpu
def test_launch_follows_torch_current_stream(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_f32", SAXPY_ARGS)
    x = torch.randn(4096, device="cuda")
    out = poisoned_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernel.launch(16, 256, (out, x, x, 1.0, 4096))
        done = torch.cuda.Event()
        done.record()
    done.synchronize()  # recorded on `side` after the launch
    torch.testing.assert_close(out, 2 * x)


@gpu
@needs_gpu
def test_launch_is_captured_in_a_cuda_graph_and_replayed(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_bf16", SAXPY_ARGS)  # first launch is captured
    n = 50_000
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = poisoned_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel.launch(cdiv(n, 128), 128, (out, x, y, -0.5, n))
    torch.cuda.synchronize()
    assert out.isnan().all()  # capturing records the launch without running it
    for _ in range(2):
        x.normal_()
        y.normal_()
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, (-0.5 * x.float() + y.float()).bfloat16())


@gpu
@needs_gpu
def test_dynamic_shared_memory_above_48_kib():
    cubin = compile_cuda(REVERSE_IN_SMEM, "reverse", CompileOptions(default_arch())).cubin
    kernel = LoadedKernel.load(cubin, "reverse_blocks", ("ptr", "ptr", "i32"))
    assert kernel.max_dynamic_shared_mem <= 48 * 1024
    n, blocks = 100 * 1024 // 4, 6  # 100 KiB per block
    x = torch.randn(blocks * n, device="cuda")
    out = poisoned_like(x)
    kernel.launch(blocks, 256, (out, x, n), shared_mem=n * 4)
    torch.cuda.synchronize()
    assert kernel.max_dynamic_shared_mem == n * 4
    torch.testing.assert_close(out.view(blocks, n), x.view(blocks, n).flip(1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dynamic shared memory"):
        kernel.launch(1, 32, (out, x, 8), shared_mem=1 << 20)


@gpu
@needs_gpu
def test_launch_from_a_thread_that_never_used_cuda(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_f32", SAXPY_ARGS)
    x = torch.randn(1024, device="cuda")
    out = poisoned_like(x)
    torch.cuda.synchronize()
    errors = []

    def launch():
        try:
            kernel.launch(4, 256, (out, x, x, 3.0, 1024))
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    worker = threading.Thread(target=launch)
    worker.start()
    worker.join()
    assert not errors, errors
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 4 * x)


@gpu
@needs_gpu
def test_kernel_reports_its_attributes(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_f32", SAXPY_ARGS)
    assert 0 < kernel.num_regs <= 64 and kernel.static_shared_mem == 0 and kernel.local_mem == 0
    assert kernel.max_threads_per_block >= 256
    assert "saxpy_f32" in repr(kernel) and "ptr, ptr, ptr, f32, i32" in repr(kernel)


@gpu
@needs_gpu
def test_unknown_kernel_name_is_a_clear_error(saxpy_cubin):
    with pytest.raises(CudaDriverError, match=r"cuModuleGetFunction\('nope'\).*CUDA_ERROR_NOT_FOUND"):
        LoadedKernel.load(saxpy_cubin, "nope", SAXPY_ARGS)


@gpu
@needs_gpu
def test_bad_launch_configuration_names_the_call(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_f32", SAXPY_ARGS)
    x = torch.empty(1, device="cuda")
    with pytest.raises(CudaDriverError, match="cuLaunchKernel.*block=\\(4096, 1, 1\\)"):
        kernel.launch(1, 4096, (x, x, x, 1.0, 1))


@gpu
@needs_gpu
def test_host_cost_per_launch_is_a_few_microseconds(saxpy_cubin):
    kernel = LoadedKernel.load(saxpy_cubin, "saxpy_f32", SAXPY_ARGS)
    x = torch.empty(1, device="cuda")
    args = (x, x, x, 1.0, 1)
    kernel.launch(1, 32, args)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            kernel.launch(1, 32, args)
        best = min(best, (time.perf_counter() - start) / 200)
        torch.cuda.synchronize()
    print(f"host cost per launch: {best * 1e6:.2f} us")
    assert best < 20e-6  # the target is ~3 us; a loose bound that still catches regressions
