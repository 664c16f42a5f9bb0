// layerforge device helpers, included verbatim into every generated kernel.
// Only cuda_fp16.h / cuda_bf16.h are included, so NVRTC stays fast.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#define INT_MIN (-2147483647 - 1)
#define INT_MAX 2147483647

template <typename T, int N>
struct alignas(sizeof(T) * N) lf_vec { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ lf_vec<T, N> lf_load_vec(const T* p, bool ok) {
    lf_vec<T, N> r;
    if (ok) {
        r = *reinterpret_cast<const lf_vec<T, N>*>(p);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) r.v[i] = T(0);
    }
    return r;
}

template <typename T, int N>
__device__ __forceinline__ void lf_store_vec(T* p, const lf_vec<T, N> v) {
    *reinterpret_cast<lf_vec<T, N>*>(p) = v;
}

__device__ __forceinline__ float lf_round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float lf_round_f16(float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float lf_sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ float lf_silu(float x) { return x / (1.0f + __expf(-x)); }
__device__ __forceinline__ float lf_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float lf_gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float lf_fmod_floor(float a, float b) { return a - floorf(a / b) * b; }
template <typename I> __device__ __forceinline__ I lf_floordiv(I a, I b) {
    I q = a / b; return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}
template <typename I> __device__ __forceinline__ I lf_mod_floor(I a, I b) { I r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }

struct LfSum { template <typename T> __device__ static T f(T a, T b) { return a + b; } };
struct LfMax { template <typename T> __device__ static T f(T a, T b) { return a > b ? a : b; } };
struct LfMin { template <typename T> __device__ static T f(T a, T b) { return a < b ? a : b; } };

// Reduce v over the TPR threads of a row (threadIdx.x in [0, TPR)); every thread of the row
// gets the result. Past one warp, partials go through smem (lf_smem_f: RPB * TPR/32 floats).
// Every thread of the block must call it (it may hold barriers).
template <int TPR, typename T, typename Op>
__device__ __forceinline__ T lf_row_reduce(T v, float* smem) {
    constexpr int W = TPR < 32 ? TPR : 32;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) v = Op::f(v, __shfl_xor_sync(0xffffffffu, v, o, W));
    if constexpr (TPR > 32) {
        constexpr int NW = TPR / 32;
        T* s = reinterpret_cast<T*>(smem) + threadIdx.y * NW;
        __syncthreads();
        if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
        __syncthreads();
        v = s[0];
#pragma unroll
        for (int i = 1; i < NW; ++i) v = Op::f(v, s[i]);
    }
    return v;
}

// Arg-max over the row: largest value, ties to the lowest index.
template <int TPR>
__device__ __forceinline__ void lf_row_argmax(float& v, int& i, float* smem_f, int* smem_i) {
    constexpr int W = TPR < 32 ? TPR : 32;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o, W);
        int oi = __shfl_xor_sync(0xffffffffu, i, o, W);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if constexpr (TPR > 32) {
        constexpr int NW = TPR / 32;
        float* sf = smem_f + threadIdx.y * NW;
        int* si = smem_i + threadIdx.y * NW;
        __syncthreads();
        if ((threadIdx.x & 31) == 0) { sf[threadIdx.x >> 5] = v; si[threadIdx.x >> 5] = i; }
        __syncthreads();
        v = sf[0]; i = si[0];
#pragma unroll
        for (int w = 1; w < NW; ++w) if (sf[w] > v || (sf[w] == v && si[w] < i)) { v = sf[w]; i = si[w]; }
    }
}

// Top-k over a sub-warp (codegen/topk.py): one 64-bit key per candidate that orders like
// (value desc, index asc). High word: the value's bits made order-preserving as unsigned, NaN
// canonical and above +inf (torch.topk's order), -0.0 as +0.0 (it ties with +0.0). Low word:
// ~index. Key 0 is below every real key: "no candidate".
__device__ __forceinline__ unsigned long long lf_topk_key(float v, int c) {
    unsigned u = __float_as_uint(v);
    u = (u == 0x80000000u) ? 0u : u;
    const unsigned h = (v != v) ? 0xffffffffu : (u ^ ((unsigned)((int)u >> 31) | 0x80000000u));
    return ((unsigned long long)h << 32) | (unsigned)(~c);
}
__device__ __forceinline__ float lf_topk_value(unsigned long long k) {
    const unsigned h = (unsigned)(k >> 32);
    return __uint_as_float((h & 0x80000000u) ? (h ^ 0x80000000u) : ~h);
}
__device__ __forceinline__ int lf_topk_index(unsigned long long k) { return ~(int)(unsigned)k; }
// The largest key over the T lanes of a row (T <= 32, a power of two); every lane gets it.
template <int T>
__device__ __forceinline__ unsigned long long lf_topk_best(unsigned long long k) {
#pragma unroll
    for (int o = T / 2; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, k, o, T);
        k = other > k ? other : k;
    }
    return k;
}

__device__ __forceinline__ bool lf_chosen(const int* chosen, int t, int c) {
    for (int j = 0; j < t; ++j) if (chosen[j] == c) return true;
    return false;
}

__device__ __forceinline__ float lf_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float lf_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float lf_to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T lf_from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 lf_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half lf_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ float lf_from_float<float>(float x) { return x; }
