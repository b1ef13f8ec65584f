// Paged decode attention (flash-decoding): one new query per sequence attends to its cached context.
//
// Two launches on one stream:
//   1. decode_split_kernel: grid (splits, heads, batch); a CTA rotates its head's q in registers (RoPE), scores
//      one partition of `partition_size` tokens, softmax-normalises them locally (max m, sum l) and keeps the
//      unnormalised P.V in fp32. The CTA whose partition holds the new token (position seq_len - 1) first rotates
//      that token's k and stores it and v at the token's cache slot, then reads the partition as the others do
//      (a barrier publishes the stores to the CTA; no other CTA reads that slot). A sequence whose seq_lens entry
//      is outside [1, max_blocks * block_size] (a broken contract: kogpt_fast never passes one) has no such CTA,
//      and its new token is not stored;
//   2. decode_reduce_kernel: rescales the partitions by exp(m_s - max m) and divides by the total sum.
// Splitting the context is what fills the GPU at batch 1: 16 heads alone would occupy 16 of 132 SMs.
// The number of splits depends only on max_blocks * block_size (host-known), so a CUDA graph can capture it.
#include <math.h>

#include "common.cuh"
#include "rope.cuh"

namespace kogpt {
namespace {

constexpr int kWarps = 4;     // per CTA of the split kernel
constexpr int kUnroll = 4;    // K/V rows each warp has in flight
constexpr size_t kAlign = 256;

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
    size_t out_bytes, ml_bytes;
    size_t total() const { return out_bytes + ml_bytes; }
};

Workspace workspace_layout(int batch, int n_head, int head_dim, int splits) {
    const size_t rows = (size_t)batch * n_head;
    return {round_up(rows * splits * head_dim * sizeof(float)), round_up(rows * splits * 2 * sizeof(float))};
}

struct DecodeParams {
    int n_head, block_size, partition_size, splits;
    // The new token of each sequence, before RoPE: q, k, v [batch, n_head, D] at these strides (elements).
    const void* q; int64_t q_stride_token, q_stride_head;
    const void* k; int64_t k_stride_token, k_stride_head;
    const void* v; int64_t v_stride_token, v_stride_head;
    const int64_t* slot_mapping;  // [batch]: the new token's cache slot (-1: not stored)
    const int64_t* positions;     // [batch]: its rotary position
    const float* rope_table; int64_t rope_stride; int rotary_dim;
    void* k_cache; void* v_cache;
    int64_t cache_stride_block, cache_stride_token, cache_stride_head;
    const int32_t* block_tables; int64_t block_table_stride;
    const int32_t* seq_lens;
    float scale;
    float* partial_out;  // [batch, n_head, splits, D]
    float* partial_ml;   // [batch, n_head, splits, 2]: running max, sum of exp
    void* out; int64_t out_stride_token, out_stride_head;
};

// Reduces x over the CTA (max or sum); buf holds kWarps floats. Every thread gets the result.
template <bool kMax> __device__ float block_reduce(float x, float* buf) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    x = kMax ? warp_max(x) : warp_sum(x);
    if (lane == 0) buf[warp] = x;
    __syncthreads();
    float r = buf[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, buf[w]) : r + buf[w];
    __syncthreads();  // buf is reused by the next call
    return r;
}

template <typename T, int D> __global__ void __launch_bounds__(kWarps * 32) decode_split_kernel(DecodeParams p) {
    constexpr int kPerLane = D / 32;  // each lane owns kPerLane consecutive dims of the head
    const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t row = ((int64_t)seq * p.n_head + head) * p.splits + split;
    const int seq_len = p.seq_lens[seq];
    const int start = split * p.partition_size;
    const int end = min(start + p.partition_size, seq_len);
    if (start >= end) return;  // past this sequence's context: the reduction does not read it
    const float* rope_row = p.rope_table + p.positions[seq] * p.rope_stride;

    if (end == seq_len) {  // this partition holds the new token: rotate its k, store k and v, then read on
        const int64_t slot = p.slot_mapping[seq];
        if (slot >= 0) {
            const T* k = static_cast<const T*>(p.k) + seq * p.k_stride_token + head * p.k_stride_head;
            const T* v = static_cast<const T*>(p.v) + seq * p.v_stride_token + head * p.v_stride_head;
            const int64_t dst = (slot / p.block_size) * p.cache_stride_block + (slot % p.block_size) * p.cache_stride_token +
                                head * p.cache_stride_head;
            T* k_cache = static_cast<T*>(p.k_cache) + dst;
            T* v_cache = static_cast<T*>(p.v_cache) + dst;
            for (int pair = threadIdx.x; pair < D / 2; pair += blockDim.x) {
                const int d = 2 * pair;
                float x = to_float<T>(k[d]), y = to_float<T>(k[d + 1]);
                if (d < p.rotary_dim) rope_pair<T>(x, y, rope_row, pair, p.rotary_dim);
                k_cache[d] = from_float<T>(x);
                k_cache[d + 1] = from_float<T>(y);
                v_cache[d] = v[d];
                v_cache[d + 1] = v[d + 1];
            }
        }
        __syncthreads();  // the stores are visible to every thread of the CTA after it
    }

    extern __shared__ float smem[];
    float* scores = smem;                            // [partition_size]
    float* reduce_buf = smem + p.partition_size;     // [kWarps]
    float* out_buf = reduce_buf + 32;                // [kWarps, D]

    // q: each lane owns kPerLane consecutive dims (whole pairs: kPerLane is even) and rotates them itself, rounded
    // as the reference rounds (rope_pair), so the scores are those of a rotated q held in the dtype.
    float q[kPerLane];
    const T* q_head = static_cast<const T*>(p.q) + seq * p.q_stride_token + head * p.q_stride_head + lane * kPerLane;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) q[i] = to_float<T>(q_head[i]);
