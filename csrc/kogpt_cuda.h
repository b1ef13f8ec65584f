/* The C ABI of libkogpt_cuda: plain `extern "C"` launchers loaded from Python with ctypes.
 *
 * Conventions, for every launcher:
 * - pointers are device pointers; sizes and strides are in elements (not bytes); the innermost dimension of
 *   every tensor is contiguous (stride 1), the other strides are passed;
 * - `dtype` is a KOGPT_DTYPE_* code and applies to all activations, weights and caches of the call;
 *   tables and metadata have fixed types (rope table fp32, positions and slots int64, block tables int32);
 * - work is enqueued on `stream` (torch.cuda.current_stream().cuda_stream); nothing synchronises;
 * - the return value is a KOGPT_* code; on failure kogpt_last_error() says what went wrong (thread-local).
 */
#ifndef KOGPT_CUDA_H
#define KOGPT_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: kogpt_gemv_split_gelu (the GEMV with the activation from a column on) added; kogpt_gemv unchanged.
 * 3: kogpt_gemv_concat (x in two pieces) added; the others unchanged.
 * 4: kogpt_gemv_ln_split_gelu (the GEMV with a LayerNorm prologue) added; the others unchanged.
 * 5: kogpt_gemv_quantized (int8 / fp8 weights with per-row scales) added; the others unchanged. */
#define KOGPT_ABI_VERSION 5

enum kogpt_status {
    KOGPT_OK = 0,
    KOGPT_ERR_CUDA = 1,             /* a CUDA runtime error (launch failure, no driver, ...) */
    KOGPT_ERR_INVALID_ARGUMENT = 2, /* a null pointer, a negative size, a misaligned pointer, ... */
    KOGPT_ERR_UNSUPPORTED = 3,      /* a dtype or head_dim this build has no kernel for */
    KOGPT_ERR_WORKSPACE = 4,        /* the workspace passed is smaller than the call needs */
};

enum kogpt_dtype { KOGPT_DTYPE_FLOAT32 = 0, KOGPT_DTYPE_FLOAT16 = 1, KOGPT_DTYPE_BFLOAT16 = 2 };

/* How a GEMV's weight is stored: in the activation dtype, or quantized with one scale per row (kogpt_fast.quant). */
enum kogpt_weight_format { KOGPT_WEIGHT_DENSE = 0, KOGPT_WEIGHT_INT8 = 1, KOGPT_WEIGHT_FP8_E4M3 = 2 };

enum kogpt_activation { KOGPT_ACT_NONE = 0, KOGPT_ACT_GELU_TANH = 1 /* gelu_new == gelu(approximate="tanh") */ };

/* ---- runtime ---- */
int kogpt_abi_version(void);
/* The message of the last failing call on this thread ("" if none). */
const char* kogpt_last_error(void);
/* *count = number of CUDA devices. Without a driver or a device it returns KOGPT_ERR_CUDA, sets *count = 0
 * and kogpt_last_error() starts with "no driver" or "no device". Never aborts. */
int kogpt_device_count(int* count);
/* The list of SM architectures compiled in, e.g. "80;89;90". */
const char* kogpt_compiled_archs(void);

/* ---- paged KV cache write (csrc/kv_cache_write.cu) ----
 * k, v [n_tokens, n_head, head_dim] -> k_cache, v_cache [num_blocks, block_size, n_head, head_dim] at
 * slot_mapping[n_tokens] (slot = block * block_size + offset; -1 = skip the token). k and v are read at any token
 * and head stride (element-aligned, no vector loads): e.g. column slices of GPT-J's fused q | k | v | fc_in output.
 * With rope_table != NULL, k is rotated first (GPT-J interleaved pairs on its first rotary_dim dims, positions
 * [n_tokens], rope_table [n_positions, rotary_dim] fp32: sin in the first half, cos in the second). */
int kogpt_kv_cache_write(int dtype, int n_tokens, int n_head, int head_dim,
                         const void* k, int64_t k_stride_token, int64_t k_stride_head,
                         const void* v, int64_t v_stride_token, int64_t v_stride_head,
                         void* k_cache, void* v_cache, int block_size,
                         int64_t cache_stride_block, int64_t cache_stride_token, int64_t cache_stride_head,
                         const int64_t* slot_mapping,
                         const int64_t* positions, const float* rope_table, int64_t rope_stride, int rotary_dim,
                         cudaStream_t stream);

/* ---- paged decode attention (csrc/decode_attention.cu) ----
 * One new token per sequence: q, k, v [batch, n_head, head_dim] before RoPE, each at any token and head stride
 * (element-aligned: they are read element by element, so only the caches need 16-byte aligned rows; e.g. q, k, v
 * may be column slices of GPT-J's fused q | k | v | fc_in GEMM output). RoPE (0 < rotary_dim <= head_dim, even) is
 * applied to q and k, k and v are written to the caches at slot_mapping[batch], then each query attends to
 * seq_lens[b] cached tokens (the new one included) listed by block_tables [batch, max_blocks] (row stride
 * block_table_stride). The context is split in partitions of `partition_size` tokens (flash-decoding): the
 * partition kernel also rotates q and stores the new token; a second kernel reduces the partitions.
 * Scores are q.k * scale in fp32, softmax in fp32; out [batch, n_head, head_dim].
 * workspace: device memory of at least kogpt_decode_attention_workspace_size(...) bytes, 256-byte aligned.
 * head_dim: 64, 128 or 256 (else KOGPT_ERR_UNSUPPORTED). partition_size: a multiple of 32 in [32, 1024]. */
