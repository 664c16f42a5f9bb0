"""Load cubins into torch's CUDA context and launch kernels through the driver API.

Modules are loaded into the primary context of a device, the one torch's runtime uses, so
kernels share memory and streams with torch. A launch goes on torch's current stream by
default, allocates nothing on the device and never synchronises, so it can be captured in
a CUDA graph. Only cubins are loaded: PTX from a newer NVRTC may not JIT on an older driver.

Kernel arguments are described once (`("ptr", "ptr", "f32", "i32")`); per call they are
written into per-thread ctypes slots whose addresses form the `void**` that cuLaunchKernel
takes (the driver copies the values at launch, so reusing the slots is safe). A TMA tensor
map ("tmap", a `const __grid_constant__` kernel parameter) is 128 bytes copied by value into a
64-byte-aligned slot the same way.

Why not cuda.core's `launch` (measured on an H200, torch 2.11, cuda.core 1.2.0; see
benchmarks/NOTES.md): a launch here costs 7.3 µs of host time against 7.7 µs through cuda.core
with its Stream wrappers cached per raw handle, 8.7 µs with a LaunchConfig made per call and
19.3 µs with a Stream wrapped per call; both work under CUDA graph capture. cuda.core would
add a dependency and a stream-wrapper cache for no gain, so this module stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from typing import Any, Sequence

import torch
from cuda.bindings import driver as cu

_ARG_TYPES = {
    "ptr": ctypes.c_void_p, "bool": ctypes.c_bool,
    "i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
    "f32": ctypes.c_float, "f64": ctypes.c_double,
}

# The host image of a tensor map parameter (CUtensorMap: 128 opaque bytes, alignas(64) in C).
# Its slot is over-allocated and used from a 64-byte boundary (ctypes aligns less): the driver
# reads the parameter's bytes from there at launch.
TensorMapParam = ctypes.c_uint8 * 128
TENSOR_MAP_BYTES, TENSOR_MAP_ALIGN = 128, 64
_ARG_TYPES["tmap"] = TensorMapParam
_TYPE_NAMES = {t: name for name, t in _ARG_TYPES.items()}
_SCALAR_CTYPES = frozenset(_ARG_TYPES.values()) | {ctypes.c_int8, ctypes.c_uint8,
                                                   ctypes.c_int16, ctypes.c_uint16}
_DEFAULT_DYNAMIC_SMEM = 48 * 1024  # the most a launch may ask for without opting in
_ATTR = cu.CUfunction_attribute


class CudaDriverError(RuntimeError):
    def __init__(self, call: str, status: cu.CUresult):
        self.call, self.status = call, status
        _, name = cu.cuGetErrorName(status)
        _, text = cu.cuGetErrorString(status)
        name = name.decode() if name else str(int(status))
        super().__init__(f"{call} failed with {name}: {text.decode() if text else 'unknown error'}")


def check(result: tuple, call: str) -> Any:
    """cuda.bindings returns (status, *values): raise naming `call` on failure, else the values."""
    status, *values = result
    if status:  # CUresult is an int enum; CUDA_SUCCESS is 0
        raise CudaDriverError(call, status)
    return values[0] if len(values) == 1 else tuple(values)


def device_index(device: int | str | torch.device | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"kernels run on CUDA devices, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def primary_context(index: int) -> cu.CUcontext:
    """The primary context of device `index`, the one torch's runtime uses (torch inits CUDA)."""
    torch.cuda.init()
    check(cu.cuInit(0), "cuInit")
    dev = check(cu.cuDeviceGet(index), "cuDeviceGet")
    return check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")  # kept for life


