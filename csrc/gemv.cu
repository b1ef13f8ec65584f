// Decode GEMV / skinny GEMM: out[M, N] = act(x[M, K] @ weight[N, K]^T + bias) + residual, M = 1..16.
// x may come in two pieces read in place, x = [x1 | x2] (columns 0..K1-1 and K1..K-1), so that GPT-J's
// [attention | gelu(fc_in)] needs no concatenation before out_proj + fc_out.
// The activation applies to the columns n >= gelu_start only (kogpt_gemv: gelu_start = 0, every column), so GPT-J's
// q | k | v | gelu(fc_in) come from one GEMV over the concatenated weights (gelu_start = 3 * n_embd), and
// out_proj + fc_out from one over K = n_embd + n_inner with the residual epilogue.
//
// Memory-bound design: at decode the weight is read once per step and dominates the traffic, so each warp
// streams kRows weight rows with 16-byte loads (kUnroll of them per row in flight), reuses each weight vector
// for all M rows of x (x stays in L1/L2), accumulates in fp32, reduces across the warp with shuffles and applies
// the epilogue in registers. No shared memory and no block-wide barrier (except in the LayerNorm prologue below):
// a CTA is 8 independent warps.
// Split-K is not used: KoGPT's smallest weight (4096 x 4096) already gives 2048 warps of 8-16 KB each.
//
// LayerNorm prologue (kogpt_gemv_ln_split_gelu, M <= 2): the GEMV's input is layer_norm(x). The CTA computes each
// row's mean and rstd (the mean, then the mean of squared deviations, in fp32: kernels/layer_norm.py's formula,
// not its bits, since the sums run in another order and rstd is rsqrtf: h may differ from it by an ulp of T)
// with one barrier-separated reduction, and every warp normalises the x vectors it loads, rounded to T as a
// LayerNorm kernel would write them. It spares the decode step the LayerNorm launch before GPT-J's first GEMV.
//
// Quantized weights (kogpt_gemv_quantized: int8 or fp8 E4M3 data [N, K] with one scale per row, in the activation
// dtype): the same kernel with W = int8_t / __nv_fp8_e4m3, 16 weights per 16-byte load instead of 8, decoded to fp32
// exactly in registers (weight_floats), and the row's scale applied to the fp32 sum before the epilogue:
// out = epilogue(scale[n] * sum_k w[n, k] * x[m, k]). int8 is decoded without int-to-float conversions (they run at
// a quarter of the FMA rate on sm_80/90, about the rate an H200 streams int8 weights at): the bytes become fp16 by
// a byte permute and one half2 subtraction per pair. E4M3 uses the cvt.f16x2.e4m3x2 instruction of sm_89+; older
// GPUs (where kogpt_fast refuses fp8 weights: int8 is as small and more accurate) get a bit shuffle instead.
#include <math.h>

#include <cuda_fp8.h>

#include <type_traits>

#include "common.cuh"

namespace kogpt {
namespace {

constexpr int kWarps = 8;

struct GemvParams {
    int M, N, K;
    int K1;  // columns of x1; x2 holds columns K1..K-1
    const void* x1; int64_t x1_stride;
    const void* x2; int64_t x2_stride;
    const void* weight; int64_t weight_stride;
    const void* bias;
    const void* residual; int64_t residual_stride;
    void* out; int64_t out_stride;
    const void* weight_scale;  // [N] in the activation dtype, for quantized weights (NULL for dense ones)
    int activation;
    int gelu_start;  // the activation applies to columns n >= gelu_start
    const void* ln_weight; const void* ln_bias; float eps;  // the LayerNorm prologue (kLN): x1 only, K2 = 0
};

constexpr int kLNMaxRows = 2;  // rows the LayerNorm prologue handles

// Mean and rstd of x's first M rows over K (M <= kLNMaxRows), reduced over the CTA; every thread gets them.
template <typename T> __device__ void row_stats(const GemvParams& p, float* mean, float* rstd) {
    __shared__ float partial[kLNMaxRows][kWarps];
    const T* x = static_cast<const T*>(p.x1);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int pass = 0; pass < 2; ++pass) {  // 0: sum (for the mean), 1: sum of squared deviations
#pragma unroll
        for (int m = 0; m < kLNMaxRows; ++m) {
            float s = 0.f;
            if (m < p.M) {
                for (int k = threadIdx.x; k < p.K; k += blockDim.x) {
                    const float v = to_float<T>(x[(int64_t)m * p.x1_stride + k]);
                    s += pass == 0 ? v : (v - mean[m]) * (v - mean[m]);
                }
            }
            s = warp_sum(s);
            if (lane == 0) partial[m][warp] = s;
        }
        __syncthreads();
#pragma unroll
        for (int m = 0; m < kLNMaxRows; ++m) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) total += partial[m][w];
            if (pass == 0) {
                mean[m] = total / p.K;
            } else {
                rstd[m] = rsqrtf(total / p.K + p.eps);
            }
        }
        __syncthreads();  // partial is rewritten by the next pass
    }
}

