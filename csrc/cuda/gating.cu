// Fused top-k softmax gating: logits [T, E] (fp32/fp64/fp16/bf16, any strides)
//   -> weights [T, K] fp32 (softmax in fp32, top-k, optional renormalisation), ids [T, K] int64.
// T tokens, E experts, K = top_k.
// Grid: one warp per token, kWarpsPerBlock tokens per block. Each lane strides over the row's
// logits (read 2 + K times, from L1/L2 after the first); selection is K rounds of a warp argmax
// over the candidates that rank after the previous pick, so nothing is marked or stored and E is
// unbounded. The per-element rules (probability, tie order, renormalisation) are the helpers of
// csrc/common/gating.h, which the CPU op runs too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/gating.h"
#include "cuda/launchers.h"

namespace cumo_cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename scalar_t>
__global__ void topk_gating_kernel(const scalar_t* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                                   int64_t row_stride, int64_t col_stride, int64_t top_k, bool normalize,
                                   float* __restrict__ weights, int64_t* __restrict__ ids) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (token >= num_tokens) return;  // the whole warp leaves together: the shuffles stay full-mask
  const scalar_t* row = logits + token * row_stride;
  auto load = [row, col_stride](int64_t e) { return to_float(row[e * col_stride]); };

  float row_max = -INFINITY;
  for (int64_t e = lane; e < num_experts; e += kWarpSize) row_max = fmaxf(row_max, load(e));
  row_max = warp_max(row_max);
  float row_sum = 0.f;
  for (int64_t e = lane; e < num_experts; e += kWarpSize) row_sum += cumo::exp_f32(load(e) - row_max);
  row_sum = warp_sum(row_sum);
  float* token_weights = weights + token * top_k;
  int64_t* token_ids = ids + token * top_k;
  if (cumo::is_poisoned(row_sum)) {  // fmaxf skips NaN, but the sum does not
    if (lane == 0) cumo::fill_poisoned(token_weights, token_ids, top_k);
    return;
  }
  const float inv_row_sum = 1.f / row_sum;
  // (INFINITY, -1) ranks before every candidate, so round 0 considers all of them.
  float prev_prob = INFINITY;
  int64_t prev_id = -1;
  for (int64_t k = 0; k < top_k; ++k) {
    // (-1, E) ranks after every probability: a lane with no candidate never wins.
    float best_prob = -1.f;
    int64_t best_id = num_experts;
    for (int64_t e = lane; e < num_experts; e += kWarpSize) {
      const float prob = cumo::softmax_prob(load(e), row_max, inv_row_sum);
      if (cumo::ranks_before(prev_prob, prev_id, prob, e) && cumo::ranks_before(prob, e, best_prob, best_id)) {
        best_prob = prob;
        best_id = e;
      }
    }
    // Butterfly argmax: the order is total, so every lane ends with the same winner.
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other_prob = __shfl_xor_sync(kFullMask, best_prob, offset);
      const int64_t other_id = __shfl_xor_sync(kFullMask, best_id, offset);
      if (cumo::ranks_before(other_prob, other_id, best_prob, best_id)) {
        best_prob = other_prob;
        best_id = other_id;
      }
    }
    if (lane == 0) {
      token_weights[k] = best_prob;
      token_ids[k] = best_id;
    }
    prev_prob = best_prob;
    prev_id = best_id;
  }
  if (normalize && lane == 0) cumo::renormalize(token_weights, top_k);
}

template <typename scalar_t>
cudaError_t launch(const void* logits, int64_t num_tokens, int64_t num_experts, int64_t row_stride,
                   int64_t col_stride, int64_t top_k, bool normalize, float* weights, int64_t* ids,
                   cudaStream_t stream) {
  const int64_t blocks = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  topk_gating_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const scalar_t*>(logits), num_tokens, num_experts, row_stride, col_stride, top_k, normalize,
      weights, ids);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_topk_gating(const void* logits, FloatType dtype, int64_t num_tokens, int64_t num_experts,
                               int64_t row_stride, int64_t col_stride, int64_t top_k, bool normalize,
                               float* weights, int64_t* ids, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (top_k < 1 || top_k > num_experts) return cudaErrorInvalidValue;
  if ((num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch<float>(logits, num_tokens, num_experts, row_stride, col_stride, top_k, normalize, weights, ids,
                           stream);
    case FloatType::kFloat64:
      return launch<double>(logits, num_tokens, num_experts, row_stride, col_stride, top_k, normalize, weights,
                            ids, stream);
    case FloatType::kFloat16:
      return launch<__half>(logits, num_tokens, num_experts, row_stride, col_stride, top_k, normalize, weights,
                            ids, stream);
    case FloatType::kBFloat16:
      return launch<__nv_bfloat16>(logits, num_tokens, num_experts, row_stride, col_stride, top_k, normalize,
                                   weights, ids, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cumo_cuda