size_t kogpt_decode_attention_workspace_size(int dtype, int batch, int n_head, int head_dim, int max_context,
                                             int partition_size);
int kogpt_decode_attention(int dtype, int batch, int n_head, int head_dim,
                           const void* q, int64_t q_stride_token, int64_t q_stride_head,
                           const void* k, int64_t k_stride_token, int64_t k_stride_head,
                           const void* v, int64_t v_stride_token, int64_t v_stride_head,
                           void* k_cache, void* v_cache, int block_size,
                           int64_t cache_stride_block, int64_t cache_stride_token, int64_t cache_stride_head,
                           const int64_t* slot_mapping, const int64_t* positions,
                           const float* rope_table, int64_t rope_stride, int rotary_dim,
                           const int32_t* block_tables, int64_t block_table_stride, int max_blocks,
                           const int32_t* seq_lens, float scale, int partition_size,
                           void* out, int64_t out_stride_token, int64_t out_stride_head,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* ---- decode GEMV / skinny GEMM (csrc/gemv.cu) ----
 * out[m, n] = act(sum_k x[m, k] * weight[n, k] + bias[n]) + residual[m, n], for m < M (1..16), n < N.
 * weight in torch's Linear layout [N, K]; bias and residual may be NULL; fp32 accumulation.
 * out must not alias x or weight (it may alias residual). */
int kogpt_gemv(int dtype, int M, int N, int K,
               const void* x, int64_t x_stride,
               const void* weight, int64_t weight_stride,
               const void* bias,
               const void* residual, int64_t residual_stride,
               void* out, int64_t out_stride,
               int activation, cudaStream_t stream);
/* The same with the activation applied to the columns n >= gelu_start only (0 <= gelu_start <= N; 0: as kogpt_gemv,
 * N: no column): GPT-J's q | k | v | gelu(fc_in) from one GEMV over [Wq; Wk; Wv; W_in], gelu_start = 3 * n_embd.
 * kogpt_gemv(..., activation, stream) == kogpt_gemv_split_gelu(..., activation, 0, stream). */
int kogpt_gemv_split_gelu(int dtype, int M, int N, int K,
                          const void* x, int64_t x_stride,
                          const void* weight, int64_t weight_stride,
                          const void* bias,
                          const void* residual, int64_t residual_stride,
                          void* out, int64_t out_stride,
                          int activation, int gelu_start, cudaStream_t stream);
/* The same over x = [x1 | x2]: x1 [M, K1] and x2 [M, K2] (row strides x1_stride, x2_stride) are read in place as
 * the columns 0..K1-1 and K1..K1+K2-1 of x, K = K1 + K2 >= 1 (either piece may be empty, its pointer then NULL):
 * GPT-J's out_proj + fc_out over [attention | gelu(fc_in)] with no concatenation. 16-byte vector loads need K1 and
 * K2 multiples of 16 bytes' worth of elements and aligned rows; other inputs take a slower scalar path. */
int kogpt_gemv_concat(int dtype, int M, int N, int K1, int K2,
                      const void* x1, int64_t x1_stride,
                      const void* x2, int64_t x2_stride,
                      const void* weight, int64_t weight_stride,
                      const void* bias,
                      const void* residual, int64_t residual_stride,
                      void* out, int64_t out_stride,
                      int activation, int gelu_start, cudaStream_t stream);
/* kogpt_gemv_split_gelu over layer_norm(x) for M = 1 or 2: the CTA computes each row's mean and variance in fp32,
 * and x is normalised as it is loaded, (x - mean) / sqrt(var + eps) * ln_weight + ln_bias rounded to the dtype, as a
 * LayerNorm kernel would write it (ln_weight, ln_bias [K] in the dtype). GPT-J's ln_1 and its first fused GEMV in
 * one launch. */
int kogpt_gemv_ln_split_gelu(int dtype, int M, int N, int K,
                             const void* x, int64_t x_stride,
                             const void* ln_weight, const void* ln_bias, float eps,
                             const void* weight, int64_t weight_stride,
                             const void* bias,
                             const void* residual, int64_t residual_stride,
                             void* out, int64_t out_stride,
                             int activation, int gelu_start, cudaStream_t stream);
/* Quantized weights: out[m, n] = act(weight_scale[n] * sum_k x[m, k] * w[n, k] + bias[n]) + residual[m, n], with w
 * int8 (KOGPT_WEIGHT_INT8) or fp8 E4M3 (KOGPT_WEIGHT_FP8_E4M3) [N, K] at row stride weight_stride (in elements: bytes)
 * and weight_scale [N] in the activation dtype. dtype: float16 or bfloat16 (float32: KOGPT_ERR_UNSUPPORTED). The
 * weights are decoded exactly and the scale multiplies the fp32 sum. x = [x1 | x2] as in kogpt_gemv_concat, or, with
 * ln_weight and ln_bias (then K2 = 0, x2 NULL and M <= 2), layer_norm(x1) as in kogpt_gemv_ln_split_gelu. 16-byte
 * loads need K1 and K2 multiples of 16 and aligned rows; other inputs take a slower scalar path. */
int kogpt_gemv_quantized(int dtype, int weight_format, int M, int N, int K1, int K2,
                         const void* x1, int64_t x1_stride,
                         const void* x2, int64_t x2_stride,
                         const void* ln_weight, const void* ln_bias, float eps,
                         const void* weight, int64_t weight_stride, const void* weight_scale,
                         const void* bias,
                         const void* residual, int64_t residual_stride,
                         void* out, int64_t out_stride,
                         int activation, int gelu_start, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* KOGPT_CUDA_H */
