// Routing plan on CPU: stable counting sort of the N = T*K (token, slot) assignments by expert.
// Same conventions as moe_kernels/routing.py: ids outside [0, E) are dropped and sort after every
// kept assignment, rows [offsets[E], N).
#pragma once

#include <ATen/ATen.h>

namespace cumo {

struct RoutingPlan {
  at::Tensor counts;        // [E] int64
  at::Tensor offsets;       // [E+1] int64, exclusive scan of counts
  at::Tensor sorted_slots;  // [N] int64, slot held by each row
  at::Tensor slot_rows;     // [N] int64, row of each slot
};

// top_k_idx: [T, K] int64 contiguous. O(N + P*E) work, P = threads; no comparison sort.
RoutingPlan build_routing_plan(const at::Tensor& top_k_idx, int64_t num_experts);

}  // namespace cumo
