"""CUDA C++ -> cubin / PTX with NVRTC (through cuda-python's `cuda.bindings.nvrtc`).

One call, `compile_cuda`, does create -> compile -> fetch -> destroy. A failed compile raises
`NVRTCError` carrying the log, the path of the failing source (written to a temp dir) and a
command that reproduces it: `python -m layerforge.runtime.nvrtc FILE --arch sm_90 ...`.
Headers (cuda_fp16.h, cuda_bf16.h) come from the `nvidia-cuda-runtime` wheel of NVRTC's major
version, found at run time (`find_cuda_include_dirs`; `$LAYERFORGE_CUDA_INCLUDE` overrides).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cuda.bindings import nvrtc as _nvrtc

_ARCH_RE = re.compile(r"^sm_(\d{2,3})([af]?)$")  # sm_80, sm_90a, sm_100f
_STDS = ("c++11", "c++14", "c++17", "c++20")


@dataclass(frozen=True)
class CompileOptions:
    """Everything besides the source that decides the compiled bytes (and so the cache key)."""

    arch: str
    std: str = "c++17"
    use_fast_math: bool = False
    line_info: bool = False
    max_registers: int | None = None
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.arch, str) or not _ARCH_RE.match(self.arch):
            raise ValueError(f"arch must look like 'sm_90' or 'sm_90a', got {self.arch!r}")
        if self.std not in _STDS:
            raise ValueError(f"std must be one of {_STDS}, got {self.std!r}")
        if self.max_registers is not None and not (
            isinstance(self.max_registers, int) and 16 <= self.max_registers <= 255
        ):
            raise ValueError(f"max_registers must be an int in [16, 255], got {self.max_registers!r}")
        if isinstance(self.extra, (str, bytes)) or not all(isinstance(e, str) for e in self.extra):
            raise TypeError(f"extra must be a sequence of str, got {self.extra!r}")
        object.__setattr__(self, "extra", tuple(self.extra))  # lists in, hashable tuple kept

    @property
    def virtual_arch(self) -> str:
        """`compute_XY[a|f]`: the PTX target matching `arch`."""
        return "compute_" + self.arch[len("sm_"):]

    def to_args(self, *, ptx_only: bool = False) -> list[str]:
        """NVRTC command-line options. `ptx_only` targets the virtual arch (no ptxas run)."""
        args = [
            f"--gpu-architecture={self.virtual_arch if ptx_only else self.arch}",
            f"--std={self.std}",
            "-default-device",  # plain functions are __device__: templates need no annotations
        ]
        if not ptx_only:
            args.append("--ptxas-options=-v")  # per-kernel registers / spills / smem in the log
        if nvrtc_version() >= (12, 9):
            # NVRTC's own disk cache (12.9+) returns hits without the ptxas report; layerforge
            # caches results itself (runtime/cache.py), log included.
            args.append("--no-cache")
        if self.use_fast_math:
            args.append("--use_fast_math")
        if self.line_info:
            args.append("-lineinfo")
        if self.max_registers is not None:
            args.append(f"--maxrregcount={self.max_registers}")
        args += [f"-I{d}" for d in find_cuda_include_dirs()]
        return args + list(self.extra)

    def to_cli(self) -> list[str]:
        """The options as arguments of this module's `__main__` (see `_main`)."""
        cli = ["--arch", self.arch, "--std", self.std]
        cli += ["--fast-math"] * self.use_fast_math + ["--line-info"] * self.line_info
        if self.max_registers is not None:
            cli += ["--max-registers", str(self.max_registers)]
        return cli + [f"--extra={e}" for e in self.extra]


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one kernel (`--ptxas-options=-v`)."""

    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack_frame: int = 0  # bytes
    shared_mem: int = 0  # static shared memory, bytes

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


@dataclass(frozen=True)
class CompileResult:
    name: str
    options: CompileOptions
    cubin: bytes | None
    ptx: str | None
    log: str
    resources: dict[str, KernelResources] = field(default_factory=dict)  # by (mangled) kernel name
    lowered_names: dict[str, str] = field(default_factory=dict)  # name expression -> mangled name
    compile_seconds: float = 0.0


class NVRTCError(RuntimeError):
    def __init__(self, message: str, *, log: str = "", source_path: str | None = None,
                 command: str | None = None):
        self.log, self.source_path, self.command = log, source_path, command
        parts = [message]
        if log.strip():
            parts.append("NVRTC log:\n" + log.rstrip())
        if source_path:
            parts.append(f"source written to: {source_path}")
        if command:
            parts.append(f"reproduce with: {command}")
        super().__init__("\n".join(parts))


def _check(result, call: str):
    """cuda.bindings returns (status, *values): raise on a bad status, return the values."""
    status, *values = result
    if status != _nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, what = _nvrtc.nvrtcGetErrorString(status)
        raise NVRTCError(f"{call} failed: {what.decode()}")
    return values[0] if len(values) == 1 else values


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    major, minor = _check(_nvrtc.nvrtcVersion(), "nvrtcVersion")
    return major, minor


@functools.cache
def supported_archs() -> tuple[int, ...]:
    """Real architectures this NVRTC can emit cubin for, e.g. (75, 80, 86, ..., 90, 100)."""
    return tuple(_check(_nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


# -- CUDA headers ------------------------------------------------------------------------------
# The kernels include cuda_fp16.h and cuda_bf16.h (nv/target, which they pull in, is built into
# NVRTC). They are a declared dependency: the `nvidia-cuda-runtime` wheel of NVRTC's major
# version (pyproject's `cuda` extra), found in the `nvidia` namespace package at run time.
# Headers of another major do not fit NVRTC's builtins, so every candidate is version-checked.

INCLUDE_ENV = "LAYERFORGE_CUDA_INCLUDE"  # override: directories (os.pathsep-separated)
_REQUIRED_HEADERS = ("cuda_fp16.h", "cuda_bf16.h")
_CUDART_VERSION_RE = re.compile(rb"#define\s+CUDART_VERSION\s+(\d+)")


class CudaHeadersNotFound(NVRTCError):
    """No directory with the CUDA headers the kernels include, for this NVRTC's major version."""