#pragma unroll
    for (int i = 0; i < kPerLane; i += 2) {
        const int d = lane * kPerLane + i;
        if (d < p.rotary_dim) rope_pair<T>(q[i], q[i + 1], rope_row, d / 2, p.rotary_dim);
    }
    const int32_t* table = p.block_tables + seq * p.block_table_stride;
    const int64_t head_offset = head * p.cache_stride_head + lane * kPerLane;
    auto row_ptr = [&](const void* cache, int t) {
        const int64_t block = table[t / p.block_size];
        return static_cast<const T*>(cache) + block * p.cache_stride_block + (t % p.block_size) * p.cache_stride_token +
               head_offset;
    };

    // Scores: a warp per token, kUnroll tokens in flight.
    for (int t0 = start + warp * kUnroll; t0 < end; t0 += kWarps * kUnroll) {
        float k[kUnroll][kPerLane];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (t0 + u < end) {
                load_floats<T, kPerLane>(row_ptr(p.k_cache, t0 + u), k[u]);
            } else {
#pragma unroll
                for (int i = 0; i < kPerLane; ++i) k[u][i] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) dot += q[i] * k[u][i];
            dot = warp_sum(dot);
            if (lane == 0 && t0 + u < end) scores[t0 + u - start] = dot * p.scale;
        }
    }
    __syncthreads();

    const int n = end - start;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scores[i]);
    m = block_reduce<true>(m, reduce_buf);
    float l = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = expf(scores[i] - m);
        scores[i] = e;
        l += e;
    }
    l = block_reduce<false>(l, reduce_buf);  // its barrier also publishes the exponentials

    float acc[kPerLane] = {};
    for (int t0 = start + warp * kUnroll; t0 < end; t0 += kWarps * kUnroll) {
        float v[kUnroll][kPerLane];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (t0 + u < end) {
                load_floats<T, kPerLane>(row_ptr(p.v_cache, t0 + u), v[u]);
            } else {
#pragma unroll
                for (int i = 0; i < kPerLane; ++i) v[u][i] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const float w = t0 + u < end ? scores[t0 + u - start] : 0.f;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) acc[i] += w * v[u][i];
        }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) out_buf[warp * D + lane * kPerLane + i] = acc[i];
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += out_buf[w * D + d];
        p.partial_out[row * D + d] = sum;
    }
    if (threadIdx.x == 0) {
        p.partial_ml[row * 2] = m;
        p.partial_ml[row * 2 + 1] = l;
    }
}

template <typename T, int D> __global__ void decode_reduce_kernel(DecodeParams p) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const int64_t first = ((int64_t)seq * p.n_head + head) * p.splits;
    // Partitions holding tokens; never more than the split kernel wrote (a seq_len beyond max_blocks * block_size
    // would otherwise read past the workspace).
    const int used = min((p.seq_lens[seq] + p.partition_size - 1) / p.partition_size, p.splits);
    float m = -INFINITY;
    for (int s = 0; s < used; ++s) m = fmaxf(m, p.partial_ml[(first + s) * 2]);
    float total = 0.f;
    for (int s = 0; s < used; ++s) total += expf(p.partial_ml[(first + s) * 2] - m) * p.partial_ml[(first + s) * 2 + 1];
    T* out = static_cast<T*>(p.out) + seq * p.out_stride_token + head * p.out_stride_head;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.f;
        for (int s = 0; s < used; ++s) sum += expf(p.partial_ml[(first + s) * 2] - m) * p.partial_out[(first + s) * D + d];
        out[d] = from_float<T>(used > 0 ? sum / total : 0.f);
    }
}

template <typename T, int D> int launch_attention(const DecodeParams& p, int batch, cudaStream_t stream) {
    const size_t smem = (p.partition_size + 32 + kWarps * D) * sizeof(float);
    decode_split_kernel<T, D><<<dim3(p.splits, p.n_head, batch), kWarps * 32, smem, stream>>>(p);
    int rc = check_launch("kogpt_decode_attention (split kernel)");
    if (rc != KOGPT_OK) return rc;
    decode_reduce_kernel<T, D><<<dim3(p.n_head, batch), D < 128 ? D : 128, 0, stream>>>(p);
    return check_launch("kogpt_decode_attention (reduce kernel)");
}

