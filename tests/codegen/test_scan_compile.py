"""The scan kernels (codegen/scan.py; runtime/scan.py) without a GPU: the plans' keys, ABIs and
refusals; the decode update's state split and the prefill's chunked schedule as data (the
schedule run on the CPU against the recurrence's definition, lengths on and off chunk
boundaries); every kernel variant compiling for sm_90a and sm_80 without spills; and each
kernel's generated source itself run on the host (f32 plans, compiled by g++ with CUDA's thread
model emulated: a std::thread a CUDA thread, __syncthreads and warp shuffles as barriers)
against runtime/scan.py's references, outputs NaN-filled first."""
import ctypes
import shutil
import subprocess

import pytest
import torch

from layerforge.codegen.scan import (CONV_TILE, MAX_STATE, SCAN_ITEMS, SCAN_THREADS, UPDATE_THREADS, SelectiveScanPlan,
                                     chunked_scan, plan_conv, plan_conv_update, plan_selective_scan, plan_state_update,
                                     scan_tiles, state_split)
from layerforge.codegen.render import read_template
from layerforge.dsl.recurrences import linear_recurrence
from layerforge.runtime import scan as ref

from ..seeding import seeded_generator


# ---- plans -----------------------------------------------------------------------------------
def test_keys_spell_out_the_specialisation():
    assert plan_conv(channels=5120, width=4, dtype="bf16", bias="bf16").key == \
        "scan_conv_d5120_k4_bf16_wbf16_bbf16_silu_sm90"
    assert plan_conv(channels=64, width=2, dtype="f16", weight_dtype="f32", silu=False, initial=True, final=True,
                     arch="sm_80").key == "scan_conv_d64_k2_f16_wf32_init_final_sm80"
    assert plan_conv_update(channels=64, width=3, dtype="bf16", state_dtype="f32").key == \
        "scan_conv_update_d64_k3_bf16_sf32_wbf16_silu_sm90"
    assert plan_selective_scan(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32", bias_dtype="f32",
                               gate=True, initial=True, final=True).key == \
        "selective_scan_d5120_n16_bf16_af32_skipf32_bf32_z_sp_init_final_sm90"
    assert plan_selective_scan(channels=8, state=4, dtype="f32", softplus=False, threads=32, items=4).key == \
        "selective_scan_d8_n4_f32_af32_t32x4_sm90"
    assert plan_state_update(channels=8, state=16, dtype="f16", gate=True).key == \
        "selective_state_update_d8_n16_f16_af16_z_sp_sm90"