@functools.cache
def find_cuda_include_dirs() -> tuple[str, ...]:
    """The `-I` directories for cuda_fp16.h / cuda_bf16.h, in this order:

    1. `$LAYERFORGE_CUDA_INCLUDE`, when set (it must hold the headers);
    2. the `nvidia-cuda-runtime` wheel of NVRTC's major version (`nvidia/cu13/include`);
    3. `$CUDA_HOME/include` or `$CUDA_PATH/include`, when set and of NVRTC's major version.
    No path is guessed (no /usr/local/cuda): a machine without the wheel gets an error naming it.
    """
    major = nvrtc_version()[0]
    override = os.environ.get(INCLUDE_ENV)
    if override:
        dirs = tuple(d for d in override.split(os.pathsep) if d)
        missing = [h for h in _REQUIRED_HEADERS if not any(Path(d, h).is_file() for d in dirs)]
        if missing:
            raise CudaHeadersNotFound(f"${INCLUDE_ENV}={override!r} holds no {', '.join(missing)}")
        _check_header_major(Path(next(d for d in dirs if Path(d, "cuda_bf16.h").is_file())),
                            major, f"${INCLUDE_ENV}")
        return dirs
    tried = []
    for where, candidate in _header_dir_candidates(major):
        tried.append(f"{candidate} ({where})")
        if all((candidate / h).is_file() for h in _REQUIRED_HEADERS) and \
                cuda_header_version(candidate)[0] in (major, None):
            return (str(candidate),)
    package = header_package(major)
    raise CudaHeadersNotFound(
        f"the CUDA headers the kernels include ({', '.join(_REQUIRED_HEADERS)}) were not found "
        f"for NVRTC {major}.x: install the {package} wheel of the same major version "
        f"(pip install '{package}>={major},<{major + 1}', or layerforge's 'cuda' extra), "
        f"or set {INCLUDE_ENV} to a directory holding them."
        + ("\nlooked in: " + "; ".join(tried) if tried else ""))


def header_package(major: int) -> str:
    """The pip package with the CUDA headers of NVRTC `major` (CUDA 12's wheels had a suffix)."""
    return "nvidia-cuda-runtime" if major >= 13 else f"nvidia-cuda-runtime-cu{major}"


def _cuda_dir_candidates(major: int, sub: str, package: str, cu12_folder: str):
    """(where, directory) pairs of a CUDA folder (`sub`: include, bin), the wheels first (`nvidia` is their
    namespace package: CUDA 13+ wheels share nvidia/cuXY/<sub>, CUDA 12's each have a folder of their own), then
    $CUDA_HOME's and $CUDA_PATH's."""
    spec = importlib.util.find_spec("nvidia")
    wheel_dir = f"cu{major}/{sub}" if major >= 13 else f"{cu12_folder}/{sub}"
    for root in (spec.submodule_search_locations or []) if spec else []:
        yield f"{package} wheel", Path(root, wheel_dir)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield f"${var}", Path(os.environ[var], sub)


