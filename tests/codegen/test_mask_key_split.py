"""A mask's key terms split over the wgmma kernel's key tile (ScalarEmitter.key_split, `lf_mask_kt`) and |x| against
a constant as one unsigned compare (ScalarEmitter._abs_compare), no GPU needed: the hook functions are cut from the
rendered kernel source and run on the host (a C++ compiler), and every bit they give is checked against the reference
evaluator's own mask over query positions, tile starts (multiples of the tile) and every key of a tile. Masks without
a key term to split keep their kernel as it was (no lf_mask_kt)."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_wgmma import plan_wgmma_attention

from .test_mask_tiles import exact_grid

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

MASKS = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention natten32(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const G: int = 32) -> T[B, S, Hq, D] {
    mask = abs(q_pos // G - kv_pos // G) <= 2 and abs(q_pos % G - kv_pos % G) <= 2
}
attention natten64(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], const G: int = 64) -> T[B, S, Hq, D] {
    mask = abs(q_pos // G - kv_pos // G) <= 3 and abs(q_pos % G - kv_pos % G) <= 3
}
attention natten128(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = abs(q_pos // 128 - kv_pos // 128) < 2 and abs(q_pos % 128 - kv_pos % 128) < 5
}
attention strided(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos % 16 < 4 or (kv_pos // 8) % 3 == q_pos % 3 or kv_pos // 256 == q_pos // 256
}
attention outside(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = abs(q_pos - kv_pos) > 40 and 90 >= abs(kv_pos % 64 - q_pos % 64) and abs(q_pos - kv_pos) >= 3
}
attention never(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = abs(kv_pos // 4 - q_pos) < 0 or abs(kv_pos // 4 - q_pos) <= 1
}
attention dilated(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and q_pos - kv_pos < 128 and (q_pos - kv_pos) % 2 == 0
}
attention causal(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos
}
"""
SPLIT = ("natten32", "natten64", "natten128", "strided", "outside", "never")

HOST = """#include <cmath>
#include <cstdio>
#include <cstdlib>
#define __device__
#define __forceinline__ inline
%(FUNCS)s
int main() {
    for (int q = 0; q < %(Q)d; ++q)
        for (int t = 0; t < %(TILES)d; ++t)
            for (int o = 0; o < %(BN)d; ++o) {
                const int k = t * %(BN)d + o;
                std::putchar('0' + lf_mask(0.0f, 0, 0, 0, q, k));
                std::putchar('0' + %(KT)s);
            }
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.loads(MASKS, "masks.lf", with_stdlib=False)


def hook(src: str, name: str) -> str:
    start = src.index(f"__device__ __forceinline__ bool {name}(")
    return src[start:src.index("\n}\n", start) + 3]


def plan_of(prog, name):
    return plan_wgmma_attention(prog.specialise(name, Hq=4, Hkv=2, D=64, dtype="bf16"))


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("name", SPLIT)
def test_split_mask_matches_the_reference_at_every_key_of_a_tile(prog, name, tmp_path):
    plan = plan_of(prog, name)
    src, bn = plan.source(), plan.config.bn
    assert "lf_mask_kt(sv * scale" in src, name   # the kernel calls it
    q_len, tiles = 300, 5
    floors = src[src.index("template <typename I> __device__ __forceinline__ I lf_floordiv("):]
    floors = floors[:floors.index("\n", floors.index("I lf_mod_floor(")) + 1]   # the floor helpers, as rendered
    funcs = floors + hook(src, "lf_mask") + hook(src, "lf_mask_kt")
    kt = "lf_mask_kt(0.0f, 0, 0, 0, q, t * %d, o)" % bn
    (tmp_path / "m.cpp").write_text(HOST % dict(FUNCS=funcs, Q=q_len, TILES=tiles, BN=bn, KT=kt))
    subprocess.run([CXX, "-O1", "-fwrapv", "-o", str(tmp_path / "m"), str(tmp_path / "m.cpp")], check=True)
    out = subprocess.run([str(tmp_path / "m")], check=True, capture_output=True, text=True).stdout
    bits = torch.tensor([c == "1" for c in out]).view(q_len, tiles * bn, 2)
    grid, _, _ = exact_grid(prog.specialise(name, Hq=4, Hkv=2, D=64, dtype="bf16"), q_len, tiles * bn, {}, batch=1)
    want = grid[0, 0]
    assert 0 < int(want.sum()) < want.numel(), name   # a mask with both sides: the check can fail
    assert torch.equal(bits[..., 0], want), f"{name}: lf_mask"
    assert torch.equal(bits[..., 1], want), f"{name}: lf_mask_kt"


@pytest.mark.parametrize("name", ["natten64", "strided"])
def test_split_terms_fold_per_key(prog, name):
    """kv_pos // 2^j and % 2^j read the tile start and the key's offset in it; |x| <= c is an unsigned compare."""
    kt = hook(plan_of(prog, name).source(), "lf_mask_kt")
    assert "(kv_tile + kv_off)" not in kt.split("{", 1)[1] or name == "strided", kt
    assert "((int)(kv_off) & (int)(" in kt and "((int)(kv_tile) >> " in kt, kt
    if name == "natten64":
        assert "(unsigned)(" in kt and "+ 3u <= 6u" in kt, kt