def test_abis():
    conv = plan_conv(channels=64, width=4, dtype="bf16", bias="f32", initial=True, final=True).abi
    assert [(a.name, a.role) for a in conv.args] == [
        ("x", "input"), ("weight", "input"), ("bias", "input"), ("initial_state", "input"), ("y", "output"),
        ("final_state", "output"), ("batch", "dim"), ("length", "dim")]
    assert conv.arg("bias").ctype == "const float* __restrict__"
    assert conv.grid_for(128, CONV_TILE + 1) == (128, 2, 1)
    step = plan_conv_update(channels=64, width=4, dtype="f16", state_dtype="f32").abi
    assert [a.name for a in step.args] == ["x", "x_sb", "conv_state", "weight", "y", "batch"]
    assert step.arg("conv_state").ctype == "float* __restrict__" and step.grid_for(129) == (2, 1, 1)
    scan = plan_selective_scan(channels=64, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32", bias_dtype="f32",
                               gate=True, initial=True, final=True)
    assert [a.name for a in scan.abi.args] == ["u", "delta", "A", "Bm", "Cm", "Dskip", "z", "delta_bias",
                                               "initial_state", "y", "final_state", "batch", "length"]
    assert scan.abi.grid_for(640) == (640, 1, 1) and scan.abi.block == (128, 1, 1)
    assert scan.abi.shared_bytes == scan.shared.bytes == 2 * 2 * 4 * 4 + 2 * 16 * 4
    update = plan_state_update(channels=64, state=16, dtype="bf16", bias_dtype="f32")
    assert [a.name for a in update.abi.args] == ["state", "x", "dt", "A", "Bm", "Cm", "dt_bias", "y", "batch"]
    assert update.abi.grid_for(1000) == (-(-1000 // (UPDATE_THREADS // 4)), 1, 1) and update.vector_state
    assert not plan_state_update(channels=64, state=6, dtype="bf16").vector_state


@pytest.mark.parametrize("make,match", [
    (lambda: plan_conv(channels=64, width=5, dtype="bf16"), "width must be one of"),
    (lambda: plan_conv(channels=0, width=4, dtype="bf16"), "positive int"),
    (lambda: plan_conv(channels=64, width=4, dtype="f64"), "dtype must be one of"),
    (lambda: plan_conv(channels=64, width=4, dtype="bf16", weight_dtype="f16"), "f32 or the input dtype bf16"),
    (lambda: plan_conv(channels=64, width=4, dtype="bf16", silu=1), "silu must be a bool"),
    (lambda: plan_conv_update(channels=64, width=4, dtype="f16", state_dtype="bf16"), "state_dtype must be f32"),
    (lambda: plan_selective_scan(channels=64, state=MAX_STATE + 1, dtype="bf16"), "carry up to"),
    (lambda: plan_selective_scan(channels=64, state=16, dtype="bf16", threads=96), "power of two"),
    (lambda: plan_state_update(channels=64, state=16, dtype="bf16", arch="sm_61"), "sm_70"),
])
def test_plan_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_plans_are_values():
    assert plan_selective_scan(channels=8, state=4, dtype="f32") == SelectiveScanPlan(channels=8, state=4, dtype="f32")
    assert len({plan_conv(channels=8, width=4, dtype="f16"), plan_conv(channels=8, width=4, dtype="f16")}) == 1


# ---- the work splits, as data ----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 100, 128, 256])
def test_state_split_covers_the_states_within_a_warp(n):
    lanes, per = state_split(n)
    assert lanes & (lanes - 1) == 0 and lanes <= 32 and 32 % lanes == 0   # xor shuffles within a warp
    assert lanes * per >= n and (lanes == 1 or (lanes // 2) * per < n)    # the fewest lanes that hold N
    assert state_split(16) == (4, 4)                                      # Mamba's N: 4 lanes of float4


@pytest.mark.parametrize("length,items", [(0, 1), (1, 1), (128, 1), (129, 2), (300, 4), (1000, 8), (1024, 8),
                                          (8192, 8)])
def test_scan_tiles_cover_short_sequences_with_one_chunk(length, items):
    threads, got = scan_tiles(length)
    assert (threads, got) == (SCAN_THREADS, items) and got <= SCAN_ITEMS
    assert threads * got >= min(length, SCAN_THREADS * SCAN_ITEMS)


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 128, 129, 300])
def test_chunked_schedule_equals_the_recurrence(length):
    gen = seeded_generator("chunked_scan", length)
    a = torch.rand(3, length, generator=gen, dtype=torch.float64) * 1.2
    b = torch.randn(3, length, generator=gen, dtype=torch.float64)
    h0 = torch.randn(3, generator=gen, dtype=torch.float64)
    want, last = linear_recurrence(a, b, -1, h0)
    got, carry = chunked_scan(a, b, h0, threads=8, items=4)   # chunks of 32 steps
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(carry, last, rtol=1e-12, atol=1e-12)


# ---- compilation -----------------------------------------------------------------------------
nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

PLANS = [
    lambda arch: plan_conv(channels=5120, width=4, dtype="bf16", bias="bf16", initial=True, final=True, arch=arch),
    lambda arch: plan_conv(channels=5376, width=4, dtype="bf16", bias="bf16", initial=True, final=True,
                           channels_last=True, arch=arch),
    lambda arch: plan_conv(channels=5376, width=4, dtype="bf16", bias="bf16", channels_last=True, arch=arch),
    lambda arch: plan_conv(channels=96, width=2, dtype="f32", bias="f32", initial=True, final=True,
                           channels_last=True, arch=arch),
    lambda arch: plan_conv(channels=101, width=3, dtype="f16", weight_dtype="f32", initial=True, final=True,
                           channels_last=True, vector=False, arch=arch),
    lambda arch: plan_conv_update(channels=5120, width=3, dtype="f16", state_dtype="f32", weight_dtype="f32",
                                  silu=False, arch=arch),
    lambda arch: plan_selective_scan(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32",
                                     bias_dtype="f32", gate=True, initial=True, final=True, arch=arch),
    lambda arch: plan_selective_scan(channels=64, state=5, dtype="f32", softplus=False, items=2, arch=arch),
    lambda arch: plan_state_update(channels=5120, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32",
                                   bias_dtype="f32", gate=True, arch=arch),
    lambda arch: plan_state_update(channels=64, state=5, dtype="f16", arch=arch),
    lambda arch: plan_state_update(channels=5120, state=16, dtype="bf16", d_dtype="bf16", bias_dtype="bf16", gate=True,
                                   a_log=True, arch=arch),   # the mixer's decode step
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("make", PLANS, ids=lambda m: m("sm_90").key.removesuffix("_sm90"))
def test_kernel_compiles_without_spills(make, arch):
    plan = make(arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
    assert res.cubin[:4] == b"\x7fELF"
    kr = res.resources[plan.kernel_name]
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    assert kr.registers <= 128, (plan.key, kr)   # 128 threads a block: at least 4 blocks an SM
    if plan.family == "selective_state_update" and plan.vector_state:
        assert res.ptx.count("ld.global.v4.f32") == 1 and res.ptx.count("st.global.v4.f32") == 1, plan.key


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("items", [1, 2, 4, 8])   # every tiling scan_tiles picks
@pytest.mark.parametrize("channels", [64, 5120])
def test_every_scan_tiling_compiles_without_spills(items, arch, channels):
    # every option on: the tilings of 256 and 512 steps spilled 12 bytes on sm_90 around the IEEE
    # division of silu(z) (a subroutine call) and the 64-bit division of the row by D, before the
    # gate took __fdividef and the row a 32-bit division; at 2 items ptxas's own register choice
    # spilled until the kernel declared a blocks-per-SM budget (SCAN_MIN_BLOCKS)
    plan = plan_selective_scan(channels=channels, state=16, dtype="bf16", a_dtype="f32", d_dtype="f32",
                               bias_dtype="f32", gate=True, initial=True, final=True, items=items, arch=arch)
    kr = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch)).resources[plan.kernel_name]
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    assert kr.registers <= 128, (plan.key, kr)


# ---- the generated sources run on the host --------------------------------------------------------
HOST_SHIM = r'''
#include <cmath>
#include <cstring>
#include <thread>
#include <barrier>
#include <vector>
#include <functional>
#include <algorithm>
using std::min;
struct lf_dim3 { unsigned x = 0, y = 0, z = 0; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
thread_local lf_dim3 threadIdx, blockIdx;
thread_local unsigned char* lf_host_smem;
thread_local std::barrier<>* lf_block_barrier;
thread_local std::barrier<>* lf_warp_barrier;
thread_local float* lf_warp_buf;
#define __global__
#define __launch_bounds__(...)
#define __restrict__
#define __device__
#define __forceinline__ inline
#define __align__(x)
#define __expf expf
static inline float __fdividef(float a, float b) { return a / b; }
static inline void __syncthreads() { lf_block_barrier->arrive_and_wait(); }
static inline float lf_exchange(float v, int src) {
    int lane = threadIdx.x & 31;
    lf_warp_buf[lane] = v;
    lf_warp_barrier->arrive_and_wait();
    float r = lf_warp_buf[src];
    lf_warp_barrier->arrive_and_wait();
    return r;
}
static inline float __shfl_up_sync(unsigned, float v, int off) {
    int lane = threadIdx.x & 31;
    return lf_exchange(v, lane >= off ? lane - off : lane);
}
static inline float __shfl_xor_sync(unsigned, float v, int off) { return lf_exchange(v, (threadIdx.x & 31) ^ off); }
static inline float lf_to_float(float x) { return x; }
template <typename T> static inline T lf_from_float(float x);
template <> inline float lf_from_float<float>(float x) { return x; }
static inline float lf_silu(float x) { return x / (1.0f + expf(-x)); }
static void lf_run_grid(unsigned gx, unsigned gy, unsigned threads, size_t smem, const std::function<void()>& body) {
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::vector<unsigned char> shared(smem + 16);
            std::barrier<> block(threads);
            std::vector<std::barrier<>*> warps;
            for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(new std::barrier<>(32));
            std::vector<float> bufs(((threads + 31) / 32) * 32);
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < threads; ++t)
                ts.emplace_back([&, t] {
                    threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by;
                    lf_host_smem = shared.data(); lf_block_barrier = &block;
                    lf_warp_barrier = warps[t / 32]; lf_warp_buf = bufs.data() + (t / 32) * 32;
                    body();
                });
            for (auto& th : ts) th.join();
            for (auto* w : warps) delete w;
        }
}
'''


_HOST_CTYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong, "f32": ctypes.c_float}


def host_kernels(plans, directory):
    """The plans' kernels (f32 plans: no half types on the host) built by one g++ run around
    HOST_SHIM in place of common.cuh; {key: launch(problem, args)}, each running the grid its ABI
    computes, block by block."""
    common = read_template("cuda/common.cuh")
    src, launches = HOST_SHIM, {}
    for i, plan in enumerate(plans):
        abi = plan.abi
        body = plan.source().replace(common, "")
        body = body.replace("extern __shared__ __align__(16) unsigned char lf_smem[];",
                            "unsigned char* lf_smem = lf_host_smem;")
        src += body + (f'\nextern "C" void lf_host_launch{i}(unsigned gx, unsigned gy, unsigned threads, unsigned long smem, '
                       f'{abi.signature}) {{\n    lf_run_grid(gx, gy, threads, smem, [&] {{ '
                       f'{abi.name}({", ".join(a.name for a in abi.args)}); }});\n}}\n')
    cpp, so = directory / "scan_host.cpp", directory / "scan_host.so"
    cpp.write_text(src)
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(so), str(cpp)], check=True)
    lib = ctypes.CDLL(str(so))
    for i, plan in enumerate(plans):
        abi = plan.abi
        fn = getattr(lib, f"lf_host_launch{i}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong] + [_HOST_CTYPES[t] for t in
                                                                                      abi.launch_types]

        def launch(problem, args, fn=fn, abi=abi):
            gx, gy, _ = abi.grid_for(*problem)
            fn(gx, gy, abi.block[0], abi.shared_bytes, *(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))
        launches[plan.key] = launch
    return launches


