"""2^x on the FMA pipe in the wgmma prefill (WGTileConfig.poly, `lf_ex2_poly`), no GPU needed: the function is cut
from the rendered kernel and run on the host (a C++ compiler) against 2^x in double precision over the range the
softmax gives it (x <= 8, the lazy rescaling's bound), with x < -126 and -inf giving 0 exactly as the SFU's ex2.ftz
does (a fully masked row's sum stays 0); the kernels with it compile without spills, and without it the source is
the kernel as it was."""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import subprocess

import pytest

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, default_options, plan_wgmma_attention, tile_candidates

from .test_attention_wgmma_compile import assert_spill_free, compile_main
from .test_attention_wgmma_overlap import check_groups

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
HOST = """#include <cmath>
#include <cstdio>
#include <cstring>
#define __device__
#define __forceinline__ inline
static float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
%s
int main() {
    float x;
    while (std::scanf("%%f", &x) == 1) std::printf("%%.9e\\n", lf_ex2_poly(x));
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def poly_plan(prog, d=64, poly=2, name="gpt2_attn"):
    layer = prog.specialise(name, Hq=16, Hkv=16, D=d, dtype="bf16")
    return plan_wgmma_attention(layer, tiles=dataclasses.replace(tile_candidates(d)[0], poly=poly))


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on this machine")
def test_poly_exp2_is_within_its_bound_and_zero_below_the_ftz_range(prog, tmp_path):
    src = poly_plan(prog).source()
    start = src.index("__device__ __forceinline__ float lf_ex2_poly(")
    (tmp_path / "p.cpp").write_text(HOST % src[start:src.index("\n}\n", start) + 3])
    subprocess.run([CXX, "-O1", "-o", str(tmp_path / "p"), str(tmp_path / "p.cpp")], check=True)
    rng = random.Random(0)
    xs = [8.0, 7.5, 0.5, 0.0, -0.0, -0.5, -0.49999997, -1.0, -125.0, -125.99, -126.0, -126.01, -127.0, -1e30]
    xs += [rng.uniform(-125.5, 8.0) for _ in range(20000)] + [rng.uniform(-3.0, 3.0) for _ in range(5000)]
    xs += [j + f for j in range(-125, 9) for f in (-0.5, -0.25, 0.0, 0.25, 0.4999)]
    text = "\n".join(f"{x:.9e}" for x in xs) + "\n-inf\n"
    out = subprocess.run([str(tmp_path / "p")], input=text, check=True, capture_output=True, text=True).stdout.split()
    got = [float(v) for v in out]
    assert len(got) == len(xs) + 1
    worst = 0.0
    for x, y in zip(xs, got):
        import struct
        xf = struct.unpack("f", struct.pack("f", x))[0]   # the float the program read
        if xf < -126.0:
            assert y == 0.0, (x, y)
        elif xf >= -125.0:
            worst = max(worst, abs(y / 2.0 ** xf - 1))
        else:
            assert 0.0 <= y < 2.0 ** -124, (x, y)   # the ftz edge: tiny and never negative
    assert got[-1] == 0.0   # -inf (a masked score): 0, not NaN
    assert worst < 1e-4, worst   # bf16's P rounds at 2^-9 = 2e-3
    assert not math.isnan(worst)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("poly", [2, 4])
def test_poly_kernels_compile_without_spills(prog, d, poly):
    plan = poly_plan(prog, d, poly, "llama_attn" if d == 128 else "gemma2_attn" if d == 256 else "gpt2_attn")
    assert f"x{poly}" in plan.key and f"nt < {poly} ? lf_ex2_poly(x0) : lf_ex2(x0)" in plan.source()
    assert_spill_free(compile_main(plan)[0])


def test_poly_off_is_the_kernel_as_it_was(prog, monkeypatch):
    """poly 0 (the default; LAYERFORGE_WGMMA_POLY_EXP unset): no lf_ex2_poly in the source, no x in the label; the
    switch's value reaches the planner through default_options, capped at the tile's key groups."""
    layer = prog.specialise("gpt2_attn", Hq=16, Hkv=16, D=64, dtype="bf16")
    plain = plan_wgmma_attention(layer, **default_options(layer))
    assert "lf_ex2_poly" not in plain.source() and plain.config.poly == 0
    monkeypatch.setenv("LAYERFORGE_WGMMA_POLY_EXP", "99")
    capped = plan_wgmma_attention(layer, **default_options(layer))
    assert capped.config.poly == capped.config.bn // 8
    with pytest.raises(ValueError, match="poly is key groups"):
        WGTileConfig(bn=64, stages=2, poly=9)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("chains", [4, 8])
def test_partial_row_max_and_sum_compile_without_spills(prog, d, chains):
    """WGTileConfig.chains: a row's max and sum over `chains` partial values, joined as a tree."""
    layer = prog.specialise("llama_attn" if d == 128 else "gpt2_attn", Hq=16, Hkv=16, D=d, dtype="bf16")
    plan = plan_wgmma_attention(layer, tiles=dataclasses.replace(tile_candidates(d)[0], chains=chains))
    src = plan.source()
    assert f"y{chains}" in plan.key and f"constexpr int CHAINS = {chains};" in src and "rsc[nt % CHAINS] +=" in src
    assert_spill_free(compile_main(plan)[0])


def test_one_chain_is_the_kernel_as_it_was(prog, monkeypatch):
    layer = prog.specialise("gpt2_attn", Hq=16, Hkv=16, D=64, dtype="bf16")
    plain = plan_wgmma_attention(layer, **default_options(layer))
    assert "CHAINS" not in plain.source() and plain.config.chains == 1
    monkeypatch.setenv("LAYERFORGE_WGMMA_CHAINS", "4")
    assert plan_wgmma_attention(layer, **default_options(layer)).config.chains == 4
    with pytest.raises(ValueError, match="chains is 1, 2, 4 or 8"):
        WGTileConfig(bn=64, stages=2, chains=3)


@pytest.mark.parametrize("name", ["gpt2_attn", "llama_attn", "gemma2_attn", "bert_attn"])
def test_late_pack_takes_the_overlap_schedule_in_three_consumers_registers(prog, name, monkeypatch):
    """At D64 (three consumers, whose two-buffer overlap schedule spills) the planner takes the overlap schedule with
    one P buffer (WGTileConfig.late_pack; the default), spill-free and with no wgmma serialised;
    LAYERFORGE_WGMMA_LATE_PACK=0, the plain schedule as before."""
    from layerforge.runtime.launch import compile_fn
    consts = {"window": 64} if name == "gemma2_attn" else {}
    layer = prog.specialise(name, Hq=16, Hkv=8, D=64, dtype="bf16", **consts)
    monkeypatch.setenv("LAYERFORGE_WGMMA_LATE_PACK", "0")
    plain = plan_wgmma_attention(layer, compile_fn=compile_fn(), **default_options(layer))
    assert not plain.config.late_pack and "LATE_PACK" not in plain.source()
    monkeypatch.delenv("LAYERFORGE_WGMMA_LATE_PACK")
    plan = plan_wgmma_attention(layer, compile_fn=compile_fn(), **default_options(layer))
    assert plan.config.consumers == 3 and plan.config.overlap and plan.config.late_pack, plan.config.label
    assert "tile(pa0, pa0);" in plan.source()
    kr, res = compile_main(plan)
    assert_spill_free(kr)
    check_groups(plan, res)   # the one-buffer turn's wait_group 1 leaves the P V running
    with pytest.raises(ValueError, match="late_pack is a form of the overlap schedule"):
        WGTileConfig(bn=128, stages=3, late_pack=True)
