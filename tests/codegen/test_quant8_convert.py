"""The row kernels' 8-bit conversions (templates/cuda/quant8.cuh) against torch, the reference
evaluator's op_cast, on the CPU: f32 -> e4m3 of the sm_80 path (lf_float_to_e4m3_soft; sm_89+ runs
cvt.rn.satfinite.e4m3x2.f32, whose meaning it copies) and f32 -> i8. A numpy model of the bit
algorithm is checked on a dense sample of every f32 exponent (and, marked slow, on all 2^31
non-negative f32: the sign is one OR); the helpers' own C text, compiled for the host with shims for
the CUDA intrinsics it calls, on the same sample. The reference: clamp to +-448, then torch's
float8_e4m3fn conversion (nearest even); NaN to a NaN code (the kernel's 0x7f)."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from layerforge.codegen.render import read_template


def e4m3_model(u: np.ndarray) -> np.ndarray:
    """lf_float_to_e4m3_soft on f32 bit patterns (uint32) -> e4m3 codes (uint8), step by step."""
    u = u.astype(np.uint32)
    s = (u >> 24) & 0x80
    a = u & 0x7fffffff
    small = np.minimum(a, 0x3c800000).view(np.float32)           # only used below 2^-6
    sub = np.rint(small * np.float32(512)).astype(np.uint32)      # exact product; rint: nearest even
    r = a - np.uint32(0x3c000000)                                 # wraps below 2^-6: not used there
    norm = (r + 0x7ffff + ((r >> 20) & 1)) >> 20
    out = np.where(a < 0x3c800000, sub, norm)
    out = np.where(a >= 0x43e00000, 0x7e, out) | s
    return np.where(a > 0x7f800000, 0x7f, out).astype(np.uint8)


def e4m3_reference(u: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(u.astype(np.uint32).view(np.float32))
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def dense_sample() -> np.ndarray:
    """Every sign, exponent and top-11 mantissa bits, with the low 12 bits at the rounding edges
    (e4m3 keeps 3 of 23 mantissa bits: ties sit at bit 19), plus 2^20 random patterns and the
    specials."""
    hi = np.arange(1 << 20, dtype=np.uint32) << 12
    lows = np.array([0, 1, 0x7ff, 0x800, 0x801, 0xfff], dtype=np.uint32)
    pos = (hi[:, None] | lows[None, :]).ravel()
    rng = np.random.default_rng(8)
    rand = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x7f800000, 0x7fc00000, 0x7f800001, 0x43e00000, 0x43dfffff, 0x43e7ffff, 0x43e80000,
                        0x3c800000, 0x3c7fffff, 0x3a800000, 0x3b000000, 0x3b400000], dtype=np.uint32)
    both = np.concatenate([pos, rand, special])
    return np.concatenate([both, both ^ np.uint32(0x80000000)])


def check_codes(u: np.ndarray, got: np.ndarray) -> None:
    ref = e4m3_reference(u)
    nan = np.isnan(u.view(np.float32))
    assert np.all((got[nan] & 0x7f) == 0x7f)   # a NaN code (0x7f / 0xff: torch keeps the sign)
    bad = np.nonzero(got[~nan] != ref[~nan])[0]
    assert bad.size == 0, [(hex(int(u[~nan][i])), hex(int(got[~nan][i])), hex(int(ref[~nan][i]))) for i in bad[:8]]


def test_e4m3_model_matches_torch_on_a_dense_sample():
    u = dense_sample()
    got = e4m3_model(u)
    check_codes(u, got)
    assert np.all(got[np.isnan(u.view(np.float32))] == 0x7f)


def test_e4m3_model_decodes_back_to_every_code():
    """Each finite code's exact value (+-0 included) comes back to the code."""
    codes = np.array([c for c in range(256) if c & 0x7f != 0x7f], dtype=np.uint8)
    vals = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(e4m3_model(vals.view(np.uint32)), codes)


