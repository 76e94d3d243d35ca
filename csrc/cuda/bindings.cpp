// Torch bindings of the CUDA kernels: op schemas in namespace cumo_cuda, checks, output
// allocation (worst-case sizes from the input shapes only: no host sync, CUDA-graph capturable)
// and launches on the current stream. T tokens, E experts, K = top_k, N = T*K slots.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"

namespace cumo_cuda {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

FloatType float_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kDouble:
      return FloatType::kFloat64;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, "topk_gating: logits must be float32/float64/float16/bfloat16, got ", type);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits, int64_t top_k, bool normalize) {
  TORCH_CHECK(logits.is_cuda(), "topk_gating: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "topk_gating: logits must be [T, E], got ", logits.sizes());
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "topk_gating: need 1 <= top_k <= num_experts, got top_k=",
              top_k, ", num_experts=", num_experts);
  const FloatType dtype = float_type(logits.scalar_type());
  const c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({num_tokens, top_k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kLong));
  check_launch(launch_topk_gating(logits.const_data_ptr(), dtype, num_tokens, num_experts, logits.stride(0),
                                  logits.stride(1), top_k, normalize, weights.data_ptr<float>(),
                                  ids.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()),
               "topk_gating");
  // The kernel selects in fp32; float64 logits get float64 weights (the op's declared dtype, as on CPU).
  if (logits.scalar_type() == at::kDouble) return {weights.to(at::kDouble), ids};
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_plan_cuda(const at::Tensor& top_k_idx,
                                                                             int64_t num_experts) {
  TORCH_CHECK(top_k_idx.is_cuda(), "routing_plan: top_k_idx must be a CUDA tensor");
  TORCH_CHECK(top_k_idx.dim() == 2, "routing_plan: top_k_idx must be [T, K], got ", top_k_idx.sizes());
  TORCH_CHECK(at::isIntegralType(top_k_idx.scalar_type(), /*includeBool=*/false),
              "routing_plan: top_k_idx must be an integer tensor, got ", top_k_idx.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= kRoutingMaxExperts, "routing_plan: need 1 <= num_experts <= ",
              kRoutingMaxExperts, ", got ", num_experts);
  const c10::cuda::CUDAGuard guard(top_k_idx.device());
  const auto ids = top_k_idx.to(at::kLong).contiguous().view(-1);
  const int64_t num_slots = ids.numel();
  const auto options = top_k_idx.options().dtype(at::kLong);
  auto expert_counts = at::empty({num_experts}, options);
  auto expert_offsets = at::empty({num_experts + 1}, options);
  auto sorted_slots = at::empty({num_slots}, options);
  auto slot_rows = at::empty({num_slots}, options);
  auto workspace = at::empty({(num_experts + 1) * routing_num_chunks(num_slots)}, options);
  check_launch(launch_routing_plan(ids.const_data_ptr<int64_t>(), num_slots, num_experts,
                                   workspace.data_ptr<int64_t>(), expert_counts.data_ptr<int64_t>(),
                                   expert_offsets.data_ptr<int64_t>(), sorted_slots.data_ptr<int64_t>(),
                                   slot_rows.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()),
               "routing_plan");
  return {expert_counts, expert_offsets, sorted_slots, slot_rows};
}

}  // namespace
}  // namespace cumo_cuda

TORCH_LIBRARY_FRAGMENT(cumo_cuda, m) {
  m.def("topk_gating(Tensor logits, int top_k, bool normalize) -> (Tensor, Tensor)");
  m.def("routing_plan(Tensor top_k_idx, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cumo_cuda, CUDA, m) {
  m.impl("topk_gating", &cumo_cuda::topk_gating_cuda);
  m.impl("routing_plan", &cumo_cuda::routing_plan_cuda);
}

// `import moe_kernels._cuda` only has to load this library: the ops register themselves above.
extern "C" PyMODINIT_FUNC PyInit__cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda", "CUDA ops of cumo-moe (torch.ops.cumo_cuda)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