// N weights as loaded -> their values in fp32, exactly. Dense weights convert element by element; int8 four at a
// time: each byte v + 128 (the sign bit flipped) becomes the low byte of an fp16 whose high byte is 0x64, i.e.
// 1024 + v + 128 (fp16 holds every integer up to 2048), and one half2 subtraction of 1152 leaves v; E4M3 two at a
// time through cvt.f16x2.e4m3x2 on sm_89+ (exact: every E4M3 value is an fp16 value), by moving its bits into an
// fp16's before that.
template <typename W, int N> __device__ __forceinline__ void weight_floats(const Vec<W, N>& w, float (&out)[N]) {
    if constexpr (std::is_same_v<W, int8_t> && N % 4 == 0) {
        const __half2 magic = __half2half2(__ushort_as_half(0x6480));  // 1152
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            uint32_t word;
            memcpy(&word, &w.v[4 * i], 4);
            const uint32_t biased = word ^ 0x80808080u;
            const uint32_t lo = __byte_perm(biased, 0x64646464u, 0x4140);  // bytes 0, 1 under 0x64
            const uint32_t hi = __byte_perm(biased, 0x64646464u, 0x4342);  // bytes 2, 3
            __half2 h_lo, h_hi;
            memcpy(&h_lo, &lo, 4);
            memcpy(&h_hi, &hi, 4);
            const float2 f_lo = __half22float2(__hsub2(h_lo, magic));
            const float2 f_hi = __half22float2(__hsub2(h_hi, magic));
            out[4 * i] = f_lo.x;
            out[4 * i + 1] = f_lo.y;
            out[4 * i + 2] = f_hi.x;
            out[4 * i + 3] = f_hi.y;
        }
    } else if constexpr (std::is_same_v<W, int8_t>) {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = static_cast<float>(w.v[i]);
    } else if constexpr (std::is_same_v<W, __nv_fp8_e4m3>) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        if constexpr (N % 2 == 0) {
#pragma unroll
            for (int i = 0; i < N / 2; ++i) {
                __nv_fp8x2_storage_t pair;
                memcpy(&pair, &w.v[2 * i], 2);
                const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
                out[2 * i] = f.x;
                out[2 * i + 1] = f.y;
            }
            return;
        }
#endif
        // Without the instruction (sm_75/80; kogpt_fast refuses fp8 weights there, this keeps the kernel correct
        // and small): the byte s eeee mmm moved into an fp16 as s 0eeee mmm0000000 is the value / 2**8, subnormals
        // included (the exponent read with fp16's bias 15 instead of 7).
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const unsigned b = reinterpret_cast<const unsigned char&>(w.v[i]);
            out[i] = __half2float(__ushort_as_half((unsigned short)(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7)))) * 256.f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_float<W>(w.v[i]);
    }
}