@pytest.mark.slow
def test_e4m3_model_matches_torch_on_every_float():
    step = 1 << 24
    for start in range(0, 1 << 31, step):
        u = np.arange(start, start + step, dtype=np.uint32)
        check_codes(u, e4m3_model(u))


# ---- the helpers' C text, compiled for the host -------------------------------------------------------
SHIMS = r"""
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define __device__
#define __forceinline__ static inline
static unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
/* cvt.rni.u32.f32 / cvt.rni.s32.f32: nearest even (the default rounding mode), saturating, NaN -> 0 */
static unsigned __float2uint_rn(float f) { return f != f ? 0u : f <= 0.0f ? 0u : f >= 4294967296.0f ? UINT_MAX
                                                 : (unsigned)nearbyintf(f); }
static int __float2int_rn(float f) { return f != f ? 0 : f >= 2147483648.0f ? INT_MAX : f <= -2147483648.0f
                                            ? INT_MIN : (int)nearbyintf(f); }
static int min(int a, int b) { return a < b ? a : b; }
static int max(int a, int b) { return a > b ? a : b; }
"""
MAIN = r"""
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb"); FILE* out = fopen(argv[2], "wb");
    unsigned u;
    while (fread(&u, 4, 1, in) == 1) {
        unsigned char q[2];
        q[0] = (unsigned char)lf_float_to_e4m3_soft(__uint_as_float(u));
        q[1] = (unsigned char)(signed char)lf_float_to_i8(__uint_as_float(u));
        fwrite(q, 1, 2, out);
    }
    fclose(in); fclose(out);
    return 0;
}
"""


def helper_text(name: str) -> str:
    """One function of quant8.cuh, as written there."""
    src = read_template("cuda/quant8.cuh")
    m = re.search(r"^__device__ __forceinline__ \w+ " + name + r"\(.*?^}\n", src, re.S | re.M)
    assert m, name
    return m.group(0)


@pytest.fixture(scope="module")
def host_helpers(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no host C compiler (cc / gcc) to build quant8.cuh's helpers for the CPU")
    d = tmp_path_factory.mktemp("quant8")
    (d / "h.c").write_text(SHIMS + helper_text("lf_float_to_i8") + helper_text("lf_float_to_e4m3_soft") + MAIN)
    subprocess.run([cc, "-std=c99", "-O2", "-o", str(d / "h"), str(d / "h.c"), "-lm"], check=True)

    def run(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u.astype(np.uint32).tofile(d / "in.bin")
        subprocess.run([str(d / "h"), str(d / "in.bin"), str(d / "out.bin")], check=True)
        q = np.fromfile(d / "out.bin", dtype=np.uint8).reshape(-1, 2)
        return q[:, 0], q[:, 1].view(np.int8)
    return run


def test_e4m3_helper_text_matches_torch(host_helpers):
    u = dense_sample()
    got, _ = host_helpers(u)
    check_codes(u, got)
    assert np.array_equal(got, e4m3_model(u))


def test_i8_helper_text_rounds_half_even_and_saturates(host_helpers):
    """lf_float_to_i8 is op_cast's i8: torch.round (nearest even) clamped to [-128, 127]; NaN -> 0."""
    u = dense_sample()
    _, got = host_helpers(u)
    x = torch.from_numpy(u.view(np.float32))
    finite = ~torch.isnan(x)
    ref = torch.round(x[finite]).clamp(-128, 127).to(torch.int8).numpy()
    assert np.array_equal(got[finite.numpy()], ref)
    assert np.all(got[~finite.numpy()] == 0)
    ties = np.array([-128.5, -127.5, -2.5, -0.5, 0.5, 1.5, 2.5, 126.5, 127.5], dtype=np.float32)
    _, t = host_helpers(ties.view(np.uint32))
    assert t.tolist() == [-128, -128, -2, 0, 0, 2, 2, 126, 127]
