// Counting sort of the routing assignments: per-chunk histograms, one exclusive scan over
// (expert, chunk), then a stable scatter. Reads top_k_idx once per pass, writes sorted_slots and
// slot_rows once. Chunks are contiguous slot ranges, so the result does not depend on the
// number of threads.
#include "routing.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/gating.h"

namespace cumo {
namespace {

constexpr int64_t kMinSlotsPerChunk = 16384;  // below this a chunk's histogram costs more than it saves

}  // namespace

RoutingPlan build_routing_plan(const at::Tensor& top_k_idx, int64_t num_experts) {
  TORCH_CHECK(top_k_idx.dim() == 2, "top_k_idx must be [T, K], got ", top_k_idx.sizes());
  TORCH_CHECK(num_experts > 0, "num_experts must be positive");
  const at::Tensor idx = top_k_idx.to(at::kLong).contiguous();
  const int64_t n = idx.numel();
  const int64_t buckets = num_experts + 1;
  const auto long_opts = idx.options().dtype(at::kLong);
  RoutingPlan plan{at::empty({num_experts}, long_opts), at::empty({buckets}, long_opts),
                   at::empty({n}, long_opts), at::empty({n}, long_opts)};

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinSlotsPerChunk));
  auto chunk_begin = [&](int64_t c) { return c * n / chunks; };
  const int64_t* ids = idx.data_ptr<int64_t>();
  std::vector<int64_t> starts(chunks * buckets, 0);  // [chunk][bucket]: histogram, then first row

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = starts.data() + c * buckets;
      for (int64_t i = chunk_begin(c); i < chunk_begin(c + 1); ++i) hist[expert_bucket(ids[i], num_experts)]++;
    }
  });

  // Exclusive scan in (bucket, chunk) order: a bucket's rows are its chunks' rows in chunk order.
  int64_t* counts = plan.counts.data_ptr<int64_t>();
  int64_t* offsets = plan.offsets.data_ptr<int64_t>();
  int64_t row = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    offsets[b] = row;  // offsets[E]: first dropped row = number of kept rows
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = starts[c * buckets + b];
      starts[c * buckets + b] = row;
      row += count;
    }
    if (b < num_experts) counts[b] = row - offsets[b];
  }

  int64_t* sorted_slots = plan.sorted_slots.data_ptr<int64_t>();
  int64_t* slot_rows = plan.slot_rows.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = starts.data() + c * buckets;
      for (int64_t i = chunk_begin(c); i < chunk_begin(c + 1); ++i) {
        const int64_t r = next[expert_bucket(ids[i], num_experts)]++;
        sorted_slots[r] = i;
        slot_rows[i] = r;
      }
    }
  });
  return plan;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_plan_op(const at::Tensor& top_k_idx,
                                                                           int64_t num_experts) {
  RoutingPlan plan = build_routing_plan(top_k_idx, num_experts);
  return {plan.counts, plan.offsets, plan.sorted_slots, plan.slot_rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cumo, m) {
  m.def("routing_plan(Tensor top_k_idx, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cumo, CPU, m) { m.impl("routing_plan", &routing_plan_op); }

}  // namespace cumo
