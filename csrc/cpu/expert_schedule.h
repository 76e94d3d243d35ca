// How the CPU expert MLP spreads its experts over threads, and the per-thread scratch their
// temporaries come from (used by expert_mlp.cpp, forward and backward alike).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <vector>

namespace cumo {

inline constexpr int64_t kExpertFixedCost = 16;  // per-expert cost (weight reads, calls) in rows, for balancing

// Calls fn(e, r0, r1) once for every expert that owns rows. Every thread pulls whole experts, largest
// first, from a shared counter until none is left: inside a parallel region ATen runs each GEMM on the
// calling thread, which beats splitting every GEMM across threads (no barriers, no shared weight
// panels), and pulling rather than fixed per-thread bins absorbs a thread that runs slower (on this
// 2-core machine one of two threads streaming weights ran 17% slower than the other with
// equal bins). An expert too large to balance (more than a thread's share of the total) runs first,
// alone, its GEMMs on every thread. Which thread runs an expert varies between calls, but each
// expert's work is done by one thread in the same way whichever it is, so results are deterministic.
template <typename F>
void for_each_expert(const int64_t* offsets, int64_t num_experts, const F& fn) {
  auto rows_of = [&](int64_t e) { return offsets[e + 1] - offsets[e]; };
  auto cost_of = [&](int64_t e) { return rows_of(e) + kExpertFixedCost; };
  std::vector<int64_t> small;
  int64_t total = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (rows_of(e) > 0) {
      small.push_back(e);
      total += cost_of(e);
    }
  }
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) { return rows_of(a) > rows_of(b); });
  const int64_t threads = at::get_num_threads();
  size_t first_small = 0;
  for (; threads > 1 && first_small < small.size(); ++first_small) {
    const int64_t e = small[first_small];
    if (cost_of(e) * threads <= total) break;
    fn(e, offsets[e], offsets[e + 1]);
    total -= cost_of(e);
  }
  small.erase(small.begin(), small.begin() + first_small);
  if (threads == 1 || small.size() <= 1) {  // one thread's worth: run here, so the GEMMs may use every thread
    for (int64_t e : small) fn(e, offsets[e], offsets[e + 1]);
    return;
  }
  const int64_t workers = std::min<int64_t>(threads, small.size());
  std::atomic<size_t> next{0};
  // Worker threads take the caller's thread-local state (inference mode, grad mode, dispatch keys),
  // which ATen's parallel_for does not carry, so the ATen calls in fn behave as on the caller.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (size_t i = next.fetch_add(1); i < small.size(); i = next.fetch_add(1)) {
      const int64_t e = small[i];
      fn(e, offsets[e], offsets[e + 1]);
    }
  });
}

// Per-thread scratch for the per-expert temporaries of one call: one ATen allocation per thread,
// reused by every expert the thread runs, instead of three to seven allocations per expert. The
// scratch is sized for the largest expert and allocated through ATen, so memory profiles see it.
class ThreadScratch {
 public:
  // Bump allocator over one slab: tensors taken from it live until the arena is dropped.
  class Arena {
   public:
    explicit Arena(at::Tensor slab) : slab_(std::move(slab)) {}
    // A fresh [rows, cols] tensor of dtype (64-byte aligned).
    at::Tensor take(int64_t rows, int64_t cols, at::ScalarType dtype) {
      const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
      TORCH_CHECK(used_ + bytes <= slab_.numel(), "cumo: expert scratch overflow (", used_ + bytes, " > ",
                  slab_.numel(), " bytes)");
      at::Tensor out = slab_.narrow(0, used_, bytes).view(dtype).view({rows, cols});
      used_ += round_up(bytes);
      return out;
    }

   private:
    at::Tensor slab_;
    int64_t used_ = 0;
  };

  // row_bytes: bytes per expert row of each tensor an expert takes.
  ThreadScratch(std::initializer_list<int64_t> row_bytes) : row_bytes_(row_bytes), slabs_(at::get_num_threads()) {}

  // An empty arena, big enough for an expert of m rows, over the calling thread's slab: call once per
  // expert. The slab grows when a larger expert comes (threads pull the largest experts first, so once per
  // thread in practice). A thread this scratch does not know (a caller already inside its own parallel
  // region) gets a slab of its own.
  Arena arena(int64_t m) {
    int64_t bytes = 0;
    for (int64_t b : row_bytes_) bytes += round_up(m * b);
    const size_t t = at::get_thread_num();
    if (t >= slabs_.size()) return Arena(new_slab(bytes));
    if (!slabs_[t].defined() || slabs_[t].numel() < bytes) slabs_[t] = new_slab(bytes);
    return Arena(slabs_[t]);
  }

  // Frees the slabs (before the combine allocates the output, so the two never add up).
  void release() { slabs_.assign(slabs_.size(), at::Tensor()); }

 private:
  static int64_t round_up(int64_t bytes) { return (bytes + 63) / 64 * 64; }
  static at::Tensor new_slab(int64_t bytes) { return at::empty({bytes}, at::TensorOptions().dtype(at::kByte)); }
  std::vector<int64_t> row_bytes_;
  std::vector<at::Tensor> slabs_;
};

}  // namespace cumo
