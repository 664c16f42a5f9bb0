import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import layerforge.runtime.nvrtc as nvrtc_mod
from layerforge.runtime.nvrtc import (
    CompileOptions,
    CudaHeadersNotFound,
    KernelResources,
    NVRTCError,
    compile_cuda,
    cuda_header_version,
    default_arch,
    find_cuda_include_dirs,
    nvrtc_library_path,
    nvrtc_version,
    parse_ptxas_log,
)

from .kernels import LOCAL_ARRAY, SAXPY, TEMPLATED

ELF_MAGIC = b"\x7fELF"


# -- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a", "sm_100a", "sm_120f"])
def test_options_accept_real_archs(arch):
    assert CompileOptions(arch).arch == arch


@pytest.mark.parametrize("arch", ["sm90", "compute_90", "90", "sm_9", "sm_90x", ""])
def test_options_reject_malformed_archs(arch):
    with pytest.raises(ValueError, match="arch"):
        CompileOptions(arch)


@pytest.mark.parametrize("bad", [dict(std="c++03"), dict(max_registers=8), dict(max_registers=300),
                                 dict(max_registers=64.0)])
def test_options_reject_bad_values(bad):
    with pytest.raises(ValueError):
        CompileOptions("sm_90", **bad)


def test_options_reject_a_bare_string_as_extra():
    with pytest.raises(TypeError):
        CompileOptions("sm_90", extra="-DX=1")


def test_options_are_hashable_and_compare_by_value():
    a = CompileOptions("sm_90", extra=["-DX=1"])  # a list is kept as a tuple
    b = CompileOptions("sm_90", extra=("-DX=1",))
    assert a == b and hash(a) == hash(b) and a.extra == ("-DX=1",)
    assert a != CompileOptions("sm_90", use_fast_math=True)


def test_to_args_spells_out_every_option():
    args = CompileOptions("sm_90a", use_fast_math=True, line_info=True, max_registers=64,
                          extra=("-DFOO=1",)).to_args()
    for expected in ["--gpu-architecture=sm_90a", "--std=c++17", "-default-device",
                     "--ptxas-options=-v", "--use_fast_math", "-lineinfo", "--maxrregcount=64"]:
        assert expected in args
    assert args[-1] == "-DFOO=1"
    assert ("--no-cache" in args) == (nvrtc_version() >= (12, 9))
    assert [a for a in args if a.startswith("-I")] == [f"-I{d}" for d in find_cuda_include_dirs()]


def test_ptx_only_args_target_the_virtual_arch_without_ptxas():
    args = CompileOptions("sm_90a").to_args(ptx_only=True)
    assert "--gpu-architecture=compute_90a" in args
    assert "--ptxas-options=-v" not in args


# -- CUDA headers: a declared wheel, found at run time -----------------------------------------