def _header_dir_candidates(major: int):
    """(where, directory) pairs for the headers, the wheels first."""
    return _cuda_dir_candidates(major, "include", header_package(major), "cuda_runtime")


def cuda_tool(name: str) -> str | None:
    """A CUDA binary utility of NVRTC's major version (cuobjdump, nvdisasm): its nvidia-cuda-<name> wheel's, else
    $CUDA_HOME/bin's or $CUDA_PATH/bin's, else PATH's; None where there is none."""
    major = nvrtc_version()[0]
    package = f"nvidia-cuda-{name}" + ("" if major >= 13 else f"-cu{major}")
    for _, folder in _cuda_dir_candidates(major, "bin", package, f"cuda_{name}"):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def cuda_header_version(include_dir: str | os.PathLike) -> tuple[int | None, int | None]:
    """(major, minor) from CUDART_VERSION in `include_dir`'s cuda_runtime_api.h; None if absent."""
    try:
        head = Path(include_dir, "cuda_runtime_api.h").read_bytes()
    except OSError:
        return None, None
    hit = _CUDART_VERSION_RE.search(head)
    if not hit:
        return None, None
    version = int(hit.group(1))  # e.g. 13050
    return version // 1000, version % 1000 // 10


def _check_header_major(include_dir: Path, major: int, where: str) -> None:
    found = cuda_header_version(include_dir)[0]
    if found not in (major, None):
        raise CudaHeadersNotFound(f"{where}: the headers in {include_dir} are CUDA {found}.x, "
                                  f"NVRTC is {major}.x; point it at CUDA {major}.x headers")


def nvrtc_library_path() -> str | None:
    """The libnvrtc file this process has loaded (Linux: /proc/self/maps), for diagnostics."""
    nvrtc_version()  # makes sure the library is loaded
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    hits = [line.split(None, 5)[-1] for line in maps.splitlines() if "/libnvrtc.so" in line]
    return hits[0] if hits else None


def default_arch() -> str:
    """`sm_XY` of torch's current CUDA device (what is built next is for that card: the tuning tables learn its
    name, codegen/tuning.note_device)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU is visible, so the target arch cannot be guessed: "
                           "pass one explicitly, e.g. CompileOptions(arch='sm_90')")
    from .launch import device_arch
    return device_arch()


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_FIELDS = {  # KernelResources field -> pattern in ptxas -v output
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "shared_mem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per-kernel resources from the ptxas -v report; each section starts at 'Compiling entry'."""
    starts = list(_ENTRY_RE.finditer(log))
    out = {}
    for i, m in enumerate(starts):
        section = log[m.end(): starts[i + 1].start() if i + 1 < len(starts) else len(log)]
        values = {k: int(hit.group(1)) for k, rx in _FIELDS.items() if (hit := rx.search(section))}
        out[m.group(1)] = KernelResources(**values)
    return out


def _fetch(prog, size_fn, get_fn, call: str) -> bytes:
    size = _check(size_fn(prog), call + "Size")
    # a fresh writable buffer: NVRTC writes into it. (`b" " * size` was an immutable bytes object,
    # and at size 1, an empty log's terminator, CPython's shared one-byte b" ": NVRTC's NUL went
    # into every later b" " of the process, and sources rendered after it had NULs for spaces.)
    buf = bytearray(size)
    _check(get_fn(prog, buf), call)
    return bytes(buf)


def _write_failing_source(source: str, name: str) -> str:
    path = Path(tempfile.mkdtemp(prefix="layerforge-nvrtc-")) / Path(name).name
    path.write_text(source)
    return str(path)


