// layerforge fp8 helpers: e4m3 cache values widened exactly, with integer ops (the attention
// kernels over an fp8 KV cache include this after common.cuh; no cuda_fp8.h needed).
// An e4m3 byte s.eeee.mmm placed in a wider float's sign, low exponent bits and top mantissa
// bits is the same value times a power of two (2^-120 in f32 / bf16, 2^-8 in f16), subnormals
// included; one multiply by the inverse power of two restores it, exactly. The two NaN codes
// (0x7f, 0xff) read as +-480: the append kernel writes them only for NaN inputs.

__device__ __forceinline__ float lf_e4m3_to_float(unsigned char x) {
    const unsigned b = x;
    return __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * __uint_as_float(0x7b800000u);   // 2^120
}

// Two e4m3 values at the top of the 16-bit lanes of t (bits 8-15 and 24-31; the other bits are
// ignored) -> a pair of T: exponent and mantissa moved down into T's fields, then one multiply.
template <typename T> __device__ __forceinline__ unsigned lf_e4m3_top_to(unsigned t);
template <> __device__ __forceinline__ unsigned lf_e4m3_top_to<__nv_bfloat16>(unsigned t) {
    unsigned a = (t & 0x80008000u) | ((t >> 4) & 0x07f007f0u);   // x * 2^-120
    const __nv_bfloat162 k = __halves2bfloat162(__ushort_as_bfloat16(0x7b80), __ushort_as_bfloat16(0x7b80));   // 2^120
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), k);
    return *reinterpret_cast<unsigned*>(&r);
}
template <> __device__ __forceinline__ unsigned lf_e4m3_top_to<__half>(unsigned t) {
    unsigned a = (t & 0x80008000u) | ((t >> 1) & 0x3f803f80u);   // x * 2^-8
    const __half2 k = __halves2half2(__ushort_as_half(0x5c00), __ushort_as_half(0x5c00));   // 2^8
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), k);
    return *reinterpret_cast<unsigned*>(&r);
}
// Two e4m3 values in the low 16 bits of w (channel c in byte c) -> a pair of T, c0 in the low half.
template <typename T> __device__ __forceinline__ unsigned lf_e4m3x2_to(unsigned w) {
    return lf_e4m3_top_to<T>(__byte_perm(w, 0u, 0x1404));
}
// Bytes (0, 2) and (1, 3) of w -> pairs of T (byte 0 / byte 1 in the low half).
template <typename T> __device__ __forceinline__ unsigned lf_e4m3_even_to(unsigned w) { return lf_e4m3_top_to<T>(w << 8); }
template <typename T> __device__ __forceinline__ unsigned lf_e4m3_odd_to(unsigned w) { return lf_e4m3_top_to<T>(w); }

// The same placements without the multiply ("raw"): the pair is x * 2^-LF_E4M3_RAW_EXP<T> (2^-120 in bf16,
// 2^-8 in f16), e4m3 subnormals as T's subnormals; a kernel that folds the power of two into its scales
// saves the multiply (the tensor cores take subnormal operands).
template <typename T> struct lf_e4m3_raw_exp;
template <> struct lf_e4m3_raw_exp<__nv_bfloat16> { static constexpr int value = 120; };
template <> struct lf_e4m3_raw_exp<__half> { static constexpr int value = 8; };
template <typename T> __device__ __forceinline__ unsigned lf_e4m3_top_raw(unsigned t);
template <> __device__ __forceinline__ unsigned lf_e4m3_top_raw<__nv_bfloat16>(unsigned t) {
    return (t & 0x80008000u) | ((t >> 4) & 0x07f007f0u);
}
template <> __device__ __forceinline__ unsigned lf_e4m3_top_raw<__half>(unsigned t) {
    return (t & 0x80008000u) | ((t >> 1) & 0x3f803f80u);
}
template <typename T> __device__ __forceinline__ unsigned lf_e4m3x2_raw(unsigned w) {
    return lf_e4m3_top_raw<T>(__byte_perm(w, 0u, 0x1404));
}
template <typename T> __device__ __forceinline__ unsigned lf_e4m3_even_raw(unsigned w) { return lf_e4m3_top_raw<T>(w << 8); }
template <typename T> __device__ __forceinline__ unsigned lf_e4m3_odd_raw(unsigned w) { return lf_e4m3_top_raw<T>(w); }
