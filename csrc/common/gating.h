// Per-element helpers of top-k softmax gating and routing, shared by the CPU and CUDA builds.
//
// E experts, K = top_k. Everything here is plain arithmetic on scalars, marked CUMO_HOST_DEVICE so
// that the CPU extension (gating.cpp) and the CUDA kernels (csrc/cuda) run the very same rules:
//   - probabilities are softmax in fp32: exp(x - max) / sum, with max and sum over the row;
//   - the selection order is (probability descending, expert id ascending): ties go to the lower id,
//     as torch.topk does on the reference's inputs;
//   - an expert id outside [0, E) is a dropped slot and goes to bucket E.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define CUMO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CUMO_HOST_DEVICE inline
#endif

namespace cumo {

// Bucket of one slot in the routing sort: its expert, or E when the id is dropped.
CUMO_HOST_DEVICE int64_t expert_bucket(int64_t expert_id, int64_t num_experts) {
  return (expert_id >= 0 && expert_id < num_experts) ? expert_id : num_experts;
}

// acc_t is the accumulation type: float, or double for float64 logits (exact gradient checks).
CUMO_HOST_DEVICE float exp_f32(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);  // the accurate expf, not __expf: weights must match the fp32 reference to 1e-5
#else
  return std::exp(x);
#endif
}

CUMO_HOST_DEVICE double exp_f32(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// Softmax probability of one logit, given the row max and the reciprocal of sum(exp(x - max)).
template <typename acc_t>
CUMO_HOST_DEVICE acc_t softmax_prob(acc_t logit, acc_t row_max, acc_t inv_row_sum) {
  return exp_f32(logit - row_max) * inv_row_sum;
}

// True when candidate a = (prob_a, id_a) is selected before b: higher probability, then lower id.
template <typename acc_t>
CUMO_HOST_DEVICE bool ranks_before(acc_t prob_a, int64_t id_a, acc_t prob_b, int64_t id_b) {
  return prob_a > prob_b || (prob_a == prob_b && id_a < id_b);
}

// The k best candidates so far as a binary heap whose root ranks last (the one a better candidate
// evicts): O(log k) per candidate, O(E log k) per row for any k. `sort_heap` then puts them in
// selection order.
template <typename acc_t>
CUMO_HOST_DEVICE void heap_swap(acc_t* weights, int64_t* ids, int64_t a, int64_t b) {
  const acc_t w = weights[a];
  weights[a] = weights[b];
  weights[b] = w;
  const int64_t i = ids[a];
  ids[a] = ids[b];
  ids[b] = i;
}

template <typename acc_t>
CUMO_HOST_DEVICE void heap_sift_down(acc_t* weights, int64_t* ids, int64_t size, int64_t pos) {
  for (;;) {
    int64_t last = pos;  // the one of pos and its children that ranks last
    for (int64_t child = 2 * pos + 1; child <= 2 * pos + 2 && child < size; ++child)
      if (ranks_before(weights[last], ids[last], weights[child], ids[child])) last = child;
    if (last == pos) return;
    heap_swap(weights, ids, pos, last);
    pos = last;
  }
}

// Offers (prob, id) to a heap holding `filled` of at most k entries; returns the new fill count.
template <typename acc_t>
CUMO_HOST_DEVICE int64_t heap_offer(acc_t* weights, int64_t* ids, int64_t filled, int64_t k, acc_t prob, int64_t id) {
  if (filled < k) {
    int64_t pos = filled;
    weights[pos] = prob;
    ids[pos] = id;
    while (pos > 0 && ranks_before(weights[(pos - 1) / 2], ids[(pos - 1) / 2], weights[pos], ids[pos])) {
      heap_swap(weights, ids, pos, (pos - 1) / 2);
      pos = (pos - 1) / 2;
    }
    return filled + 1;
  }
  if (ranks_before(prob, id, weights[0], ids[0])) {
    weights[0] = prob;
    ids[0] = id;
    heap_sift_down(weights, ids, k, 0);
  }
  return filled;
}

// Heap -> selection order (best first), in place.
template <typename acc_t>
CUMO_HOST_DEVICE void sort_heap(acc_t* weights, int64_t* ids, int64_t size) {
  for (int64_t end = size - 1; end > 0; --end) {
    heap_swap(weights, ids, 0, end);  // the last-ranked of [0, end] goes to the back
    heap_sift_down(weights, ids, end, 0);
  }
}

// A row with a NaN or infinite logit has NaN probabilities (softmax's sum is NaN), which rank
// nowhere. Every backend gives such a token the ids 0..k-1 (what the reference's stable sort gives)
// and NaN weights: its output is NaN, its ids stay in [0, E), no other token is affected.
template <typename acc_t>
CUMO_HOST_DEVICE bool is_poisoned(acc_t row_sum) {
  return !(row_sum == row_sum) || row_sum == acc_t(INFINITY);
}

template <typename acc_t>
CUMO_HOST_DEVICE void fill_poisoned(acc_t* weights, int64_t* ids, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = acc_t(NAN);
    ids[i] = i;
  }
}

// Divides the k selected weights by their sum (summed in selection order), as the reference does.
template <typename acc_t>
CUMO_HOST_DEVICE void renormalize(acc_t* weights, int64_t k) {
  acc_t total = 0;
  for (int64_t i = 0; i < k; ++i) total += weights[i];
  for (int64_t i = 0; i < k; ++i) weights[i] = weights[i] / total;
}

// The whole gating of one token row, sequentially: softmax over E logits read through `load(e)`
// (which returns acc_t), top-k selection and optional renormalisation. weights/ids: [k] outputs,
// in selection order. exps: scratch for E values (the exponentials are then computed once, not
// twice), or null; the results are the same bits either way.
template <typename acc_t, typename Load>
CUMO_HOST_DEVICE void topk_softmax_row(Load load, int64_t num_experts, int64_t k, bool normalize,
                                       acc_t* weights, int64_t* ids, acc_t* exps = nullptr) {
  acc_t row_max = load(0);
  for (int64_t e = 1; e < num_experts; ++e) {
    acc_t x = load(e);
    row_max = x > row_max ? x : row_max;
  }
  acc_t row_sum = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const acc_t ex = exp_f32(load(e) - row_max);
    if (exps != nullptr) exps[e] = ex;
    row_sum += ex;
  }
  if (is_poisoned(row_sum)) {
    fill_poisoned(weights, ids, k);
    return;
  }
  const acc_t inv_row_sum = acc_t(1) / row_sum;
  int64_t filled = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    // softmax_prob(load(e), row_max, inv_row_sum), from the stored exponential when there is one
    const acc_t prob = exps != nullptr ? exps[e] * inv_row_sum : softmax_prob(load(e), row_max, inv_row_sum);
    filled = heap_offer(weights, ids, filled, k, prob, e);
  }
  sort_heap(weights, ids, k);
  if (normalize) renormalize(weights, k);
}

}  // namespace cumo
