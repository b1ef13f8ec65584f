// The RoPE + paged-cache store kernel of kogpt_kv_cache_write (kogpt_decode_attention stores its new token itself).
#pragma once

#include "common.cuh"

namespace kogpt {

struct RopeKVWrite {
    int n_tokens, n_head, head_dim;
    const void* k; int64_t k_stride_token, k_stride_head;
    const void* v; int64_t v_stride_token, v_stride_head;
    void* k_cache; void* v_cache; int block_size;
    int64_t cache_stride_block, cache_stride_token, cache_stride_head;
    const int64_t* slot_mapping;
    const int64_t* positions; const float* rope_table; int64_t rope_stride; int rotary_dim;  // table NULL: no RoPE
};

// Checks the arguments (a KOGPT_ERR_* code naming `op` on failure) and enqueues the kernel.
int launch_rope_kv_write(int dtype, const RopeKVWrite& p, const char* op, cudaStream_t stream);

}  // namespace kogpt
