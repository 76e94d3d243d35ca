// Sparse expert MLP on CPU, forward and backward, for a given routing.
//
// T tokens, D input features, H1 first-layer rows (H, or 2H with GLU: gate and up rows, see activation.h),
// H hidden, O output features, E experts, K = top_k, N = T*K rows in expert-sorted order.
//
// Forward, per expert e owning rows [r0, r1) of the routing plan:
//   gather x rows -> [m, D]; hidden = x_rows @ w1[e]^T + b1[e] -> [m, H1] (saved for backward);
//   act -> [m, H] (one pass over hidden in row tiles, in opmath, GLU's product fused, rounded once);
//   out_rows[r0:r1] = act @ w2[e]^T + b2[e] -> [m, O];
// then y[t] = sum_k w[t,k] * out_rows[row(t,k)] in fp32 (fp64 for fp64), fixed k order: no atomics
// (token_rows.h). An expert with at most kSmallGemmMaxRows rows skips ATen: small_expert_forward.
// Backward recomputes the activation from the saved hidden; d(router weight) of a row is
// <dy[t] @ w2[e], act_row> + <dy[t], b2[e]>, so the second GEMM's output is never stored.
// Each expert is handled by exactly one thread (its weight gradients need no reduction); an expert
// too big to balance runs alone with every thread inside its GEMMs (for_each_expert, expert_schedule.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "expert_schedule.h"
#include "routing.h"
#include "small_gemm.h"
#include "token_rows.h"

namespace cumo {
namespace {

// Consecutive named spans for torch.profiler (python -m benchmarks.phases): next() ends the current
// span and starts the next, the destructor ends the last. A thread-local check when no profiler runs.
class Phases {
 public:
  explicit Phases(const char* first) { next(first); }
  void next(const char* name) {
    span_.reset();
    span_.emplace(at::RecordScope::USER_SCOPE);
    if (span_->isActive()) span_->before(name);
  }

 private:
  std::optional<at::RecordFunction> span_;
};

at::ScalarType opmath_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// out = a @ weight^T (+ bias), written into out; a handful of rows take the weight-streaming kernel.
void linear_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (small_linear(out, a, weight, bias)) return;
  if (bias.has_value()) at::addmm_out(out, *bias, a, weight.t());
  else at::mm_out(out, a, weight.t());
}

std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
}

struct Problem {
  int64_t tokens, top_k, d_in, h1, hidden, d_out, experts;
};

// Pointer to expert e's [rows, cols] block of a [E, rows, cols] tensor (or e's row of a bias [E, cols]).
template <typename T>
const T* expert_block(const at::Tensor& t, int64_t e) {
  return t.const_data_ptr<T>() + e * t.stride(0);
}

// Whether an expert with m rows takes the small path below: a handful of rows, unit-stride weight rows.
bool small_path_applies(int64_t m, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2) {
  auto unit_rows = [](const at::Tensor& t) { return t.stride(-1) == 1; };
  return m <= kSmallGemmMaxRows && small_gemm_supported(w1.scalar_type()) && unit_rows(w1) && unit_rows(w2) &&
         (!b1 || unit_rows(*b1)) && (!b2 || unit_rows(*b2));
}

