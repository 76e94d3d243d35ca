// Moving rows between token order and the expert-sorted order of a routing plan (csrc/cpu/routing.h).
// T tokens, K = top_k, C columns, N = T*K rows in expert-sorted order.
#pragma once

#include <ATen/ATen.h>

#include "routing.h"

namespace cumo {

// out[i] = src[slots[i] / K]: the token rows of m expert-sorted rows. src: [T, C] contiguous,
// out: [m, C] contiguous. Parallel over rows outside a parallel region.
void gather_token_rows(at::Tensor& out, const at::Tensor& src, const int64_t* slots, int64_t m, int64_t top_k);

// The weighted combine back to token order: out[t] = sum_k [id kept] scale[t,k] * rows[slot_rows[t*K+k]],
// accumulated in opmath in k order (no atomics: deterministic), rounded once. rows: [N, C] expert-sorted;
// scale: [T, K] opmath dtype, or undefined for 1; ids: [T, K] int64 -> [T, C]. Dropped slots are
// skipped, never multiplied. fp32/bf16 rows take an AVX-512 kernel where the CPU has it.
at::Tensor combine(const at::Tensor& rows, const RoutingPlan& plan, const at::Tensor& scale, const at::Tensor& ids,
                   int64_t num_experts);

}  // namespace cumo
