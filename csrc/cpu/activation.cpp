// Activation forward/backward for the expert MLP; see activation.h.
#include "activation.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

namespace cumo {
namespace {

constexpr double kQuickGeluAlpha = 1.702;

at::Tensor act_forward(const at::Tensor& x, Activation act) {
  switch (act) {
    case Activation::kGelu: return at::gelu(x);
    case Activation::kGeluTanh: return at::gelu(x, "tanh");
    case Activation::kQuickGelu: return x * at::sigmoid(x * kQuickGeluAlpha);
    case Activation::kSilu: return at::silu(x);
    case Activation::kRelu: return at::relu(x);
  }
  TORCH_CHECK(false, "unreachable activation");
}

// grad * act'(x)
at::Tensor act_backward(const at::Tensor& grad, const at::Tensor& x, Activation act) {
  switch (act) {
    case Activation::kGelu: return at::gelu_backward(grad, x);
    case Activation::kGeluTanh: return at::gelu_backward(grad, x, "tanh");
    case Activation::kQuickGelu: {
      const at::Tensor s = at::sigmoid(x * kQuickGeluAlpha);
      return grad * (s + x * kQuickGeluAlpha * s * (1 - s));
    }
    case Activation::kSilu: return at::silu_backward(grad, x);
    case Activation::kRelu: return at::threshold_backward(grad, x, 0);
  }
  TORCH_CHECK(false, "unreachable activation");
}

// out = act(x), x and out of one dtype; the math in opmath. ATen's kernels for these run in fp32 for
// bf16/fp16 and round once; quick_gelu is composite, so the caller hands it opmath tensors.
void act_forward_out(at::Tensor& out, const at::Tensor& x, Activation act) {
  switch (act) {
    case Activation::kGelu: at::gelu_out(out, x); return;
    case Activation::kGeluTanh: at::gelu_out(out, x, "tanh"); return;
    case Activation::kQuickGelu: at::mul_out(out, x, at::sigmoid(x * kQuickGeluAlpha)); return;
    case Activation::kSilu: at::silu_out(out, x); return;
    case Activation::kRelu: at::clamp_min_out(out, x, 0); return;
  }
  TORCH_CHECK(false, "unreachable activation");
}

// Backward: about 32K elements of each [rows, H1] operand per tile, so the handful of opmath
// temporaries of a tile fit in L2 together. The forward has one opmath temporary of at most
// [rows, H1] (half of it with GLU) and takes 4x larger tiles: fewer ATen calls per expert.
constexpr int64_t kTileElements = 32768;
constexpr int64_t kForwardTileElements = 4 * kTileElements;

int64_t tile_rows_for(int64_t h1, int64_t elements = kTileElements) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(h1, 1));
}

}  // namespace

Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "quick_gelu") return Activation::kQuickGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(false, "unknown activation '", std::string(name),
              "'; expected one of gelu, gelu_tanh, quick_gelu, relu, silu");
}

std::pair<at::Tensor, at::Tensor> activation_backward(const at::Tensor& hidden, const at::Tensor& grad_out,
                                                      Activation act, bool glu) {
  if (!glu) return {act_forward(hidden, act), act_backward(grad_out, hidden, act)};
  const int64_t h = hidden.size(1) / 2;
  const at::Tensor gate = hidden.narrow(1, 0, h);
  const at::Tensor up = hidden.narrow(1, h, h);
  const at::Tensor gate_act = act_forward(gate, act);
  at::Tensor grad_hidden = at::empty_like(hidden);
  at::Tensor grad_up = grad_hidden.narrow(1, h, h);
  at::mul_out(grad_up, grad_out, gate_act);
  grad_hidden.narrow(1, 0, h).copy_(act_backward(grad_out * up, gate, act));
  return {gate_act * up, grad_hidden};
}

void activation_forward_rows(const at::Tensor& hidden, Activation act, bool glu, at::Tensor& act_out) {
  const int64_t m = hidden.size(0), h1 = hidden.size(1);
  if (m == 0) return;
  const auto dtype = hidden.scalar_type();
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // Without GLU and with a native ATen kernel the input dtype goes straight in (its math is opmath);
  // otherwise the tile is widened once and the result rounded once.
  const bool widen = dtype != acc_dtype && (glu || act == Activation::kQuickGelu);
  const int64_t tile_rows = tile_rows_for(h1, kForwardTileElements);
  const int64_t tiles = (m + tile_rows - 1) / tile_rows;
  const at::ThreadLocalState caller_state;
  // Grain 1 tile: parallel over tiles outside a parallel region, inline inside one.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, m - r0);
      const at::Tensor h = hidden.narrow(0, r0, rows);
      const int64_t cols = glu ? h1 / 2 : h1;
      const at::Tensor gate = glu ? h.narrow(1, 0, cols) : h;
      at::Tensor out = act_out.narrow(0, r0, rows);
      // Opmath result: straight into act_out, or in place in a widened tile that is rounded once into it
      // (the GLU product widens up as it multiplies).
      at::Tensor a = widen ? gate.to(acc_dtype) : out;
      act_forward_out(a, widen ? a : gate, act);
      if (glu) a.mul_(h.narrow(1, cols, cols));
      if (widen) out.copy_(a);
    }
  });
}

void activation_backward_rows(const at::Tensor& hidden, const at::Tensor& grad_act, const at::Tensor& row_scale,
                              Activation act, bool glu, at::Tensor& act_out, at::Tensor& grad_hidden,
                              at::Tensor& d_scale, at::Tensor& grad_bias) {
  const int64_t m = hidden.size(0), h1 = hidden.size(1);
  if (m == 0) return;
  const auto acc_dtype = row_scale.scalar_type();
  const int64_t tile_rows = tile_rows_for(h1);
  const int64_t tiles = (m + tile_rows - 1) / tile_rows;
  // Per-tile column sums, added in tile order afterwards: the bias gradient does not depend on the schedule.
  at::Tensor bias_parts = grad_bias.defined() ? at::empty({tiles, h1}, grad_bias.options()) : at::Tensor();
  const at::ThreadLocalState caller_state;
  // Grain 1 tile: parallel over tiles outside a parallel region, inline inside one.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, m - r0);
      const at::Tensor h = hidden.narrow(0, r0, rows).to(acc_dtype);
      const at::Tensor g = grad_act.narrow(0, r0, rows).to(acc_dtype);
      auto [a, gh] = activation_backward(h, g * row_scale.narrow(0, r0, rows).unsqueeze(1), act, glu);
      at::Tensor ds = d_scale.narrow(0, r0, rows);
      at::sum_out(ds, g * a, {1});
      act_out.narrow(0, r0, rows).copy_(a);
      grad_hidden.narrow(0, r0, rows).copy_(gh);
      if (grad_bias.defined()) {
        at::Tensor part = bias_parts[t];
        at::sum_out(part, gh, {0});
      }
    }
  });
  if (grad_bias.defined()) grad_bias.add_(bias_parts.sum(0));
}

}  // namespace cumo