__device__ __forceinline__ float gelu_tanh(float x) {
    // HF's gelu_new: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// T: the activation dtype; W: the weight's (T, or int8_t / __nv_fp8_e4m3 with p.weight_scale); kM: rows of x handled
// per launch (M <= kM); kVec: weights per load (16 bytes, or 1 for the scalar fallback when K or the pointers are
// not aligned to 16 bytes); kLN: the LayerNorm prologue (kM <= 2).
template <typename T, typename W, int kM, int kVec, bool kLN = false>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(GemvParams p) {
    constexpr bool kQuantized = !std::is_same_v<T, W>;
    static_assert(!kLN || kM <= kLNMaxRows, "the LayerNorm prologue handles at most kLNMaxRows rows");
    constexpr int kRows = kM >= 8 ? 4 : 2;     // weight rows per warp: more rows amortise the x loads at large M
    constexpr int kUnroll = kM >= 8 ? 2 : 4;   // loads per row in flight; fewer at large M to bound registers
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
    float mean[kLNMaxRows] = {}, rstd[kLNMaxRows] = {};
    if constexpr (kLN) row_stats<T>(p, mean, rstd);  // every warp takes part (barriers), before any returns
    if (row0 >= p.N) return;
    const W* weight = static_cast<const W*>(p.weight);
    const T* x1 = static_cast<const T*>(p.x1);
    const T* x2 = static_cast<const T*>(p.x2);
    const T* ln_weight = static_cast<const T*>(p.ln_weight);
    const T* ln_bias = static_cast<const T*>(p.ln_bias);

    float acc[kM][kRows] = {};
    for (int k0 = lane * kVec; k0 < p.K; k0 += 32 * kVec * kUnroll) {
        Vec<W, kVec> w[kUnroll][kRows];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int k = k0 + u * 32 * kVec;
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                if (k < p.K && row0 + r < p.N) {
                    const W* row = weight + (int64_t)(row0 + r) * p.weight_stride;
                    w[u][r] = *reinterpret_cast<const Vec<W, kVec>*>(row + k);
                } else {
                    w[u][r] = Vec<W, kVec>{};  // zeros
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int k = k0 + u * 32 * kVec;
            if (k >= p.K) break;
            // A vector never straddles K1 (the host takes the scalar path unless K1 % kVec == 0).
            const bool first = k < p.K1;
            const T* xk = first ? x1 + k : x2 + (k - p.K1);
            const int64_t x_stride = first ? p.x1_stride : p.x2_stride;
            float gain[kVec], shift[kVec];
            if constexpr (kLN) {
                load_floats<T, kVec>(ln_weight + k, gain);
                load_floats<T, kVec>(ln_bias + k, shift);
            }
            float wf[kRows][kVec];
#pragma unroll
            for (int r = 0; r < kRows; ++r) weight_floats<W, kVec>(w[u][r], wf[r]);
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                if (m >= p.M) break;
                float xv[kVec];
                load_floats<T, kVec>(xk + (int64_t)m * x_stride, xv);
                if constexpr (kLN) {
#pragma unroll
                    for (int i = 0; i < kVec; ++i) xv[i] = round_to<T>((xv[i] - mean[m]) * rstd[m] * gain[i] + shift[i]);
                }
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
#pragma unroll
                    for (int i = 0; i < kVec; ++i) acc[m][r] += wf[r][i] * xv[i];
                }
            }
        }
    }

    const T* bias = static_cast<const T*>(p.bias);
    const T* scale = static_cast<const T*>(p.weight_scale);
    const T* residual = static_cast<const T*>(p.residual);
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int m = 0; m < kM; ++m) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const float sum = warp_sum(acc[m][r]);
            const int n = row0 + r;
            if (lane == (m * kRows + r) % 32 && m < p.M && n < p.N) {  // spread the stores over the lanes
                float y = sum;
                if constexpr (kQuantized) y *= to_float<T>(scale[n]);
                if (bias) y += to_float<T>(bias[n]);
                if (p.activation == KOGPT_ACT_GELU_TANH && n >= p.gelu_start) y = gelu_tanh(y);
                if (residual) y += to_float<T>(residual[(int64_t)m * p.residual_stride + n]);
                out[(int64_t)m * p.out_stride + n] = from_float<T>(y);
            }
        }
    }
}

template <typename T, typename W, int kM, int kVec, bool kLN = false>
int launch(const GemvParams& p, cudaStream_t stream) {
    constexpr int kRows = kM >= 8 ? 4 : 2;
    const int rows_per_cta = kWarps * kRows;
    gemv_kernel<T, W, kM, kVec, kLN><<<(p.N + rows_per_cta - 1) / rows_per_cta, kWarps * 32, 0, stream>>>(p);
    return check_launch("kogpt_gemv");
}

// The kernel variant for M, the LayerNorm prologue and the alignment (vector_ok: 16-byte loads possible).
template <typename T, typename W>
int launch_variant(const GemvParams& p, bool ln, bool vector_ok, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(W);
    if (ln) {
        if (!vector_ok) return launch<T, W, kLNMaxRows, 1, true>(p, stream);
        return p.M == 1 ? launch<T, W, 1, kVec, true>(p, stream) : launch<T, W, 2, kVec, true>(p, stream);
    }
    if (!vector_ok) return launch<T, W, 16, 1>(p, stream);
    if (p.M == 1) return launch<T, W, 1, kVec>(p, stream);
    if (p.M == 2) return launch<T, W, 2, kVec>(p, stream);
    if (p.M <= 4) return launch<T, W, 4, kVec>(p, stream);
    if (p.M <= 8) return launch<T, W, 8, kVec>(p, stream);
    return launch<T, W, 16, kVec>(p, stream);
}

