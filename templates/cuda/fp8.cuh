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

// Four e4m3 values (channel c in byte c of w) -> two pairs of T: (c0, c1) in .x, (c2, c3) in .y.
template <typename T> __device__ __forceinline__ uint2 lf_e4m3x4_to(unsigned w);
template <> __device__ __forceinline__ uint2 lf_e4m3x4_to<__nv_bfloat16>(unsigned w) {
    // bytes to the top of each 16-bit lane, then exponent and mantissa down by 4: x * 2^-120
    const unsigned lo = __byte_perm(w, 0u, 0x1404), hi = __byte_perm(w, 0u, 0x3424);
    unsigned a = (lo & 0x80008000u) | ((lo >> 4) & 0x07f007f0u);
    unsigned c = (hi & 0x80008000u) | ((hi >> 4) & 0x07f007f0u);
    const __nv_bfloat162 k = __halves2bfloat162(__ushort_as_bfloat16(0x7b80), __ushort_as_bfloat16(0x7b80));   // 2^120
    __nv_bfloat162 ra = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), k);
    __nv_bfloat162 rc = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&c), k);
    return make_uint2(*reinterpret_cast<unsigned*>(&ra), *reinterpret_cast<unsigned*>(&rc));
}
template <> __device__ __forceinline__ uint2 lf_e4m3x4_to<__half>(unsigned w) {
    // bytes to the top of each 16-bit lane, then exponent and mantissa down by 1: x * 2^-8
    const unsigned lo = __byte_perm(w, 0u, 0x1404), hi = __byte_perm(w, 0u, 0x3424);
    unsigned a = (lo & 0x80008000u) | ((lo >> 1) & 0x3f803f80u);
    unsigned c = (hi & 0x80008000u) | ((hi >> 1) & 0x3f803f80u);
    const __half2 k = __halves2half2(__ushort_as_half(0x5c00), __ushort_as_half(0x5c00));   // 2^8
    __half2 ra = __hmul2(*reinterpret_cast<__half2*>(&a), k);
    __half2 rc = __hmul2(*reinterpret_cast<__half2*>(&c), k);
    return make_uint2(*reinterpret_cast<unsigned*>(&ra), *reinterpret_cast<unsigned*>(&rc));
}

// 16 e4m3 values -> two 16-byte chunks of T (channels 0-7 at lo, 8-15 at hi).
template <typename T>
__device__ __forceinline__ void lf_e4m3x16_store(T* lo, T* hi, const uint4 w) {
    const uint2 a = lf_e4m3x4_to<T>(w.x), b = lf_e4m3x4_to<T>(w.y), c = lf_e4m3x4_to<T>(w.z), d = lf_e4m3x4_to<T>(w.w);
    *reinterpret_cast<uint4*>(lo) = make_uint4(a.x, a.y, b.x, b.y);
    *reinterpret_cast<uint4*>(hi) = make_uint4(c.x, c.y, d.x, d.y);
}
