// Host launchers of the CUDA kernels, on raw pointers: the .cu files include no torch header, so
// they compile with plain nvcc; csrc/cuda/bindings.cpp checks, allocates and calls these.
// T tokens, E experts, K = top_k, N = T*K slots. All indices are 64-bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cumo_cuda {

enum class FloatType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Routing kernels count and scatter in per-warp chunks of this many slots.
constexpr int64_t kRoutingChunkSlots = 256;
// Per-warp shared counters bound E: 4 warps x (E+1) int32 must fit the 48 KiB of static shared memory.
constexpr int64_t kRoutingMaxExperts = 2048;

inline int64_t routing_num_chunks(int64_t num_slots) {
  return (num_slots + kRoutingChunkSlots - 1) / kRoutingChunkSlots;
}

// logits: [T, E] of `dtype` with strides (row_stride, col_stride) -> weights [T, K] fp32, ids [T, K].
cudaError_t launch_topk_gating(const void* logits, FloatType dtype, int64_t num_tokens, int64_t num_experts,
                               int64_t row_stride, int64_t col_stride, int64_t top_k, bool normalize,
                               float* weights, int64_t* ids, cudaStream_t stream);

// top_k_idx: [N] contiguous int64 expert ids (outside [0, E) = dropped).
// workspace: [(E+1) * routing_num_chunks(N)] int64, uninitialised.
// Writes expert_counts [E], expert_offsets [E+1], sorted_slots (every row that holds a slot),
// slot_rows [N].
cudaError_t launch_routing_plan(const int64_t* top_k_idx, int64_t num_slots, int64_t num_experts,
                                int64_t* workspace, int64_t* expert_counts,
                                int64_t* expert_offsets, int64_t* sorted_slots, int64_t* slot_rows,
                                cudaStream_t stream);

}  // namespace cumo_cuda