// Checks p (a KOGPT_ERR_* code naming the problem) and launches the kernel variant its sizes and alignment allow.
// weight_format: KOGPT_WEIGHT_DENSE (the weight in the activation dtype) or a quantized one (p.weight_scale set).
int run_gemv(int dtype, int weight_format, const GemvParams& p, cudaStream_t stream) {
    const char* op = "kogpt_gemv";
    const int K2 = p.K - p.K1;
    const bool ln = p.ln_weight != nullptr || p.ln_bias != nullptr;
    const int max_m = ln ? kLNMaxRows : 16;
    if (p.M < 1 || p.M > max_m || p.N < 1 || p.K1 < 0 || K2 < 0 || p.K < 1) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: M=%d N=%d K1=%d K2=%d (M must be in [1, %d], K1 + K2 >= 1)", op,
                    p.M, p.N, p.K1, K2, max_m);
    }
    if ((p.K1 > 0 && !p.x1) || (K2 > 0 && !p.x2) || !p.weight || !p.out) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: x1 (with K1 > 0), x2 (with K2 > 0), weight and out must not be NULL",
                    op);
    }
    if (ln && (!p.ln_weight || !p.ln_bias || K2 != 0 || !(p.eps >= 0.f) || isinf(p.eps))) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT,
                    "%s: the LayerNorm prologue needs ln_weight, ln_bias, a finite eps >= 0 (got %g) and x in one piece",
                    op, (double)p.eps);
    }
    if (p.activation != KOGPT_ACT_NONE && p.activation != KOGPT_ACT_GELU_TANH) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: unknown activation code %d", op, p.activation);
    }
    if (p.gelu_start < 0 || p.gelu_start > p.N) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: gelu_start=%d must be in [0, N=%d]", op, p.gelu_start, p.N);
    }
    const bool quantized = weight_format != KOGPT_WEIGHT_DENSE;
    if (quantized && weight_format != KOGPT_WEIGHT_INT8 && weight_format != KOGPT_WEIGHT_FP8_E4M3) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: unknown weight format code %d", op, weight_format);
    }
    if (quantized != (p.weight_scale != nullptr)) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: weight_scale must be given for quantized weights only", op);
    }
    if (quantized && dtype == KOGPT_DTYPE_FLOAT32) {
        return fail(KOGPT_ERR_UNSUPPORTED, "%s: quantized weights take float16 or bfloat16 activations", op);
    }
    const size_t elem = dtype_size(dtype);
    const size_t weight_elem = quantized ? 1 : elem;
    const int vec = 16 / (int)weight_elem;  // x elements per weight vector
    auto rows_ok = [&](const void* x, int64_t stride, int cols) {  // vectors of `vec` elements of x's rows
        return cols == 0 || (cols % vec == 0 && aligned(x, 16) && (p.M == 1 || (stride * elem) % 16 == 0));
    };
    const bool vector_ok = rows_ok(p.x1, p.x1_stride, p.K1) && rows_ok(p.x2, p.x2_stride, K2) &&
                           aligned(p.weight, 16) && (p.weight_stride * weight_elem) % 16 == 0 &&
                           (!ln || (aligned(p.ln_weight, 16) && aligned(p.ln_bias, 16)));
    return dispatch_dtype(dtype, op, [&](auto zero) {
        using T = decltype(zero);
        if constexpr (std::is_same_v<T, float>) {
            return launch_variant<T, T>(p, ln, vector_ok, stream);  // dense only (checked above)
        } else {
            switch (weight_format) {
                case KOGPT_WEIGHT_INT8: return launch_variant<T, int8_t>(p, ln, vector_ok, stream);
                case KOGPT_WEIGHT_FP8_E4M3: return launch_variant<T, __nv_fp8_e4m3>(p, ln, vector_ok, stream);
                default: return launch_variant<T, T>(p, ln, vector_ok, stream);
            }
        }
    });
}

}  // namespace
}  // namespace kogpt

