import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import layerforge.runtime.nvrtc as nvrtc_mod
from layerforge.runtime.nvrtc import (
    CompileOptions,
    KernelResources,
    NVRTCError,
    compile_cuda,
    default_arch,
    find_cuda_include_dirs,
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


def test_cuda_headers_are_found_in_an_installed_location():
    dirs = find_cuda_include_dirs()
    assert dirs, "cuda_fp16.h / cuda_bf16.h not found in the nvidia wheels or $CUDA_HOME"
    assert (Path(dirs[0]) / "cuda_bf16.h").is_file()


@pytest.mark.parametrize("layout", ["cu13/include", "cuda_runtime/include"])  # CUDA 13, 12 wheels
def test_cuda_headers_are_looked_up_in_the_nvidia_wheels_first(tmp_path, monkeypatch, layout):
    include = tmp_path / "nvidia" / layout
    include.mkdir(parents=True)
    for header in ("cuda_fp16.h", "cuda_bf16.h"):
        (include / header).touch()
    wheels = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "nvidia")])
    monkeypatch.setattr(nvrtc_mod.importlib.util, "find_spec", lambda name: wheels)
    assert find_cuda_include_dirs.__wrapped__() == (str(include),)


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