def _make_headers(include: Path, cudart_version: int | None = 13050) -> Path:
    include.mkdir(parents=True)
    for header in ("cuda_fp16.h", "cuda_bf16.h"):
        (include / header).touch()
    if cudart_version is not None:
        (include / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {cudart_version}\n")
    return include


@pytest.fixture
def no_header_sources(monkeypatch):
    """No wheels, no override, no toolkit variables: only what a test adds is found."""
    monkeypatch.setattr(nvrtc_mod.importlib.util, "find_spec", lambda name: None)
    for var in (nvrtc_mod.INCLUDE_ENV, "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _wheels_at(monkeypatch, namespace: Path):
    wheels = types.SimpleNamespace(submodule_search_locations=[str(namespace)])
    monkeypatch.setattr(nvrtc_mod.importlib.util, "find_spec", lambda name: wheels)


def test_cuda_headers_come_from_the_runtime_wheel_of_nvrtcs_major(monkeypatch):
    monkeypatch.delenv(nvrtc_mod.INCLUDE_ENV, raising=False)
    (include,) = find_cuda_include_dirs.__wrapped__()
    assert Path(include).parts[-3:] == ("nvidia", f"cu{nvrtc_version()[0]}", "include")
    assert (Path(include) / "cuda_bf16.h").is_file()
    assert cuda_header_version(include)[0] == nvrtc_version()[0]


@pytest.mark.parametrize("major, layout", [(13, "cu13/include"), (12, "cuda_runtime/include")])
def test_each_major_looks_in_its_own_wheel_layout(tmp_path, no_header_sources, major, layout):
    include = _make_headers(tmp_path / "nvidia" / layout, cudart_version=major * 1000 + 80)
    _make_headers(tmp_path / "nvidia" / ("cu12/include" if major == 13 else "cu13/include"))
    _wheels_at(no_header_sources, tmp_path / "nvidia")
    no_header_sources.setattr(nvrtc_mod, "nvrtc_version", lambda: (major, 8))
    assert find_cuda_include_dirs.__wrapped__() == (str(include),)


def test_headers_of_another_major_are_not_used(tmp_path, no_header_sources):
    _make_headers(tmp_path / "nvidia" / "cu13" / "include", cudart_version=12080)
    _wheels_at(no_header_sources, tmp_path / "nvidia")
    no_header_sources.setattr(nvrtc_mod, "nvrtc_version", lambda: (13, 0))
    with pytest.raises(CudaHeadersNotFound, match="looked in: .*cu13/include"):
        find_cuda_include_dirs.__wrapped__()


@pytest.mark.parametrize("major, requirement", [(13, "nvidia-cuda-runtime>=13,<14"),
                                                (12, "nvidia-cuda-runtime-cu12>=12,<13")])
def test_without_the_wheel_the_error_names_the_package_and_the_override(no_header_sources, major,
                                                                        requirement):
    no_header_sources.setattr(nvrtc_mod, "nvrtc_version", lambda: (major, 0))
    with pytest.raises(CudaHeadersNotFound) as info:
        find_cuda_include_dirs.__wrapped__()  # and /usr/local/cuda, if present, is not guessed
    message = str(info.value)
    assert requirement in message and "LAYERFORGE_CUDA_INCLUDE" in message
    assert isinstance(info.value, NVRTCError)


def test_the_override_comes_before_the_wheels(tmp_path, no_header_sources):
    _wheels_at(no_header_sources, _make_headers(tmp_path / "nvidia" / "cu13" / "include").parent.parent)
    mine = _make_headers(tmp_path / "mine", cudart_version=None)  # version unknown: trusted
    extra = tmp_path / "extra"
    no_header_sources.setenv(nvrtc_mod.INCLUDE_ENV, f"{mine}:{extra}")
    no_header_sources.setattr(nvrtc_mod, "nvrtc_version", lambda: (13, 0))
    assert find_cuda_include_dirs.__wrapped__() == (str(mine), str(extra))


@pytest.mark.parametrize("version, match", [(None, "holds no cuda_fp16.h"), (12040, "CUDA 12.x")])
def test_an_override_without_fitting_headers_is_an_error(tmp_path, no_header_sources, version, match):
    include = tmp_path / "inc"
    if version is None:
        include.mkdir()
    else:
        _make_headers(include, cudart_version=version)
    no_header_sources.setenv(nvrtc_mod.INCLUDE_ENV, str(include))
    no_header_sources.setattr(nvrtc_mod, "nvrtc_version", lambda: (13, 0))
    with pytest.raises(CudaHeadersNotFound, match=match):
        find_cuda_include_dirs.__wrapped__()


def test_cuda_home_is_a_fallback_after_the_wheels(tmp_path, no_header_sources):
    toolkit = _make_headers(tmp_path / "toolkit" / "include")
    no_header_sources.setenv("CUDA_HOME", str(toolkit.parent))
    no_header_sources.setattr(nvrtc_mod, "nvrtc_version", lambda: (13, 0))
    assert find_cuda_include_dirs.__wrapped__() == (str(toolkit),)
    wheel = _make_headers(tmp_path / "nvidia" / "cu13" / "include")
    _wheels_at(no_header_sources, tmp_path / "nvidia")
    assert find_cuda_include_dirs.__wrapped__() == (str(wheel),)


def test_header_version_is_read_from_cudart_version(tmp_path):
    assert cuda_header_version(_make_headers(tmp_path / "a", 13050)) == (13, 5)
    assert cuda_header_version(_make_headers(tmp_path / "b", 12090)) == (12, 9)
    assert cuda_header_version(_make_headers(tmp_path / "c", None)) == (None, None)


def test_the_loaded_nvrtc_library_is_named():
    path = nvrtc_library_path()
    assert path is not None and Path(path).name.startswith("libnvrtc.so")


def test_cli_where_prints_library_and_header_directories(tmp_path):
    run = subprocess.run([sys.executable, "-m", "layerforge.runtime.nvrtc", "--where"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    nvrtc_line, headers_line = run.stdout.splitlines()
    assert nvrtc_line.split()[:2] == ["nvrtc", ".".join(map(str, nvrtc_version()))]
    assert "libnvrtc.so" in nvrtc_line
    assert headers_line.split()[0] == "headers" and headers_line.endswith("include")


def test_nvrtc_version_is_a_pair_of_ints():
    major, minor = nvrtc_version()
    assert major >= 12 and minor >= 0


# -- compiling -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_bf16_kernel_compiles_to_cubin_without_spills(arch):
    compile_cuda(SAXPY, "saxpy", CompileOptions(arch))  # a repeat compile still reports
    result = compile_cuda(SAXPY, "saxpy", CompileOptions(arch))
    assert result.cubin[:4] == ELF_MAGIC
    assert result.ptx is None
    assert set(result.resources) == {"saxpy_f32", "saxpy_bf16"}
    for res in result.resources.values():
        assert 0 < res.registers <= 64
        assert not res.spills and res.stack_frame == 0 and res.shared_mem == 0
    assert f"for '{arch}'" in result.log
    assert result.name == "saxpy.cu"


def test_ptx_alone_is_compiled_for_the_virtual_arch():
    result = compile_cuda(SAXPY, "saxpy", CompileOptions("sm_90"), want_ptx=True, want_cubin=False)
    assert result.cubin is None
    assert ".target sm_90" in result.ptx
    assert ".visible .entry saxpy_bf16(" in result.ptx


def test_cubin_and_ptx_come_from_one_compile():
    result = compile_cuda(SAXPY, "saxpy", CompileOptions("sm_80"), want_ptx=True)
    assert result.cubin[:4] == ELF_MAGIC
    assert ".target sm_80" in result.ptx and "\0" not in result.ptx


def test_asking_for_nothing_is_an_error():
    with pytest.raises(ValueError):
        compile_cuda(SAXPY, "saxpy", CompileOptions("sm_90"), want_cubin=False)


def test_a_dynamically_indexed_array_shows_a_stack_frame():
    result = compile_cuda(LOCAL_ARRAY, "local_array", CompileOptions("sm_90"))
    assert result.resources["local_array"].stack_frame >= 256


def test_templated_kernels_resolve_to_mangled_names():
    result = compile_cuda(TEMPLATED, "fill", CompileOptions("sm_90"), name_expressions=("fill<7>",))
    mangled = result.lowered_names["fill<7>"]
    assert mangled == "_Z4fillILi7EEvPf"
    assert mangled in result.resources


def test_unsupported_arch_is_reported_before_compiling():
    with pytest.raises(NVRTCError, match="cannot target sm_20"):
        compile_cuda(SAXPY, "saxpy", CompileOptions("sm_20"))


def test_compile_error_carries_log_source_path_and_reproducer(tmp_path):
    source = 'extern "C" __global__ void broken(float* y) { y[0] = undefined_name; }\n'
    with pytest.raises(NVRTCError) as info:
        compile_cuda(source, "broken", CompileOptions("sm_80", max_registers=32))
    err = info.value
    assert 'identifier "undefined_name" is undefined' in err.log
    assert Path(err.source_path).read_text() == source
    assert err.source_path.endswith("broken.cu")
    assert "-m layerforge.runtime.nvrtc" in err.command
    assert "--arch sm_80" in err.command and "--max-registers 32" in err.command
    for part in (err.log.strip().splitlines()[0], err.source_path, err.command):
        assert part in str(err)
    # ... and the command really reproduces the failure
    run = subprocess.run(err.command, shell=True, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    assert "undefined_name" in run.stderr


def test_cli_writes_the_cubin(tmp_path):
    src = tmp_path / "saxpy.cu"
    src.write_text(SAXPY)
    out = tmp_path / "saxpy.cubin"
    run = subprocess.run([sys.executable, "-m", "layerforge.runtime.nvrtc", str(src), "--arch",
                          "sm_90", "--extra=-DUNUSED=1", "-o", str(out)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:4] == ELF_MAGIC
    assert "Used" in run.stderr and "-DUNUSED=1" in run.stderr


# -- ptxas report ----------------------------------------------------------------------------

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'smem' for 'sm_80'
ptxas info    : Function properties for smem
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 1.092 ms
ptxas info    : Compiling entry function 'spill' for 'sm_80'
ptxas info    : Function properties for spill
ptxas         .     1168 bytes stack frame, 1000 bytes spill stores, 1040 bytes spill loads
ptxas info    : Used 32 registers, 1168 bytes cumulative stack size, 372 bytes cmem[0]
"""


def test_ptxas_report_is_parsed_per_kernel():
    assert parse_ptxas_log(PTXAS_LOG) == {
        "smem": KernelResources(registers=10, shared_mem=4096),
        "spill": KernelResources(registers=32, spill_stores=1000, spill_loads=1040,
                                 stack_frame=1168),
    }
    assert parse_ptxas_log(PTXAS_LOG)["spill"].spills
    assert parse_ptxas_log("") == {}


# -- arch of the current device --------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_default_arch_without_gpu_asks_for_an_explicit_arch():
    with pytest.raises(RuntimeError, match="pass one explicitly"):
        default_arch()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_default_arch_is_the_current_devices():
    major, minor = torch.cuda.get_device_capability()
    assert default_arch() == f"sm_{major}{minor}"


def test_fetching_an_empty_log_leaves_python_constants_alone():
    """A PTX-only compile's log is empty (1 byte: its terminator). NVRTC writes into the buffer it
    is given; an immutable `b" " * 1` is CPython's shared one-byte object, whose space became a NUL
    for the rest of the process (later-rendered sources had NULs for spaces and failed to compile
    "at end of source"). The buffers are fresh bytearrays now."""
    result = compile_cuda(SAXPY, "saxpy", CompileOptions("sm_90"), want_ptx=True, want_cubin=False)
    assert result.log == "" or "\0" not in result.log
    assert b" " == bytes([32]) and b" " * 1 == bytes([32])
    from layerforge.codegen.dequant import plan_dequant
    plan = plan_dequant("bf16", wtype="i8", group=32, n=3000, k=1152, arch="sm_80")
    assert "\0" not in plan.source()
    compile_cuda(plan.source(), plan.kernel_name, CompileOptions("sm_80"))