extern "C" int kogpt_gemv_concat(int dtype, int M, int N, int K1, int K2,
                                 const void* x1, int64_t x1_stride,
                                 const void* x2, int64_t x2_stride,
                                 const void* weight, int64_t weight_stride,
                                 const void* bias,
                                 const void* residual, int64_t residual_stride,
                                 void* out, int64_t out_stride,
                                 int activation, int gelu_start, cudaStream_t stream) {
    if (K1 < 0 || K2 < 0 || K1 > INT32_MAX - K2) {
        return kogpt::fail(KOGPT_ERR_INVALID_ARGUMENT, "kogpt_gemv: M=%d N=%d K1=%d K2=%d (K1 + K2 >= 1)", M, N, K1,
                           K2);
    }
    const kogpt::GemvParams p{M, N, K1 + K2, K1, x1, x1_stride, x2, x2_stride, weight, weight_stride, bias, residual,
                              residual_stride, out, out_stride, nullptr, activation, gelu_start, nullptr, nullptr,
                              0.f};
    return kogpt::run_gemv(dtype, KOGPT_WEIGHT_DENSE, p, stream);
}

extern "C" int kogpt_gemv_ln_split_gelu(int dtype, int M, int N, int K,
                                        const void* x, int64_t x_stride,
                                        const void* ln_weight, const void* ln_bias, float eps,
                                        const void* weight, int64_t weight_stride,
                                        const void* bias,
                                        const void* residual, int64_t residual_stride,
                                        void* out, int64_t out_stride,
                                        int activation, int gelu_start, cudaStream_t stream) {
    if (!ln_weight || !ln_bias) {
        return kogpt::fail(KOGPT_ERR_INVALID_ARGUMENT, "kogpt_gemv: ln_weight and ln_bias must not be NULL");
    }
    const kogpt::GemvParams p{M, N, K, K, x, x_stride, nullptr, 0, weight, weight_stride, bias, residual,
                              residual_stride, out, out_stride, nullptr, activation, gelu_start, ln_weight, ln_bias,
                              eps};
    return kogpt::run_gemv(dtype, KOGPT_WEIGHT_DENSE, p, stream);
}

extern "C" int kogpt_gemv_quantized(int dtype, int weight_format, int M, int N, int K1, int K2,
                                    const void* x1, int64_t x1_stride,
                                    const void* x2, int64_t x2_stride,
                                    const void* ln_weight, const void* ln_bias, float eps,
                                    const void* weight, int64_t weight_stride, const void* weight_scale,
                                    const void* bias,
                                    const void* residual, int64_t residual_stride,
                                    void* out, int64_t out_stride,
                                    int activation, int gelu_start, cudaStream_t stream) {
    if (K1 < 0 || K2 < 0 || K1 > INT32_MAX - K2) {
        return kogpt::fail(KOGPT_ERR_INVALID_ARGUMENT, "kogpt_gemv: M=%d N=%d K1=%d K2=%d (K1 + K2 >= 1)", M, N, K1,
                           K2);
    }
    if (weight_format == KOGPT_WEIGHT_DENSE || !weight_scale) {
        return kogpt::fail(KOGPT_ERR_INVALID_ARGUMENT,
                           "kogpt_gemv_quantized: a quantized weight format and its weight_scale are needed "
                           "(format %d)", weight_format);
    }
    const kogpt::GemvParams p{M, N, K1 + K2, K1, x1, x1_stride, x2, x2_stride, weight, weight_stride, bias, residual,
                              residual_stride, out, out_stride, weight_scale, activation, gelu_start, ln_weight,
                              ln_bias, eps};
    return kogpt::run_gemv(dtype, weight_format, p, stream);
}

extern "C" int kogpt_gemv_split_gelu(int dtype, int M, int N, int K,
                                     const void* x, int64_t x_stride,
                                     const void* weight, int64_t weight_stride,
                                     const void* bias,
                                     const void* residual, int64_t residual_stride,
                                     void* out, int64_t out_stride,
                                     int activation, int gelu_start, cudaStream_t stream) {
    if (K < 1) {  // kogpt_gemv_concat would name K1 and K2
        return kogpt::fail(KOGPT_ERR_INVALID_ARGUMENT, "kogpt_gemv: M=%d N=%d K=%d (M must be in [1, 16])", M, N, K);
    }
    return kogpt_gemv_concat(dtype, M, N, K, 0, x, x_stride, nullptr, 0, weight, weight_stride, bias, residual,
                             residual_stride, out, out_stride, activation, gelu_start, stream);
}

extern "C" int kogpt_gemv(int dtype, int M, int N, int K,
                          const void* x, int64_t x_stride,
                          const void* weight, int64_t weight_stride,
                          const void* bias,
                          const void* residual, int64_t residual_stride,
                          void* out, int64_t out_stride,
                          int activation, cudaStream_t stream) {
    return kogpt_gemv_split_gelu(dtype, M, N, K, x, x_stride, weight, weight_stride, bias, residual, residual_stride,
                                 out, out_stride, activation, 0, stream);
}