@contextlib.contextmanager
def _current(ctx: cu.CUcontext):
    check(cu.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        yield
    finally:
        check(cu.cuCtxPopCurrent(), "cuCtxPopCurrent")


@functools.cache
def _device_attribute(index: int, attribute: cu.CUdevice_attribute) -> int:
    dev = check(cu.cuDeviceGet(index), "cuDeviceGet")
    return check(cu.cuDeviceGetAttribute(attribute, dev),
                 f"cuDeviceGetAttribute({attribute.name})")


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # ~10x cheaper than current_stream()
    _current_stream = torch._C._cuda_getCurrentRawStream
else:
    def _current_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


class CudaModule:
    """A cubin loaded into one device's primary context. Never unloaded behind the user's back
    (a captured CUDA graph may still launch its kernels); call `unload()` when done."""

    def __init__(self, image: bytes, device: int | str | torch.device | None = None):
        if not isinstance(image, (bytes, bytearray)) or image[:4] != b"\x7fELF":
            raise ValueError("CudaModule loads cubin (ELF) bytes only; compile for a real sm_XX")
        self.device_index = device_index(device)
        self.context = primary_context(self.device_index)
        with _current(self.context):
            self.handle = check(cu.cuModuleLoadData(bytes(image)), "cuModuleLoadData")

    def function(self, name: str, arg_types: Sequence[str | type]) -> LoadedKernel:
        return LoadedKernel(self, name, arg_types)

    def unload(self) -> None:
        with _current(self.context):
            check(cu.cuModuleUnload(self.handle), "cuModuleUnload")


def _pdl_config() -> cu.CUlaunchConfig:
    """A launch configuration with programmatic stream serialisation allowed (PDL)."""
    attr = cu.CUlaunchAttribute()
    attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg = cu.CUlaunchConfig()
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    return cfg


class LoadedKernel:
    """One `__global__` function of a loaded module, with its argument layout fixed."""

    def __init__(self, module: CudaModule, name: str, arg_types: Sequence[str | type]):
        self.module, self.name = module, name
        self.device_index = module.device_index
        self.arg_types = tuple(_ARG_TYPES[t] if isinstance(t, str) else t for t in arg_types)
        bad = [t for t in self.arg_types if t not in _SCALAR_CTYPES]
        if bad:
            raise TypeError(f"{name}: unsupported argument types {bad}; use {sorted(_ARG_TYPES)}")
        with _current(module.context):
            self.handle = check(cu.cuModuleGetFunction(module.handle, name.encode()),
                                f"cuModuleGetFunction({name!r})")
            # Finish lazy loading now: loading at first launch would not be capture-safe.
            check(cu.cuFuncLoad(self.handle), f"cuFuncLoad({name!r})")

        def attr(a):
            return check(cu.cuFuncGetAttribute(a, self.handle), f"cuFuncGetAttribute({a.name})")

        self.num_regs = attr(_ATTR.CU_FUNC_ATTRIBUTE_NUM_REGS)
        self.static_shared_mem = attr(_ATTR.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        self.local_mem = attr(_ATTR.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
        self.max_threads_per_block = attr(_ATTR.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
        self.max_dynamic_shared_mem = attr(_ATTR.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        self._pack = _make_packer(self.arg_types)
        self._pdl_config = None   # the CUlaunchConfig of programmatic dependent launches, made once

    @classmethod
    def load(cls, cubin: bytes, name: str, arg_types: Sequence[str | type],
             device: int | str | torch.device | None = None) -> LoadedKernel:
        return CudaModule(cubin, device).function(name, arg_types)

    def set_max_dynamic_shared_mem(self, nbytes: int) -> None:
        """Opt in to more than 48 KiB of dynamic shared memory (up to the device's limit)."""
        optin = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        limit = _device_attribute(self.device_index, optin) - self.static_shared_mem
        if nbytes > limit:
            raise ValueError(f"{self.name}: {nbytes} bytes of dynamic shared memory requested, the "
                             f"device allows {limit} (after {self.static_shared_mem} static)")
        attribute = _ATTR.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        check(cu.cuFuncSetAttribute(self.handle, attribute, nbytes),
              "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
        self.max_dynamic_shared_mem = nbytes

    def max_active_clusters(self, cluster: int, block: int, shared_mem: int) -> int:
        """How many clusters of `cluster` CTAs of this kernel (its compile-time cluster size) the
        device holds at once, `block` threads and `shared_mem` dynamic bytes each
        (cuOccupancyMaxActiveClusters): a persistent grid of clusters launches no more."""
        if shared_mem > self.max_dynamic_shared_mem:
            self.set_max_dynamic_shared_mem(shared_mem)
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster, 1, 1
        cfg = cu.CUlaunchConfig()
        cfg.attrs, cfg.numAttrs = [attr], 1
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = cluster, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
        cfg.sharedMemBytes = shared_mem
        with _current(self.module.context):
            return int(check(cu.cuOccupancyMaxActiveClusters(self.handle, cfg), "cuOccupancyMaxActiveClusters"))

    def launch(self, grid: int | Sequence[int], block: int | Sequence[int], args: Sequence[Any],
               shared_mem: int = 0, stream: int | torch.cuda.Stream | None = None, pdl: bool = False) -> None:
        """Enqueue one launch. Pointer args take tensors (their data_ptr()), ints or None.
        pdl: a programmatic dependent launch (sm_90): the kernel may start while the one before
        it in the stream finishes, and must execute `griddepcontrol.wait` before it reads what
        that kernel wrote or writes anything (the generated kernels that ask for it do)."""
        if grid.__class__ is tuple and len(grid) == 3:   # what runtime.launch.Launcher passes
            gx, gy, gz = grid
        else:
            gx, gy, gz = (grid, 1, 1) if grid.__class__ is int else _dim3(grid)
        if block.__class__ is tuple and len(block) == 3:
            bx, by, bz = block
        else:
            bx, by, bz = (block, 1, 1) if block.__class__ is int else _dim3(block)
        if shared_mem > self.max_dynamic_shared_mem:
            self.set_max_dynamic_shared_mem(shared_mem)  # once; better done before capture
        if stream is None:
            stream = _current_stream(self.device_index)
        elif stream.__class__ is not int:
            stream = getattr(stream, "cuda_stream", stream)  # torch.cuda.Stream or CUstream
        params = self._pack(args)
        if pdl:
            cfg = self._pdl_config
            if cfg is None:
                cfg = self._pdl_config = _pdl_config()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = gx, gy, gz
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = bx, by, bz
            cfg.sharedMemBytes, cfg.hStream = shared_mem, stream
            status, = cu.cuLaunchKernelEx(cfg, self.handle, params, 0)
            if status:
                raise CudaDriverError(f"cuLaunchKernelEx({self.name!r}, grid={(gx, gy, gz)}, block={(bx, by, bz)}, "
                                      f"shared_mem={shared_mem}, programmatic serialisation)", status)
            return
        status, = cu.cuLaunchKernel(self.handle, gx, gy, gz, bx, by, bz, shared_mem, stream,
                                    params, 0)
        if status:
            self._retry_or_raise(status, (gx, gy, gz, bx, by, bz, shared_mem, stream, params))

    def _retry_or_raise(self, status: cu.CUresult, launch_args: tuple) -> None:
        # A thread on which torch never touched CUDA has no current context: bind the primary
        # one (as the runtime would) and try again once.
        if status == cu.CUresult.CUDA_ERROR_INVALID_CONTEXT and not int(check(
                cu.cuCtxGetCurrent(), "cuCtxGetCurrent")):
            check(cu.cuCtxSetCurrent(self.module.context), "cuCtxSetCurrent")
            status, = cu.cuLaunchKernel(self.handle, *launch_args, 0)
            if not status:
                return
        grid, block = launch_args[:3], launch_args[3:6]
        raise CudaDriverError(f"cuLaunchKernel({self.name!r}, grid={grid}, block={block}, "
                              f"shared_mem={launch_args[6]})", status)

    def __repr__(self) -> str:
        return (f"LoadedKernel({self.name!r}, cuda:{self.device_index}, regs={self.num_regs}, "
                f"args=({', '.join(map(_type_name, self.arg_types))}))")


def _dim3(dims: Sequence[int]) -> tuple[int, int, int]:
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"grid/block must have 1 to 3 dimensions, got {dims!r}")
    return (*dims, 1, 1)[:3]


def _pointer(value: Any) -> int | None:
    if value is None or value.__class__ is int:
        return value
    data_ptr = getattr(value, "data_ptr", None)  # torch tensors and look-alikes
    return data_ptr() if data_ptr is not None else int(value)  # CUdeviceptr has __int__


def _make_packer(arg_types: tuple[type, ...]):
    """A function `pack(args) -> address of void*[n]`, specialised to `arg_types`.

    Generated once per kernel, like Triton's launchers: unrolled assignments into ctypes slots
    cost ~0.4 us for five arguments, against ~2.4 us for building fresh ctypes objects per call.
    Slots live per thread, so threads launching the same kernel never share them. Values are
    not range-checked (ctypes wraps an int64 into an i32 slot): callers check shapes first.
    """
    n = len(arg_types)
    local = threading.local()

    def slots() -> tuple:
        values = tuple(_slot(t) for t in arg_types)
        addresses = [_slot_address(v, t) for v, t in zip(values, arg_types)]
        array = (ctypes.c_void_p * max(n, 1))(*addresses)
        local.slots = (values, array, ctypes.addressof(array), addresses)  # kept alive here
        return local.slots

    names = [f"a{i}" for i in range(n)]
    lines = ["def pack(args):",
             "    try:", "        s, _, address, at = local.slots",
             "    except AttributeError:", "        s, _, address, at = slots()",
             f"    {''.join(a + ', ' for a in names)}= args" if n else
             "    if len(args): raise ValueError"]
    for i, (a, t) in enumerate(zip(names, arg_types)):
        if t is TensorMapParam:
            lines.append(f"    memmove(at[{i}], _tensor_map_source({a}), {TENSOR_MAP_BYTES})")
            continue
        # tensors take the fast path; ints, None and CUdeviceptr go through _pointer
        value = f"{a}.data_ptr() if {a}.__class__ in TENSORS else _pointer({a})" \
            if t is ctypes.c_void_p else a
        lines.append(f"    s[{i}].value = {value}")
    lines.append("    return address")
    namespace = {"local": local, "slots": slots, "_pointer": _pointer, "memmove": ctypes.memmove,
                 "_tensor_map_source": _tensor_map_source,
                 "TENSORS": frozenset({torch.Tensor, torch.nn.Parameter})}
    exec("\n".join(lines), namespace)
    pack = namespace["pack"]

    def checked_pack(args):
        try:
            return pack(args)
        except (TypeError, ValueError, AttributeError) as e:  # slow path: say which argument is wrong
            raise TypeError(_describe_bad_args(arg_types, args)) from e

    return checked_pack


def _slot(t: type):
    """The ctypes object an argument of type `t` is written into (a tensor map's: with room to
    start at a 64-byte boundary)."""
    if t is TensorMapParam:
        return (ctypes.c_uint8 * (TENSOR_MAP_BYTES + TENSOR_MAP_ALIGN - 1))()
    return t()


def _slot_address(slot, t: type) -> int:
    address = ctypes.addressof(slot)
    return -(-address // TENSOR_MAP_ALIGN) * TENSOR_MAP_ALIGN if t is TensorMapParam else address


def _tensor_map_source(value: Any) -> bytes | int:
    """What a tensor map argument's 128 bytes are copied from: bytes, or the host address of a
    cuda.bindings CUtensorMap (runtime/tma.py encodes them)."""
    if value.__class__ in (bytes, bytearray):
        if len(value) != TENSOR_MAP_BYTES:
            raise ValueError(f"a tensor map is {TENSOR_MAP_BYTES} bytes, got {len(value)}")
        return bytes(value)
    return value.getPtr()


def _type_name(t: type) -> str:
    return _TYPE_NAMES.get(t, t.__name__)


def _describe_bad_args(arg_types: tuple[type, ...], args: Sequence[Any]) -> str:
    signature = ", ".join(map(_type_name, arg_types))
    if len(args) != len(arg_types):
        return f"kernel takes {len(arg_types)} arguments ({signature}), got {len(args)}"
    for i, (t, value) in enumerate(zip(arg_types, args)):
        try:
            if t is TensorMapParam:
                _tensor_map_source(value)
            else:
                t().value = _pointer(value) if t is ctypes.c_void_p else value
        except (TypeError, ValueError, AttributeError) as e:
            return f"argument {i} ({_type_name(t)}) cannot take {type(value).__name__} {value!r}: {e}"
    return f"bad kernel arguments for ({signature})"
