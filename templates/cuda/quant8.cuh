// layerforge 8-bit storage conversions of the row kernels (codegen/row.py): the casts to and from i8
// and f8e4m3 with dsl/evaluator.py op_cast's meaning. Included after common.cuh and fp8.cuh (whose
// lf_e4m3_to_float widens e4m3 exactly) into row kernels that use them.
//   i8:     a value is its integer (int); a cast from f32 rounds to nearest even, saturates at
//           [-128, 127]; NaN gives 0 (cvt.rni.sat.s8.f32's result).
//   f8e4m3: a value is its byte (torch.float8_e4m3fn's code); a cast from f32 clamps to +-448 and
//           rounds to nearest even (infinities saturate), NaN gives a NaN code; a cast to f32 is the
//           exact value (the NaN codes 0x7f / 0xff NaN).

__device__ __forceinline__ int lf_float_to_i8(float x) {
    return min(max(__float2int_rn(x), -128), 127);   // cvt.rni.s32.f32: NaN -> 0, +-inf -> INT_MAX / INT_MIN
}

// f32 -> e4m3 without fp8 hardware (sm_80), bit for bit what cvt.rn.satfinite.e4m3x2.f32 gives
// (tests/codegen/test_quant8_convert.py models it over every f32): |x| >= 448 (infinity included)
// saturates to 0x7e; below 2^-6 (e4m3's smallest normal) the subnormal steps of 2^-9 are
// round-half-even(|x| 2^9), exact in f32 and up to 8 (= 0x08, that smallest normal); otherwise the
// exponent is rebiased (f32's 127 to e4m3's 7) and the 20 low mantissa bits rounded off to nearest
// even, a carry moving into the exponent. NaN -> 0x7f.
__device__ __forceinline__ unsigned lf_float_to_e4m3_soft(float x) {
    const unsigned u = __float_as_uint(x);
    const unsigned s = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fu;
    if (a >= 0x43e00000u) return s | 0x7eu;                                       // 448
    if (a < 0x3c800000u) return s | __float2uint_rn(__uint_as_float(a) * 512.0f);   // below 2^-6
    const unsigned r = a - 0x3c000000u;                                             // exponent - 120
    return s | ((r + 0x7ffffu + ((r >> 20) & 1u)) >> 20);
}

__device__ __forceinline__ unsigned char lf_float_to_e4m3(float x) {
#if __CUDA_ARCH__ >= 890
    unsigned short p;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(p) : "f"(0.0f), "f"(x));   // x: the low byte
    return (unsigned char)p;
#else
    return (unsigned char)lf_float_to_e4m3_soft(x);
#endif
}

__device__ __forceinline__ float lf_e4m3_value(unsigned char x) {
    return (x & 0x7fu) == 0x7fu ? __uint_as_float(0x7fffffffu) : lf_e4m3_to_float(x);
}
