// GPT-J RoPE on one interleaved pair (x[2i], x[2i+1]) of a head's first rotary_dim dims, rounded as
// kogpt_fast.reference.apply_rope rounds in dtype T: sin/cos cast to T, then x*cos and rotated*sin each rounded
// to T, then their sum. __fmul_rn/__fadd_rn keep nvcc from contracting into an FMA (torch does not).
#pragma once

#include "common.cuh"

namespace kogpt {

// table row: [rotary_dim] fp32, sin of the pair angles in the first half, cos in the second.
template <typename T>
__device__ __forceinline__ void rope_pair(float& x, float& y, const float* table_row, int pair, int rotary_dim) {
    const float sin_t = round_to<T>(table_row[pair]);
    const float cos_t = round_to<T>(table_row[rotary_dim / 2 + pair]);
    const float x_out = round_to<T>(__fadd_rn(round_to<T>(__fmul_rn(x, cos_t)), round_to<T>(__fmul_rn(-y, sin_t))));
    const float y_out = round_to<T>(__fadd_rn(round_to<T>(__fmul_rn(y, cos_t)), round_to<T>(__fmul_rn(x, sin_t))));
    x = x_out;
    y = y_out;
}

}  // namespace kogpt