def test_no_split_where_the_mask_has_no_key_term_to_split(prog):
    """Causal and a dilated window ((q_pos - kv_pos) % 2: kv_pos is not divided itself) keep lf_mask as it was."""
    for name in ("causal", "dilated"):
        src = plan_of(prog, name).source()
        assert "lf_mask_kt" not in src, name


def test_abs_against_a_constant_is_one_unsigned_compare():
    """|x| <= c iff (unsigned)x + c <= 2c modulo 2^32, for every int x (INT_MIN's |x| = 2^31 too) and c >= 0."""
    xs = [0, 1, -1, 2, -2, 3, -3, 4, -4, 2 ** 31 - 1, -2 ** 31, -2 ** 31 + 1, 2 ** 30, -2 ** 30, 12345, -12345]
    for c in [0, 1, 3, 40, 2 ** 31 - 2, 2 ** 31 - 1]:
        for x in xs:
            assert (abs(x) <= c) == (((x % 2 ** 32) + c) % 2 ** 32 <= 2 * c), (x, c)


def test_the_switch_keeps_the_kernel_as_it_was(prog, monkeypatch):
    """key_split=False (LAYERFORGE_WGMMA_KEY_SPLIT=0, through default_options): no lf_mask_kt, a key of its own."""
    from layerforge.codegen.attention_wgmma import default_options
    layer = prog.specialise("natten64", Hq=4, Hkv=2, D=64, dtype="bf16")
    on, off = plan_wgmma_attention(layer), plan_wgmma_attention(layer, key_split=False)
    assert "lf_mask_kt" in on.source() and "lf_mask_kt" not in off.source() and on.key != off.key
    assert "nosplit" in off.key and "nosplit" not in on.key
    monkeypatch.setenv("LAYERFORGE_WGMMA_KEY_SPLIT", "0")
    assert default_options(layer)["key_split"] is False
    monkeypatch.delenv("LAYERFORGE_WGMMA_KEY_SPLIT")
    assert default_options(layer)["key_split"] is True


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_mma_sync_kernels_split_over_a_warps_key_slice(prog, arch):
    """attention_tc splits over a warp's key slice (k0 + kw0, a multiple of the slice's lowest power of two): the
    sm_80 prefill's 64-key slices take NATTEN-64's terms; 16- or 32-key slices (decode, sm_90's k32 prefill) are too
    narrow for G = 64 and keep lf_mask, G = 16's terms split there. All compile without spills."""
    from layerforge.codegen.attention_tc import plan_tc_attention
    from layerforge.runtime import nvrtc
    for name, mode in (("natten64", "prefill"), ("natten64", "decode"), ("strided", "decode")):
        plan = plan_tc_attention(prog.specialise(name, Hq=8, Hkv=2, D=128, dtype="bf16"), arch, mode=mode)
        kw = plan.config.ksub or plan.config.bnw
        split = "lf_mask_kt(s[mt][nt]" in plan.source()
        assert split == (name == "strided" or kw % 64 == 0), (name, mode, plan.config.label)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
        assert res.resources[plan.kernel_name].spill_stores == 0
