// Helpers shared by the kernels: dtype dispatch, conversions, 128-bit vectors, error reporting.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "kogpt_cuda.h"

namespace kogpt {

// Records the message returned by kogpt_last_error() and passes the code through (runtime.cu).
int fail(int code, const char* fmt, ...);

// After a launch: a launch error (bad configuration, no device, ...) becomes KOGPT_ERR_CUDA.
inline int check_launch(const char* kernel) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        return fail(KOGPT_ERR_CUDA, "%s: %s (%s)", kernel, cudaGetErrorString(err), cudaGetErrorName(err));
    }
    return KOGPT_OK;
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T and back: the value torch holds after an op in dtype T.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float<T>(from_float<T>(x)); }

// N elements of T read or written as one 16-byte access (or as scalars when N * sizeof(T) != 16).
template <typename T, int N> struct alignas(N * sizeof(T) >= 16 ? 16 : alignof(T)) Vec {
    T v[N];
};

template <typename T, int N> __device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
    Vec<T, N> vec = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float<T>(vec.v[i]);
}

template <typename T, int N> __device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
    Vec<T, N> vec;
#pragma unroll
    for (int i = 0; i < N; ++i) vec.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Vec<T, N>*>(p) = vec;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls f(T{}) with T the element type of a KOGPT_DTYPE_* code; returns KOGPT_ERR_UNSUPPORTED for others.
template <typename F> int dispatch_dtype(int dtype, const char* op, F&& f) {
    switch (dtype) {
        case KOGPT_DTYPE_FLOAT32: return f(float{});
        case KOGPT_DTYPE_FLOAT16: return f(__half{});
        case KOGPT_DTYPE_BFLOAT16: return f(__nv_bfloat16{});
        default: return fail(KOGPT_ERR_UNSUPPORTED, "%s: unknown dtype code %d", op, dtype);
    }
}

inline size_t dtype_size(int dtype) { return dtype == KOGPT_DTYPE_FLOAT32 ? 4 : 2; }

}  // namespace kogpt