// The forward of one expert that owns a handful of rows (decode, small batches), on raw pointers:
// the token rows are read in place by the weight-streaming kernel (no gathered copy), the first
// layer's output is rounded to the dtype (as the ATen path stores it), the activation and GLU product
// run in fp32 and round once, and the second layer writes the expert-sorted output rows. No ATen
// call per expert: at a few rows per expert the per-call costs would rival the weight reads.
template <typename T>
void small_expert_forward(const Problem& p, const T* x, const int64_t* slots, int64_t m, const T* w1, int64_t ldw1,
                          const T* b1, const T* w2, int64_t ldw2, const T* b2, Activation act, const Glu& glu,
                          T* hidden_rows, T* out_rows) {
  const T* rows[kSmallGemmMaxRows];
  for (int64_t i = 0; i < m; ++i) rows[i] = x + (slots[i] / p.top_k) * p.d_in;
  std::vector<float> h(m * p.h1);
  small_rows_linear<T>(rows, m, p.d_in, w1, ldw1, b1, p.h1, h.data());
  for (float& v : h) v = static_cast<float>(static_cast<T>(v));
  if (hidden_rows != nullptr)
    for (int64_t i = 0; i < m * p.h1; ++i) hidden_rows[i] = static_cast<T>(h[i]);
  std::vector<T> a(m * p.hidden);
  const T* a_rows[kSmallGemmMaxRows];
  for (int64_t i = 0; i < m; ++i) {
    const float* hi = h.data() + i * p.h1;
    T* ai = a.data() + i * p.hidden;
    if (!glu.gated()) {
      for (int64_t c = 0; c < p.hidden; ++c) ai[c] = static_cast<T>(activation_scalar(hi[c], act));
    } else if (glu.plain()) {
      for (int64_t c = 0; c < p.hidden; ++c) ai[c] = static_cast<T>(activation_scalar(hi[c], act) * hi[p.hidden + c]);
    } else {
      for (int64_t c = 0; c < p.hidden; ++c)
        ai[c] = static_cast<T>(glu_scalar(hi[glu.gate_col(c)], hi[glu.up_col(c, p.hidden)], act, glu));
    }
    a_rows[i] = ai;
  }
  std::vector<float> out(m * p.d_out);
  small_rows_linear<T>(a_rows, m, p.hidden, w2, ldw2, b2, p.d_out, out.data());
  for (int64_t i = 0; i < m * p.d_out; ++i) out_rows[i] = static_cast<T>(out[i]);
}