HOST_PLANS = {
    "scan": plan_selective_scan(channels=3, state=4, dtype="f32", a_dtype="f32", d_dtype="f32", bias_dtype="f32",
                                gate=True, initial=True, final=True, threads=64, items=4),
    "conv": plan_conv(channels=3, width=4, dtype="f32", bias="f32", initial=True, final=True),
    "conv_update": plan_conv_update(channels=3, width=4, dtype="f32", bias="f32"),   # rows as float4-sized vectors
    "conv_update_e": plan_conv_update(channels=3, width=4, dtype="f32", bias="f32", vector=False),
    "conv_cl": plan_conv(channels=136, width=4, dtype="f32", bias="f32", initial=True, final=True, channels_last=True),
    "conv_cl1": plan_conv(channels=5, width=3, dtype="f32", initial=True, final=True, channels_last=True,
                          vector=False),
    "update16": plan_state_update(channels=37, state=16, dtype="f32", d_dtype="f32", bias_dtype="f32", gate=True),
    "update5": plan_state_update(channels=37, state=5, dtype="f32", d_dtype="f32", bias_dtype="f32", gate=True),
    "update16_alog": plan_state_update(channels=37, state=16, dtype="f32", d_dtype="f32", bias_dtype="f32", gate=True,
                                       a_log=True),
}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    built = host_kernels(list(HOST_PLANS.values()), tmp_path_factory.mktemp("scan_host"))
    return {name: built[plan.key] for name, plan in HOST_PLANS.items()}


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the host emulation")


