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
    case Activation::kRelu2: return at::square(at::relu(x));
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
    case Activation::kRelu2: return grad * (2 * at::relu(x));
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
    case Activation::kRelu2: at::clamp_min_out(out, x, 0).square_(); return;
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
  if (name == "relu2") return Activation::kRelu2;
  TORCH_CHECK(false, "unknown activation '", std::string(name),
              "'; expected one of gelu, gelu_tanh, quick_gelu, relu, relu2, silu");
}

Glu parse_glu(int64_t code, bool interleaved, double a, double b) {
  TORCH_CHECK(code >= 0 && code <= static_cast<int64_t>(GluKind::kSoftcapped), "unknown GLU code ", code);
  Glu glu{static_cast<GluKind>(code), interleaved, a, b};
  TORCH_CHECK(glu.gated() || !interleaved, "interleaved gate/up needs a GLU");
  const bool clamped = glu.kind == GluKind::kClamped || glu.kind == GluKind::kClampedAfter;
  TORCH_CHECK(!clamped || (std::isfinite(a) && a > 0 && std::isfinite(b)),
              "a clamped GLU needs a finite limit > 0 and a finite up offset, got ", a, ", ", b);
  TORCH_CHECK(glu.kind != GluKind::kSoftcapped || (std::isfinite(a) && a > 0 && std::isfinite(b) && b > 0),
              "a softcapped GLU needs finite caps > 0, got ", a, ", ", b);
  return glu;
}

namespace {

// The gate and up columns of [M, 2H] rows (views): halves, or every other column.
std::pair<at::Tensor, at::Tensor> gate_and_up(const at::Tensor& t, const Glu& glu) {
  const int64_t h1 = t.size(1), h = h1 / 2;
  if (glu.interleaved) return {t.slice(1, 0, h1, 2), t.slice(1, 1, h1, 2)};
  return {t.narrow(1, 0, h), t.narrow(1, h, h)};
}

// A GLU other than the plain halves, on opmath gate and up [M, H]: reference.apply_glu's formulas.
// Returns (hidden [M, H], d loss / d gate, d loss / d up), the gradients only when grad (d loss / d hidden)
// is given. A clamp passes the gradient strictly inside its limits (lo < x < hi) and zeroes it elsewhere,
// at the limits too: torch.clamp's backward, which eager transformers differentiates.
std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_variant(const at::Tensor& gate, const at::Tensor& up,
                                                           const at::Tensor* grad, Activation act, const Glu& glu) {
  at::Tensor out, grad_gate, grad_up;
  if (glu.kind == GluKind::kPlain) {  // interleaved plain GLU
    const at::Tensor gate_act = act_forward(gate, act);
    out = gate_act * up;
    if (grad) grad_gate = act_backward(*grad * up, gate, act), grad_up = *grad * gate_act;
  } else if (glu.kind == GluKind::kSoftcapped) {
    const at::Tensor tanh_gate = at::tanh(gate / glu.a), sig = at::sigmoid(gate);
    const at::Tensor tanh_up = at::tanh(up / glu.b), up_capped = tanh_up * glu.b;
    const at::Tensor factor = tanh_gate * glu.a * sig;
    out = factor * up_capped;
    if (grad) {
      // d/dgate [a tanh(gate / a) sigmoid(gate)] and d/dup [b tanh(up / b)]
      grad_gate = *grad * up_capped * ((1 - tanh_gate * tanh_gate) * sig + factor * (1 - sig));
      grad_up = *grad * factor * (1 - tanh_up * tanh_up);
    }
  } else {
    const double limit = glu.a;
    const at::Tensor up_term = at::clamp(up, -limit, limit) + glu.b;
    const bool before = glu.kind == GluKind::kClamped;
    const at::Tensor gate_in = before ? at::clamp_max(gate, limit) : gate;
    const at::Tensor gate_act = act_forward(gate_in, act);
    const at::Tensor factor = before ? gate_act : at::clamp_max(gate_act, limit);
    out = factor * up_term;
    if (grad) {
      const at::Tensor gate_passes = before ? gate < limit : gate_act < limit;
      grad_gate = at::where(gate_passes, act_backward(*grad * up_term, gate_in, act), 0);
      grad_up = at::where(at::logical_and(up > -limit, up < limit), *grad * factor, 0);
    }
  }
  return {out, grad_gate, grad_up};
}

}  // namespace

std::pair<at::Tensor, at::Tensor> activation_backward(const at::Tensor& hidden, const at::Tensor& grad_out,
                                                      Activation act, const Glu& glu) {
  if (!glu.gated()) return {act_forward(hidden, act), act_backward(grad_out, hidden, act)};
  if (!glu.plain()) {
    const auto [gate, up] = gate_and_up(hidden, glu);
    auto [out, grad_gate, grad_up] = glu_variant(gate, up, &grad_out, act, glu);
    at::Tensor grad_hidden = at::empty_like(hidden);
    auto [grad_gate_cols, grad_up_cols] = gate_and_up(grad_hidden, glu);
    grad_gate_cols.copy_(grad_gate);
    grad_up_cols.copy_(grad_up);
    return {out, grad_hidden};
  }
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

void activation_forward_rows(const at::Tensor& hidden, Activation act, const Glu& glu, at::Tensor& act_out) {
  const int64_t m = hidden.size(0), h1 = hidden.size(1);
  if (m == 0) return;
  const auto dtype = hidden.scalar_type();
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // Without GLU and with a native ATen kernel the input dtype goes straight in (its math is opmath);
  // otherwise the tile is widened once and the result rounded once.
  const bool widen =
      dtype != acc_dtype && (glu.gated() || act == Activation::kQuickGelu || act == Activation::kRelu2);
  const int64_t tile_rows = tile_rows_for(h1, kForwardTileElements);
  const int64_t tiles = (m + tile_rows - 1) / tile_rows;
  const at::ThreadLocalState caller_state;
  // Grain 1 tile: parallel over tiles outside a parallel region, inline inside one.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile_rows, rows = std::min(tile_rows, m - r0);
      const at::Tensor h = hidden.narrow(0, r0, rows);
      at::Tensor out = act_out.narrow(0, r0, rows);
      if (glu.gated() && !glu.plain()) {  // the variants: widened once, their formula, rounded once
        const at::Tensor wide = h.to(acc_dtype);
        const auto [gate, up] = gate_and_up(wide, glu);
        out.copy_(std::get<0>(glu_variant(gate, up, nullptr, act, glu)));
        continue;
      }
      const bool gated = glu.gated();
      const int64_t cols = gated ? h1 / 2 : h1;
      const at::Tensor gate = gated ? h.narrow(1, 0, cols) : h;
      // Opmath result: straight into act_out, or in place in a widened tile that is rounded once into it
      // (the GLU product widens up as it multiplies).
      at::Tensor a = widen ? gate.to(acc_dtype) : out;
      act_forward_out(a, widen ? a : gate, act);
      if (gated) a.mul_(h.narrow(1, cols, cols));
      if (widen) out.copy_(a);
    }
  });
}

void activation_backward_rows(const at::Tensor& hidden, const at::Tensor& grad_act, const at::Tensor& row_scale,
                              Activation act, const Glu& glu, at::Tensor& act_out, at::Tensor& grad_hidden,
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
