// Routing plan on device: a stable counting sort of the N = T*K slots by expert.
// E experts; bucket E collects dropped slots (ids outside [0, E)). Three kernels, no host sync,
// grid sizes from N and E only (CUDA-graph capturable), deterministic (no global atomics):
//   1. chunk_histogram: one warp per chunk of kRoutingChunkSlots slots counts its buckets in shared
//      memory (warp match + popcount, one leader add per bucket and tile) -> workspace[b][chunk].
//   2. scan: one block; per bucket, an exclusive scan over chunks (one warp per bucket); then the
//      bucket starts are added -> row base per chunk.
//   3. scatter: each warp re-reads its chunk in slot order; a slot's row is its chunk's base plus the
//      earlier slots of the same bucket (earlier tiles: running counter; same tile: lower lanes).
// Stable: within a bucket, rows follow slot order, the same as moe_kernels.routing.build_routing_plan.
#include "common/gating.h"
#include "cuda/launchers.h"

namespace cumo_cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kTilesPerChunk = static_cast<int>(kRoutingChunkSlots / kWarpSize);
constexpr int kScanThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;
// A tail lane past N takes this bucket: it matches no real bucket and is skipped.
constexpr int64_t kNoBucket = -1;

static_assert(kRoutingChunkSlots % kWarpSize == 0, "a chunk is a whole number of warp tiles");
static_assert(kWarpsPerBlock * (kRoutingMaxExperts + 1) * sizeof(int) <= 48 * 1024,
              "per-warp counters fit the default dynamic shared memory");

__device__ __forceinline__ int64_t slot_bucket(const int64_t* top_k_idx, int64_t slot, int64_t num_slots,
                                               int64_t num_experts) {
  return slot < num_slots ? cumo::expert_bucket(top_k_idx[slot], num_experts) : kNoBucket;
}

// The chunk of slots the calling warp handles (one warp per chunk, kWarpsPerBlock per block).
__device__ __forceinline__ int64_t warp_chunk() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
}

// The calling warp's E + 1 bucket counters in the block's shared memory, zeroed (warp-synchronous).
__device__ __forceinline__ int* zeroed_warp_counters(int* counters, int64_t num_experts) {
  int* running = counters + (threadIdx.x / kWarpSize) * (num_experts + 1);
  for (int64_t b = threadIdx.x % kWarpSize; b <= num_experts; b += kWarpSize) running[b] = 0;
  __syncwarp();
  return running;
}

__global__ void chunk_histogram_kernel(const int64_t* __restrict__ top_k_idx, int64_t num_slots,
                                       int64_t num_experts, int64_t num_chunks, int64_t* __restrict__ workspace) {
  extern __shared__ int counters[];  // [kWarpsPerBlock][E + 1]
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunk = warp_chunk();
  if (chunk >= num_chunks) return;  // whole warp
  int* running = zeroed_warp_counters(counters, num_experts);
  for (int tile = 0; tile < kTilesPerChunk; ++tile) {
    const int64_t slot = chunk * kRoutingChunkSlots + tile * kWarpSize + lane;
    const int64_t bucket = slot_bucket(top_k_idx, slot, num_slots, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, bucket);
    if (bucket != kNoBucket && lane == __ffs(peers) - 1) running[bucket] += __popc(peers);
    __syncwarp();
  }
  for (int64_t b = lane; b <= num_experts; b += kWarpSize) workspace[b * num_chunks + chunk] = running[b];
}

__global__ void scan_kernel(int64_t* __restrict__ workspace, int64_t num_chunks, int64_t num_experts,
                            int64_t* __restrict__ expert_counts,
                            int64_t* __restrict__ expert_offsets) {
  __shared__ int64_t bucket_totals[kRoutingMaxExperts + 1];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  for (int64_t b = warp; b <= num_experts; b += num_warps) {
    int64_t* counts = workspace + b * num_chunks;
    int64_t carry = 0;
    for (int64_t first = 0; first < num_chunks; first += kWarpSize) {
      const int64_t c = first + lane;
      const int64_t value = c < num_chunks ? counts[c] : 0;
      int64_t inclusive = value;
      for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const int64_t up = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += up;
      }
      if (c < num_chunks) counts[c] = carry + inclusive - value;
      carry += __shfl_sync(kFullMask, inclusive, kWarpSize - 1);
    }
    if (lane == 0) bucket_totals[b] = carry;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t start = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t count = bucket_totals[e];
      expert_counts[e] = count;
      expert_offsets[e] = start;
      bucket_totals[e] = start;
      start += count;
    }
    expert_offsets[num_experts] = start;
    bucket_totals[num_experts] = start;
  }
  __syncthreads();
  for (int64_t b = warp; b <= num_experts; b += num_warps) {
    for (int64_t c = lane; c < num_chunks; c += kWarpSize) workspace[b * num_chunks + c] += bucket_totals[b];
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ top_k_idx, int64_t num_slots, int64_t num_experts,
                               int64_t num_chunks, const int64_t* __restrict__ workspace,
                               int64_t* __restrict__ sorted_slots, int64_t* __restrict__ slot_rows) {
  extern __shared__ int counters[];  // [kWarpsPerBlock][E + 1]
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunk = warp_chunk();
  if (chunk >= num_chunks) return;  // whole warp
  int* running = zeroed_warp_counters(counters, num_experts);
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int tile = 0; tile < kTilesPerChunk; ++tile) {
    const int64_t slot = chunk * kRoutingChunkSlots + tile * kWarpSize + lane;
    const int64_t bucket = slot_bucket(top_k_idx, slot, num_slots, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, bucket);
    if (bucket != kNoBucket) {
      const int64_t row = workspace[bucket * num_chunks + chunk] + running[bucket] + __popc(peers & lower_lanes);
      sorted_slots[row] = slot;
      slot_rows[slot] = row;
    }
    __syncwarp();  // every lane has read running[bucket] before its leader moves it on
    if (bucket != kNoBucket && lane == __ffs(peers) - 1) running[bucket] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

cudaError_t launch_routing_plan(const int64_t* top_k_idx, int64_t num_slots, int64_t num_experts,
                                int64_t* workspace, int64_t* expert_counts,
                                int64_t* expert_offsets, int64_t* sorted_slots, int64_t* slot_rows,
                                cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kRoutingMaxExperts) return cudaErrorInvalidValue;
  if (num_slots == 0) {
    cudaError_t err = cudaMemsetAsync(expert_counts, 0, num_experts * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(expert_offsets, 0, (num_experts + 1) * sizeof(int64_t), stream);
  }
  const int64_t num_chunks = routing_num_chunks(num_slots);
  const int64_t blocks = (num_chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  const size_t counter_bytes = kWarpsPerBlock * (num_experts + 1) * sizeof(int);
  chunk_histogram_kernel<<<grid, kWarpsPerBlock * kWarpSize, counter_bytes, stream>>>(
      top_k_idx, num_slots, num_experts, num_chunks, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_kernel<<<1, kScanThreads, 0, stream>>>(workspace, num_chunks, num_experts, expert_counts,
                                              expert_offsets);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scatter_kernel<<<grid, kWarpsPerBlock * kWarpSize, counter_bytes, stream>>>(
      top_k_idx, num_slots, num_experts, num_chunks, workspace, sorted_slots, slot_rows);
  return cudaGetLastError();
}

}  // namespace cumo_cuda