def nans(*shape):
    return torch.full(shape, float("nan"))


@needs_gxx
def test_selective_scan_source_on_the_host(host):
    """Two warps of 4 steps: chunks of 256, a sequence of 600 ends mid-chunk; states in and out."""
    b, d, n, length = 2, 3, 4, 600
    gen = seeded_generator("host_scan")
    u, z, B, C = (torch.randn(*s, generator=gen) for s in ((b, d, length), (b, d, length), (b, n, length), (b, n, length)))
    delta = torch.randn(b, d, length, generator=gen) * 0.5 - 1.0
    A = -torch.exp(torch.rand(d, n, generator=gen) * 3.0 - 5.0)   # slow decay: the carry between chunks shows
    D, bias, h0 = torch.randn(d, generator=gen), torch.randn(d, generator=gen) * 0.1, torch.randn(b, d, n, generator=gen)
    y, h = nans(b, d, length), nans(b, d, n)
    host["scan"]((b * d,), [u, delta, A, B, C, D, z, bias, h0, y, h, b, length])
    want_y, want_h = ref.selective_scan_reference(u, delta, A, B, C, D, z, bias, initial_state=h0, return_final_state=True)
    torch.testing.assert_close(y.double(), want_y.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), want_h.double(), rtol=1e-5, atol=1e-5)


