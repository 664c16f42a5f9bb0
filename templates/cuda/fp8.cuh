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

// Two e4m3 values (channel c in byte c of the low 16 bits of w) -> a pair of T, c0 in the low half.
template <typename T> __device__ __forceinline__ unsigned lf_e4m3x2_to(unsigned w);
template <> __device__ __forceinline__ unsigned lf_e4m3x2_to<__nv_bfloat16>(unsigned w) {
    // the bytes to the top of each 16-bit lane, then exponent and mantissa down by 4: x * 2^-120
    const unsigned t = __byte_perm(w, 0u, 0x1404);
    unsigned a = (t & 0x80008000u) | ((t >> 4) & 0x07f007f0u);
    const __nv_bfloat162 k = __halves2bfloat162(__ushort_as_bfloat16(0x7b80), __ushort_as_bfloat16(0x7b80));   // 2^120
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), k);
    return *reinterpret_cast<unsigned*>(&r);
}
template <> __device__ __forceinline__ unsigned lf_e4m3x2_to<__half>(unsigned w) {
    // the bytes to the top of each 16-bit lane, then exponent and mantissa down by 1: x * 2^-8
    const unsigned t = __byte_perm(w, 0u, 0x1404);
    unsigned a = (t & 0x80008000u) | ((t >> 1) & 0x3f803f80u);
    const __half2 k = __halves2half2(__ushort_as_half(0x5c00), __ushort_as_half(0x5c00));   // 2^8
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), k);
    return *reinterpret_cast<unsigned*>(&r);
}

// 8 e4m3 values (channel c in byte c of w) -> one 16-byte chunk of T.
template <typename T>
__device__ __forceinline__ void lf_e4m3x8_store(T* dst, const uint2 w) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(lf_e4m3x2_to<T>(w.x), lf_e4m3x2_to<T>(w.x >> 16),
                                                lf_e4m3x2_to<T>(w.y), lf_e4m3x2_to<T>(w.y >> 16));
}
