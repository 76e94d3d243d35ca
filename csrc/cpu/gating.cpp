// CPU top-k softmax gating: cumo::topk_gating(logits [T, E], top_k, normalize)
//   -> (weights [T, K] float32 (float64 for float64 logits), idx [T, K] int64).
// T tokens, E experts, K = top_k. Reads each logit row (any float dtype, any strides) a few times,
// writes K weights and ids per token; tokens run in parallel (at::parallel_for), one row per task
// step, with the per-row rules of csrc/common/gating.h (the CUDA kernel uses the same helpers).
// The op has no autograd of its own: moe_kernels/gating_ops.py registers its backward and fake.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/gating.h"

namespace {

constexpr int64_t kTokensPerTask = 16;

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& logits, int64_t top_k, bool normalize) {
  TORCH_CHECK(logits.dim() == 2, "topk_gating: logits must be [T, E], got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "topk_gating: logits must be floating point, got ",
              logits.scalar_type());
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "topk_gating: need 1 <= top_k <= num_experts, got top_k=",
              top_k, ", num_experts=", num_experts);
  const bool exact = logits.scalar_type() == at::kDouble;
  auto weights = at::empty({num_tokens, top_k}, logits.options().dtype(exact ? at::kDouble : at::kFloat));
  auto ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kLong));
  if (num_tokens == 0) return {weights, ids};

  const int64_t row_stride = logits.stride(0);
  const int64_t col_stride = logits.stride(1);
  int64_t* ids_ptr = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cumo_topk_gating_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
    acc_t* weights_ptr = weights.data_ptr<acc_t>();
    at::parallel_for(0, num_tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> exps(num_experts);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = logits_ptr + t * row_stride;
        auto load = [row, col_stride](int64_t e) { return static_cast<acc_t>(row[e * col_stride]); };
        cumo::topk_softmax_row<acc_t>(load, num_experts, top_k, normalize, weights_ptr + t * top_k,
                                      ids_ptr + t * top_k, exps.data());
      }
    });
  });
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cumo, m) {
  m.def("topk_gating(Tensor logits, int top_k, bool normalize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cumo, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
}