@needs_gxx
def test_conv_sources_on_the_host(host):
    b, d, k = 2, 3, 4
    gen = seeded_generator("host_conv")
    prefill = host["conv"]
    w, cb = torch.randn(d, k, generator=gen), torch.randn(d, generator=gen)
    for length in (2, 700):   # shorter than the state (the final state keeps initial inputs), two tiles
        x, s0 = torch.randn(b, d, length, generator=gen), torch.randn(b, d, k - 1, generator=gen)
        y, s = nans(b, d, length), nans(b, d, k - 1)
        prefill((b * d, length), [x, w, cb, s0, y, s, b, length])
        want_y, want_s = ref.causal_conv1d_reference(x, w, cb, initial_state=s0, return_final_state=True)
        torch.testing.assert_close(y.double(), want_y.double(), rtol=1e-6, atol=1e-6)
        assert torch.equal(s, want_s)
    for name in ("conv_update", "conv_update_e"):   # rows as vectors, and element by element
        step = host[name]
        wide, state = torch.randn(b, d + 5, generator=gen), torch.randn(b, d, k, generator=gen)
        x = wide[:, 2:2 + d]                     # a column slice: rows d + 5 apart, read in place
        want_state, y = state.clone(), nans(b, d)
        step((b * d,), [x, x.stride(0), state, w, cb, y, b])
        want = ref.causal_conv1d_update_reference(x, want_state, w, cb)
        torch.testing.assert_close(y.double(), want.double(), rtol=1e-6, atol=1e-6)
        assert torch.equal(state, want_state)


@needs_gxx
@pytest.mark.parametrize("name,d,k", [("conv_cl", 136, 4), ("conv_cl1", 5, 3)])
def test_channels_last_conv_source_on_the_host(host, name, d, k):
    """x [B, L, D] a column slice of a wider row (read in place through its strides); float4
    vectors of 4 channels (136: two channel blocks, the second part-full) and single channels;
    lengths shorter than the state, one tile, several tiles ending mid-tile."""
    b = 2
    gen = seeded_generator("host_conv_cl", name)
    w = torch.randn(d, k, generator=gen)
    cb = torch.randn(d, generator=gen) if name == "conv_cl" else None
    for length in (2, 64, 150):
        wide = torch.randn(b, length, d + 12, generator=gen)
        x = wide[..., 4:4 + d]                                # 16-byte aligned start, row stride d + 12
        s0 = torch.randn(b, d, k - 1, generator=gen)
        y, s = nans(b, length, d), nans(b, d, k - 1)
        host[name]((b, length), [x, w, *([cb] if cb is not None else []), s0, y, s, b, length, x.stride(0), x.stride(1)])
        want_y, want_s = ref.causal_conv1d_reference(x.transpose(1, 2), w, cb, initial_state=s0, return_final_state=True)
        torch.testing.assert_close(y.double(), want_y.transpose(1, 2).double(), rtol=1e-6, atol=1e-6)
        assert torch.equal(s, want_s)


@needs_gxx
@pytest.mark.parametrize("n", [16, 5])   # float4 lanes; scalar lanes with idle ones
def test_state_update_source_on_the_host(host, n):
    b, d = 3, 37   # 111 rows: the last block's rows run past the end
    gen = seeded_generator("host_update", n)
    x, dt, z = (torch.randn(b, d, generator=gen) for _ in range(3))
    A, B, C = -torch.rand(d, n, generator=gen), torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen)
    D, bias, state = torch.randn(d, generator=gen), torch.randn(d, generator=gen), torch.randn(b, d, n, generator=gen)
    want_state, y = state.clone(), nans(b, d)
    host[f"update{n}"]((b * d,), [state, x, dt, A, B, C, D, z, bias, y, b])
    want = ref.selective_state_update_reference(want_state, x, dt, A, B, C, D, z, bias)
    torch.testing.assert_close(y.double(), want.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


@needs_gxx
def test_state_update_with_a_log_on_the_host(host):
    """A given as A_log: the kernel's A = -exp(A_log) equals the reference's on the same A_log."""
    b, d, n = 3, 37, 16
    gen = seeded_generator("host_update_alog")
    x, dt, z = (torch.randn(b, d, generator=gen) for _ in range(3))
    a_log, B, C = torch.randn(d, n, generator=gen), torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen)
    D, bias, state = torch.randn(d, generator=gen), torch.randn(d, generator=gen), torch.randn(b, d, n, generator=gen)
    want_state, y = state.clone(), nans(b, d)
    host["update16_alog"]((b * d,), [state, x, dt, a_log, B, C, D, z, bias, y, b])
    want = ref.selective_state_update_reference(want_state, x, dt, a_log, B, C, D, z, bias, a_log=True)
    torch.testing.assert_close(y.double(), want.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
