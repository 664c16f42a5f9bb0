"""Small CUDA sources shared by the runtime tests."""

# out = a * x + y, in f32 and bf16 (f32 arithmetic); out-of-place so outputs can be poisoned.
SAXPY = r"""
#include <cuda_bf16.h>

extern "C" __global__ void saxpy_f32(float* __restrict__ out, const float* __restrict__ x,
                                     const float* __restrict__ y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i] + y[i];
}

extern "C" __global__ void saxpy_bf16(__nv_bfloat16* __restrict__ out,
                                      const __nv_bfloat16* __restrict__ x,
                                      const __nv_bfloat16* __restrict__ y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(a * __bfloat162float(x[i]) + __bfloat162float(y[i]));
}
"""
SAXPY_ARGS = ("ptr", "ptr", "ptr", "f32", "i32")

# Each block reverses its `n` floats through dynamic shared memory (n * 4 bytes of it).
REVERSE_IN_SMEM = r"""
extern "C" __global__ void reverse_blocks(float* __restrict__ out, const float* __restrict__ in,
                                          int n) {
    extern __shared__ float buf[];
    const float* src = in + (long long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = src[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(long long)blockIdx.x * n + i] = buf[n - 1 - i];
}
"""

# A dynamically indexed local array cannot live in registers: it needs a stack frame.
LOCAL_ARRAY = r"""
extern "C" __global__ void local_array(float* y, const float* x, int k) {
    float a[64];
    for (int j = 0; j < 64; ++j) a[j] = x[threadIdx.x * 64 + j] * j;
    float s = 0.f;
    for (int j = 0; j < 64; ++j) s += a[(j * 7 + k) & 63] * a[j];
    y[threadIdx.x] = s;
}
"""

TEMPLATED = r"""
template <int N> __global__ void fill(float* y) { y[threadIdx.x] = N; }
"""