def compile_cuda(source: str, name: str, options: CompileOptions, *, want_ptx: bool = False,
                 want_cubin: bool = True, name_expressions: tuple[str, ...] = ()) -> CompileResult:
    """Compile one translation unit. `name` is the program's file name (e.g. 'rms_norm.cu').

    A real-arch compile yields cubin (and the PTX it went through, on request); PTX alone is
    compiled for the virtual arch, skipping ptxas. `name_expressions` (e.g. 'k<128>') are
    resolved to mangled names in `lowered_names`, for templated kernels.
    """
    if not (want_ptx or want_cubin):
        raise ValueError("nothing to produce: want_ptx and want_cubin are both False")
    if int(_ARCH_RE.match(options.arch).group(1)) not in supported_archs():
        raise NVRTCError(f"NVRTC {'.'.join(map(str, nvrtc_version()))} cannot target "
                         f"{options.arch}; it supports "
                         + ", ".join(f"sm_{a}" for a in supported_archs()))
    name = name if name.endswith((".cu", ".cuh")) else name + ".cu"
    args = options.to_args(ptx_only=not want_cubin)
    start = time.perf_counter()
    prog = _check(_nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            _check(_nvrtc.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
        status, = _nvrtc.nvrtcCompileProgram(prog, len(args), [a.encode() for a in args])
        log = _fetch(prog, _nvrtc.nvrtcGetProgramLogSize, _nvrtc.nvrtcGetProgramLog,
                     "nvrtcGetProgramLog").rstrip(b"\0").decode(errors="replace")
        if status != _nvrtc.nvrtcResult.NVRTC_SUCCESS:
            path = _write_failing_source(source, name)
            command = shlex.join([sys.executable, "-m", "layerforge.runtime.nvrtc", path,
                                  *options.to_cli()])
            raise NVRTCError(f"NVRTC failed to compile {name} for {options.arch}", log=log,
                             source_path=path, command=command)
        cubin = bytes(_fetch(prog, _nvrtc.nvrtcGetCUBINSize, _nvrtc.nvrtcGetCUBIN,
                             "nvrtcGetCUBIN")) if want_cubin else None
        ptx = _fetch(prog, _nvrtc.nvrtcGetPTXSize, _nvrtc.nvrtcGetPTX,
                     "nvrtcGetPTX").rstrip(b"\0").decode() if want_ptx else None
        lowered = {e: _check(_nvrtc.nvrtcGetLoweredName(prog, e.encode()),
                             "nvrtcGetLoweredName").decode() for e in name_expressions}
    finally:
        _nvrtc.nvrtcDestroyProgram(prog)
    return CompileResult(name=name, options=options, cubin=cubin, ptx=ptx, log=log,
                         resources=parse_ptxas_log(log), lowered_names=lowered,
                         compile_seconds=time.perf_counter() - start)


def _main(argv: list[str] | None = None) -> int:
    """`python -m layerforge.runtime.nvrtc FILE --arch sm_90`: compile FILE, print the log.
    `--where` prints which NVRTC library and CUDA headers this environment uses."""
    p = argparse.ArgumentParser(prog="python -m layerforge.runtime.nvrtc", description=_main.__doc__)
    p.add_argument("file", type=Path, nargs="?")
    p.add_argument("--where", action="store_true", help="print the NVRTC library and header paths")
    p.add_argument("--arch")
    p.add_argument("--std", default="c++17")
    p.add_argument("--fast-math", action="store_true")
    p.add_argument("--line-info", action="store_true")
    p.add_argument("--max-registers", type=int)
    p.add_argument("--extra", action="append", default=[], help="raw NVRTC option, e.g. --extra=-DX=1")
    p.add_argument("--ptx", action="store_true", help="print the PTX too")
    p.add_argument("-o", "--output", type=Path, help="write the cubin here")
    a = p.parse_args(argv)
    if a.where:
        return _print_toolchain()
    if a.file is None or a.arch is None:
        p.error("FILE and --arch are required (or --where)")
    options = CompileOptions(a.arch, a.std, a.fast_math, a.line_info, a.max_registers, tuple(a.extra))
    print("nvrtc", ".".join(map(str, nvrtc_version())), shlex.join(options.to_args()), file=sys.stderr)
    try:
        result = compile_cuda(a.file.read_text(), a.file.name, options, want_ptx=a.ptx)
    except NVRTCError as e:
        print(e.log or e, file=sys.stderr)
        return 1
    print(result.log, file=sys.stderr)
    if a.ptx:
        print(result.ptx)
    if a.output:
        a.output.write_bytes(result.cubin)
    print(f"ok: {len(result.cubin)} bytes of cubin in {result.compile_seconds:.3f} s", file=sys.stderr)
    return 0


def _print_toolchain() -> int:
    print("nvrtc", ".".join(map(str, nvrtc_version())), nvrtc_library_path())
    try:
        dirs = find_cuda_include_dirs()
    except CudaHeadersNotFound as e:
        print(e, file=sys.stderr)
        return 1
    major, minor = cuda_header_version(dirs[0])
    print("headers", f"{major}.{minor}" if major is not None else "unknown", *dirs)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