int splits_for(int max_context, int partition_size) { return (max_context + partition_size - 1) / partition_size; }

}  // namespace
}  // namespace kogpt

extern "C" size_t kogpt_decode_attention_workspace_size(int dtype, int batch, int n_head, int head_dim,
                                                        int max_context, int partition_size) {
    if (batch <= 0 || n_head <= 0 || head_dim <= 0 || max_context <= 0 || partition_size <= 0) return 0;
    (void)dtype;  // the workspace holds fp32 partials whatever the dtype
    return kogpt::workspace_layout(batch, n_head, head_dim, kogpt::splits_for(max_context, partition_size)).total();
}

extern "C" int kogpt_decode_attention(int dtype, int batch, int n_head, int head_dim,
                                      const void* q, int64_t q_stride_token, int64_t q_stride_head,
                                      const void* k, int64_t k_stride_token, int64_t k_stride_head,
                                      const void* v, int64_t v_stride_token, int64_t v_stride_head,
                                      void* k_cache, void* v_cache, int block_size,
                                      int64_t cache_stride_block, int64_t cache_stride_token,
                                      int64_t cache_stride_head,
                                      const int64_t* slot_mapping, const int64_t* positions,
                                      const float* rope_table, int64_t rope_stride, int rotary_dim,
                                      const int32_t* block_tables, int64_t block_table_stride, int max_blocks,
                                      const int32_t* seq_lens, float scale, int partition_size,
                                      void* out, int64_t out_stride_token, int64_t out_stride_head,
                                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    using namespace kogpt;
    const char* op = "kogpt_decode_attention";
    if (batch <= 0 || n_head <= 0 || block_size <= 0 || max_blocks <= 0) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: bad sizes batch=%d n_head=%d block_size=%d max_blocks=%d", op,
                    batch, n_head, block_size, max_blocks);
    }
    if (head_dim != 64 && head_dim != 128 && head_dim != 256) {
        return fail(KOGPT_ERR_UNSUPPORTED, "%s: head_dim %d (supported: 64, 128, 256)", op, head_dim);
    }
    if (partition_size < 32 || partition_size > 1024 || partition_size % 32 != 0) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: partition_size %d is not a multiple of 32 in [32, 1024]", op,
                    partition_size);
    }
    if (!q || !k || !v || !k_cache || !v_cache || !slot_mapping || !out || !block_tables || !seq_lens ||
        !rope_table || !positions || !workspace) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: a required pointer is NULL", op);
    }
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: rotary_dim %d must be even, in (0, head_dim=%d]", op, rotary_dim,
                    head_dim);
    }
    // The split kernel reads each lane's head_dim/32 elements as one vector: rows must be 16-byte aligned.
    const size_t vec_bytes = head_dim / 32 * dtype_size(dtype) >= 16 ? 16 : head_dim / 32 * dtype_size(dtype);
    const size_t elem = dtype_size(dtype);
    if (!aligned(k_cache, 16) || !aligned(v_cache, 16) || (cache_stride_block * elem) % vec_bytes ||
        (cache_stride_token * elem) % vec_bytes || (cache_stride_head * elem) % vec_bytes) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: the caches must be 16-byte aligned with aligned strides", op);
    }
    const int splits = splits_for(max_blocks * block_size, partition_size);
    const Workspace ws = workspace_layout(batch, n_head, head_dim, splits);
    if (workspace_bytes < ws.total() || !aligned(workspace, kAlign)) {
        return fail(KOGPT_ERR_WORKSPACE, "%s: workspace of %zu bytes (256-byte aligned) needed, got %zu", op,
                    ws.total(), workspace_bytes);
    }
    char* base = static_cast<char*>(workspace);
    DecodeParams p{n_head, block_size, partition_size, splits,
                   q, q_stride_token, q_stride_head,
                   k, k_stride_token, k_stride_head,
                   v, v_stride_token, v_stride_head,
                   slot_mapping, positions, rope_table, rope_stride, rotary_dim,
                   k_cache, v_cache, cache_stride_block, cache_stride_token, cache_stride_head,
                   block_tables, block_table_stride, seq_lens, scale,
                   reinterpret_cast<float*>(base),
                   reinterpret_cast<float*>(base + ws.out_bytes),
                   out, out_stride_token, out_stride_head};
    return dispatch_dtype(dtype, op, [&](auto zero) {
        using T = decltype(zero);
        switch (head_dim) {
            case 64: return launch_attention<T, 64>(p, batch, stream);
            case 128: return launch_attention<T, 128>(p, batch, stream);
            default: return launch_attention<T, 256>(p, batch, stream);
        }
    });
}
