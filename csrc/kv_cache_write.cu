// Paged KV cache write: k (RoPE applied here when a table is given) and v stored by slot.
// One CTA per token; each thread moves interleaved pairs, so RoPE needs no cross-thread exchange.
#include "kv_cache_write.cuh"
#include "rope.cuh"

namespace kogpt {
namespace {

template <typename T> __global__ void rope_kv_write_kernel(RopeKVWrite p) {
    const int token = blockIdx.x;
    const int64_t slot = p.slot_mapping[token];
    const int half_dim = p.head_dim / 2;
    const float* table_row = p.rope_table ? p.rope_table + p.positions[token] * p.rope_stride : nullptr;
    T* k_cache = static_cast<T*>(p.k_cache);
    T* v_cache = static_cast<T*>(p.v_cache);
    const int64_t cache_token = slot < 0 ? 0 : (slot / p.block_size) * p.cache_stride_block +
                                                   (slot % p.block_size) * p.cache_stride_token;
    for (int i = threadIdx.x; i < p.n_head * half_dim; i += blockDim.x) {
        const int head = i / half_dim;
        const int pair = i % half_dim;
        const int d = 2 * pair;
        const bool rotate = table_row != nullptr && d < p.rotary_dim;
        if (slot < 0) continue;
        const T* k = static_cast<const T*>(p.k) + token * p.k_stride_token + head * p.k_stride_head + d;
        const T* v = static_cast<const T*>(p.v) + token * p.v_stride_token + head * p.v_stride_head + d;
        const int64_t dst = cache_token + head * p.cache_stride_head + d;
        if (rotate) {
            float x = to_float<T>(k[0]), y = to_float<T>(k[1]);
            rope_pair<T>(x, y, table_row, pair, p.rotary_dim);
            k_cache[dst] = from_float<T>(x);
            k_cache[dst + 1] = from_float<T>(y);
        } else {
            k_cache[dst] = k[0];
            k_cache[dst + 1] = k[1];
        }
        v_cache[dst] = v[0];
        v_cache[dst + 1] = v[1];
    }
}

}  // namespace

int launch_rope_kv_write(int dtype, const RopeKVWrite& p, const char* op, cudaStream_t stream) {
    if (p.n_tokens < 0 || p.n_head <= 0 || p.head_dim <= 0 || p.block_size <= 0) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: bad sizes n_tokens=%d n_head=%d head_dim=%d block_size=%d",
                    op, p.n_tokens, p.n_head, p.head_dim, p.block_size);
    }
    if (p.head_dim % 2 != 0) return fail(KOGPT_ERR_UNSUPPORTED, "%s: head_dim %d is odd", op, p.head_dim);
    if (p.rope_table != nullptr &&
        (p.rotary_dim <= 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim || p.positions == nullptr)) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: rotary_dim %d must be even, in (0, head_dim=%d], with positions",
                    op, p.rotary_dim, p.head_dim);
    }
    if (p.n_tokens == 0) return KOGPT_OK;
    if (!p.k || !p.v || !p.k_cache || !p.v_cache || !p.slot_mapping) {
        return fail(KOGPT_ERR_INVALID_ARGUMENT, "%s: a required pointer is NULL", op);
    }
    return dispatch_dtype(dtype, op, [&](auto zero) {
        using T = decltype(zero);
        const int pairs = p.n_head * p.head_dim / 2;
        const int threads = pairs >= 256 ? 256 : ((pairs + 31) / 32) * 32;
        rope_kv_write_kernel<T><<<p.n_tokens, threads, 0, stream>>>(p);
        return check_launch(op);
    });
}

}  // namespace kogpt

extern "C" int kogpt_kv_cache_write(int dtype, int n_tokens, int n_head, int head_dim,
                                    const void* k, int64_t k_stride_token, int64_t k_stride_head,
                                    const void* v, int64_t v_stride_token, int64_t v_stride_head,
                                    void* k_cache, void* v_cache, int block_size,
                                    int64_t cache_stride_block, int64_t cache_stride_token, int64_t cache_stride_head,
                                    const int64_t* slot_mapping,
                                    const int64_t* positions, const float* rope_table, int64_t rope_stride,
                                    int rotary_dim, cudaStream_t stream) {
    kogpt::RopeKVWrite p{n_tokens, n_head, head_dim,
                         k, k_stride_token, k_stride_head,
                         v, v_stride_token, v_stride_head,
                         k_cache, v_cache, block_size,
                         cache_stride_block, cache_stride_token, cache_stride_head,
                         slot_mapping, positions, rope_table, rope_stride, rotary_dim};
    return kogpt::launch_rope_kv_write(dtype, p, "kogpt_kv_cache_write", stream);
}