Problem check_problem(const at::Tensor& x, const at::Tensor& top_k_weights, const at::Tensor& top_k_idx,
                      const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const std::optional<at::Tensor>& b2, bool glu) {
  TORCH_CHECK(x.dim() == 2, "x must be [T, D], got ", x.sizes());
  TORCH_CHECK(top_k_idx.dim() == 2 && top_k_idx.size(0) == x.size(0), "top_k_idx must be [T, K], got ",
              top_k_idx.sizes());
  TORCH_CHECK(!at::isFloatingType(top_k_idx.scalar_type()) && !at::isComplexType(top_k_idx.scalar_type()),
              "top_k_idx must hold integer expert ids");
  TORCH_CHECK(top_k_weights.sizes() == top_k_idx.sizes(), "top_k_weights ", top_k_weights.sizes(),
              " must match top_k_idx ", top_k_idx.sizes());
  TORCH_CHECK(at::isFloatingType(top_k_weights.scalar_type()), "top_k_weights must be floating point");
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "w1 must be [E, H1, D] and w2 [E, O, H]");
  Problem p{x.size(0), top_k_idx.size(1), x.size(1), w1.size(1), w2.size(2), w2.size(1), w1.size(0)};
  TORCH_CHECK(w1.size(2) == p.d_in, "w1 ", w1.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(w2.size(0) == p.experts, "w1 and w2 disagree on the number of experts");
  TORCH_CHECK(p.h1 == (glu ? 2 * p.hidden : p.hidden), "w1 has ", p.h1, " rows, expected ",
              glu ? "2*" : "", p.hidden, " (w2's hidden size", glu ? ", GLU)" : ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point");
  for (const at::Tensor* t : {&w1, &w2}) TORCH_CHECK(t->scalar_type() == x.scalar_type(), "weights must have x's dtype");
  if (b1) TORCH_CHECK(b1->sizes() == at::IntArrayRef({p.experts, p.h1}) && b1->scalar_type() == x.scalar_type(),
                      "b1 must be [E, H1] in x's dtype, got ", b1->sizes());
  if (b2) TORCH_CHECK(b2->sizes() == at::IntArrayRef({p.experts, p.d_out}) && b2->scalar_type() == x.scalar_type(),
                      "b2 must be [E, O] in x's dtype, got ", b2->sizes());
  TORCH_CHECK(p.top_k >= 1 && p.experts >= 1, "top_k_idx must be [T, K] with K >= 1 and w1 [E, H1, D] with E >= 1");
  for (const at::Tensor* t : {&x, &top_k_weights, &top_k_idx, &w1, &w2})
    TORCH_CHECK(t->device().is_cpu(), "cumo CPU ops take CPU tensors, got one on ", t->device());
  for (const std::optional<at::Tensor>* b : {&b1, &b2})
    if (*b) TORCH_CHECK((*b)->device().is_cpu(), "cumo CPU ops take CPU tensors, got a bias on ", (*b)->device());
  return p;
}

// Returns (y [T, O], hidden [N, H1] pre-activation per row or [0, H1]). save_hidden=False (inference)
// skips the hidden buffer; backward then recomputes it (one more GEMM per expert).
std::tuple<at::Tensor, at::Tensor> expert_mlp_forward(
    const at::Tensor& x_in, const at::Tensor& top_k_weights, const at::Tensor& top_k_idx, const at::Tensor& w1_in,
    const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in,
    c10::string_view activation, int64_t glu_code, bool glu_interleaved, double glu_a, double glu_b,
    bool save_hidden) {
  // Detached views: nothing inside needs autograd, whatever dispatch state a worker thread has.
  const at::Tensor w1 = w1_in.detach(), w2 = w2_in.detach();
  const std::optional<at::Tensor> b1 = detached(b1_in), b2 = detached(b2_in);
  const Glu glu = parse_glu(glu_code, glu_interleaved, glu_a, glu_b);
  const Problem p = check_problem(x_in, top_k_weights, top_k_idx, w1, b1, w2, b2, glu.gated());
  const Activation act = parse_activation(activation);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.detach().contiguous();
  const at::Tensor ids = top_k_idx.to(at::kLong).contiguous();
  const at::Tensor scale = top_k_weights.detach().to(opmath_dtype(x.scalar_type())).contiguous();
  Phases phase("cumo::routing_plan");
  const RoutingPlan plan = build_routing_plan(ids, p.experts);
  phase.next("cumo::experts");
  const int64_t n = p.tokens * p.top_k;
  const int64_t* offsets = plan.offsets.const_data_ptr<int64_t>();
  const int64_t* sorted_slots = plan.sorted_slots.const_data_ptr<int64_t>();

  at::Tensor hidden = at::empty({save_hidden ? n : 0, p.h1}, x.options());
  at::Tensor out_rows = at::empty({n, p.d_out}, x.options());
  const int64_t elem = x.element_size();
  ThreadScratch scratch({p.d_in * elem, p.h1 * elem, p.hidden * elem});
  for_each_expert(offsets, p.experts, [&](int64_t e, int64_t r0, int64_t r1) {
    const int64_t m = r1 - r0;
    if (small_path_applies(m, w1, b1, w2, b2)) {
      const Phases phase("cumo::small_expert");
      auto run = [&](auto zero) {
        using T = decltype(zero);
        small_expert_forward<T>(p, x.const_data_ptr<T>(), sorted_slots + r0, m, expert_block<T>(w1, e), w1.stride(1),
                                b1 ? expert_block<T>(*b1, e) : nullptr, expert_block<T>(w2, e), w2.stride(1),
                                b2 ? expert_block<T>(*b2, e) : nullptr, act, glu,
                                save_hidden ? hidden.mutable_data_ptr<T>() + r0 * p.h1 : nullptr,
                                out_rows.mutable_data_ptr<T>() + r0 * p.d_out);
      };
      if (x.scalar_type() == at::kFloat) run(float{});
      else run(c10::BFloat16{});
      return;
    }
    Phases phase("cumo::gather_rows");
    ThreadScratch::Arena arena = scratch.arena(m);
    at::Tensor x_rows = arena.take(m, p.d_in, x.scalar_type());
    gather_token_rows(x_rows, x, sorted_slots + r0, m, p.top_k);
    phase.next("cumo::fc1");
    at::Tensor h = save_hidden ? hidden.narrow(0, r0, m) : arena.take(m, p.h1, x.scalar_type());
    linear_into(h, x_rows, w1[e], b1 ? std::optional<at::Tensor>((*b1)[e]) : std::nullopt);
    phase.next("cumo::activation");
    at::Tensor out = out_rows.narrow(0, r0, m);
    at::Tensor a = arena.take(m, p.hidden, x.scalar_type());
    activation_forward_rows(h, act, glu, a);
    phase.next("cumo::fc2");
    linear_into(out, a, w2[e], b2 ? std::optional<at::Tensor>((*b2)[e]) : std::nullopt);
  });
  scratch.release();
  phase.next("cumo::combine");
  if (save_hidden) hidden.narrow(0, offsets[p.experts], n - offsets[p.experts]).zero_();
  at::Tensor y = combine(out_rows, plan, scale, ids, p.experts);
  return {y, hidden};
}

// Returns (grad_x [T, D], grad_top_k_weights [T, K], grad_w1, grad_b1, grad_w2, grad_b2); grad_x is [0] unless
// grad_input, the parameter gradients are [0] unless grad_params (and the bias gradients without a bias).
// The routing plan is rebuilt from top_k_idx (a counting sort, O(T*K)), not taken from the caller: this op
// is callable directly, and a plan it trusted could point outside every buffer.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& top_k_weights, const at::Tensor& top_k_idx,
    const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in,
    const std::optional<at::Tensor>& b2_in, const at::Tensor& hidden_in, c10::string_view activation,
    int64_t glu_code, bool glu_interleaved, double glu_a, double glu_b, bool grad_input, bool grad_params) {
  const at::Tensor w1 = w1_in.detach(), w2 = w2_in.detach(), hidden = hidden_in.detach().contiguous();
  const std::optional<at::Tensor> b1 = detached(b1_in), b2 = detached(b2_in);
  const Glu glu = parse_glu(glu_code, glu_interleaved, glu_a, glu_b);
  const Problem p = check_problem(x_in, top_k_weights, top_k_idx, w1, b1, w2, b2, glu.gated());
  const Activation act = parse_activation(activation);
  const int64_t n = p.tokens * p.top_k;
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({p.tokens, p.d_out}), "grad_y must be [T, O], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device().is_cpu() && hidden.device().is_cpu(), "cumo CPU ops take CPU tensors");
  TORCH_CHECK(at::isFloatingType(grad_y.scalar_type()), "grad_y must be floating point, got ", grad_y.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == x_in.scalar_type(), "hidden must have x's dtype");
  const bool recompute = hidden.size(0) == 0;  // forward ran with save_hidden=False
  TORCH_CHECK((recompute || hidden.size(0) == n) && hidden.size(1) == p.h1,
              "hidden must be the [T*K, H1] (or [0, H1]) tensor of expert_mlp_forward, got ", hidden.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dtype = x_in.scalar_type();
  const auto acc_dtype = opmath_dtype(dtype);
  const at::Tensor x = x_in.detach().contiguous();
  const at::Tensor dy = grad_y.detach().to(dtype).contiguous();
  const at::Tensor ids = top_k_idx.to(at::kLong).contiguous();
  const at::Tensor scale = top_k_weights.detach().to(acc_dtype).contiguous();
  const RoutingPlan plan = build_routing_plan(ids, p.experts);
  const int64_t* offsets = plan.offsets.const_data_ptr<int64_t>();
  const int64_t* sorted_slots = plan.sorted_slots.const_data_ptr<int64_t>();

  auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one each: outputs must not alias
  at::Tensor grad_w1 = grad_params ? at::empty({p.experts, p.h1, p.d_in}, x.options()) : none();
  at::Tensor grad_w2 = grad_params ? at::empty({p.experts, p.d_out, p.hidden}, x.options()) : none();
  at::Tensor grad_b1 = grad_params && b1 ? at::empty({p.experts, p.h1}, x.options()) : none();
  at::Tensor grad_b2 = grad_params && b2 ? at::empty({p.experts, p.d_out}, x.options()) : none();
  at::Tensor grad_x_rows = at::empty({grad_input ? n : 0, p.d_in}, x.options());  // only kept rows written/read
  at::Tensor grad_scale_rows = at::empty({n}, scale.options());                    // per expert-sorted row
  for (int64_t e = 0; grad_params && e < p.experts; ++e) {
    if (offsets[e + 1] > offsets[e]) continue;  // experts with no rows get zero gradients
    grad_w1[e].zero_();
    grad_w2[e].zero_();
    if (b1) grad_b1[e].zero_();
    if (b2) grad_b2[e].zero_();
  }
  const at::Tensor scale_flat = scale.view({-1});
  const int64_t elem = x.element_size();
  ThreadScratch scratch({p.d_out * elem, p.hidden * elem, p.d_in * elem, p.h1 * elem, p.hidden * elem, p.h1 * elem,
                         p.d_out * elem});
  for_each_expert(offsets, p.experts, [&](int64_t e, int64_t r0, int64_t r1) {
    const int64_t m = r1 - r0;
    Phases phase("cumo::gather_rows");
    ThreadScratch::Arena arena = scratch.arena(m);
    const at::Tensor slots = plan.sorted_slots.narrow(0, r0, m);
    const at::Tensor row_scale = scale_flat.index_select(0, slots).unsqueeze(1);  // [m, 1]
    at::Tensor dy_rows = arena.take(m, p.d_out, dtype);  // [m, O], unscaled
    gather_token_rows(dy_rows, dy, sorted_slots + r0, m, p.top_k);
    at::Tensor x_rows = arena.take(m, p.d_in, dtype);
    gather_token_rows(x_rows, x, sorted_slots + r0, m, p.top_k);
    phase.next("cumo::bwd_fc2_dgrad");
    at::Tensor grad_act = arena.take(m, p.hidden, dtype);  // [m, H] unscaled, in dtype like the dense backward
    at::mm_out(grad_act, dy_rows, w2[e]);
    at::Tensor h;
    if (recompute) {
      phase.next("cumo::fc1");
      h = arena.take(m, p.h1, dtype);
      linear_into(h, x_rows, w1[e], b1 ? std::optional<at::Tensor>((*b1)[e]) : std::nullopt);
    } else {
      h = hidden.narrow(0, r0, m);
    }
    // Activation backward and d(scale) in cache-sized row tiles (opmath inside, dtype outside).
    phase.next("cumo::bwd_activation");
    at::Tensor act_out = arena.take(m, p.hidden, dtype);
    at::Tensor grad_h_lp = arena.take(m, p.h1, dtype);
    at::Tensor d_scale = grad_scale_rows.narrow(0, r0, m);
    at::Tensor grad_b1_acc = grad_params && b1 ? at::zeros({p.h1}, scale.options()) : at::Tensor();
    activation_backward_rows(h, grad_act, row_scale.view({-1}), act, glu, act_out, grad_h_lp, d_scale, grad_b1_acc);
    if (b2) d_scale.add_(at::mv(dy_rows.to(acc_dtype), (*b2)[e].to(acc_dtype)));
    if (grad_params) {
      phase.next("cumo::bwd_wgrad");
      // dL/d(expert output row) [m, O]: the product in opmath, rounded once to dtype for the GEMM
      at::Tensor d_out_rows = arena.take(m, p.d_out, dtype);
      at::mul_out(d_out_rows, dy_rows, row_scale);
      if (b2) grad_b2[e].copy_(at::mm(row_scale.t(), dy_rows.to(acc_dtype)).view({-1}));
      at::Tensor gw2 = grad_w2[e];
      at::mm_out(gw2, d_out_rows.t(), act_out);
      if (b1) grad_b1[e].copy_(grad_b1_acc);
      at::Tensor gw1 = grad_w1[e];
      at::mm_out(gw1, grad_h_lp.t(), x_rows);
    }
    if (grad_input) {
      phase.next("cumo::bwd_fc1_dgrad");
      at::Tensor gx = grad_x_rows.narrow(0, r0, m);
      at::mm_out(gx, grad_h_lp, w1[e]);
    }
  });
  scratch.release();
  const Phases output_phase("cumo::combine");
  const at::Tensor grad_x = grad_input ? combine(grad_x_rows, plan, at::Tensor(), ids, p.experts) : none();
  // d(weight)[slot] = grad_scale_rows[row(slot)] for kept slots, 0 for dropped ones.
  at::Tensor grad_scale = at::zeros({p.tokens, p.top_k}, scale.options());
  const int64_t kept = offsets[p.experts];
  grad_scale.view({-1}).index_copy_(0, plan.sorted_slots.narrow(0, 0, kept), grad_scale_rows.narrow(0, 0, kept));
  return {grad_x, grad_scale.to(top_k_weights.scalar_type()), grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cumo, m) {
  m.def(
      "expert_mlp_forward(Tensor x, Tensor top_k_weights, Tensor top_k_idx, Tensor w1, Tensor? b1, Tensor w2, "
      "Tensor? b2, str activation, int glu, bool glu_interleaved, float glu_a, float glu_b, bool save_hidden) -> "
      "(Tensor, Tensor)");
  m.def(
      "expert_mlp_backward(Tensor grad_y, Tensor x, Tensor top_k_weights, Tensor top_k_idx, Tensor w1, Tensor? b1, "
      "Tensor w2, Tensor? b2, Tensor hidden, str activation, int glu, bool glu_interleaved, float glu_a, "
      "float glu_b, bool grad_input, bool grad_params) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cumo, CPU, m) {
  m.impl("expert_mlp_forward", &expert_mlp_forward);
  m.impl("expert_mlp_backward", &expert_mlp_backward);
}

}  // namespace cumo
