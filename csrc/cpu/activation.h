// Expert activations on one tile of rows, through ATen's vectorised CPU kernels.
// Same functions as moe_kernels/reference.py; with GLU the columns hold gate and up (halves, or
// interleaved) and a Glu says how they combine (reference.GluSpec: plain act(gate) * up, clamped,
// clamped_after, softcapped).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>

namespace cumo {

enum class Activation { kGelu, kGeluTanh, kQuickGelu, kSilu, kRelu, kRelu2 };

Activation parse_activation(c10::string_view name);

// Codes of moe_kernels.reference.glu_code: 0 no GLU, 1 + position in GLU_KINDS.
enum class GluKind { kNone, kPlain, kClamped, kClampedAfter, kSoftcapped };

// The GLU variant of one call (reference.GluSpec). a, b: (limit, up offset) for the clamped kinds,
// (gate cap, up cap) for softcapped.
struct Glu {
  GluKind kind = GluKind::kNone;
  bool interleaved = false;
  double a = 0, b = 0;
  bool gated() const { return kind != GluKind::kNone; }
  // act(gate) * up over halves: the layout and math of the fast paths.
  bool plain() const { return kind == GluKind::kPlain && !interleaved; }
  // Column of hidden value c's gate and up in a row of 2H (interleaved: 2c and 2c + 1).
  int64_t gate_col(int64_t c) const { return interleaved ? 2 * c : c; }
  int64_t up_col(int64_t c, int64_t hidden) const { return interleaved ? 2 * c + 1 : hidden + c; }
};

Glu parse_glu(int64_t code, bool interleaved, double a, double b);

// act(x) for one opmath value: the formulas of ATen's kernels (and of moe_kernels/reference.py), for
// loops over a handful of rows where a vectorised ATen call per row would cost more than the math.
template <typename acc_t>
inline acc_t activation_scalar(acc_t x, Activation act) {
  constexpr acc_t kInvSqrt2 = acc_t(0.70710678118654752440), kSqrt2OverPi = acc_t(0.79788456080286535588);
  switch (act) {
    case Activation::kGelu: return acc_t(0.5) * x * (acc_t(1) + std::erf(x * kInvSqrt2));
    case Activation::kGeluTanh:
      return acc_t(0.5) * x * (acc_t(1) + std::tanh(kSqrt2OverPi * (x + acc_t(0.044715) * x * x * x)));
    case Activation::kQuickGelu: return x / (acc_t(1) + std::exp(acc_t(-1.702) * x));
    case Activation::kSilu: return x / (acc_t(1) + std::exp(-x));
    case Activation::kRelu: return x > acc_t(0) || x != x ? x : acc_t(0);  // NaN stays NaN, as in ATen
    case Activation::kRelu2: {
      const acc_t r = x > acc_t(0) || x != x ? x : acc_t(0);
      return r * r;
    }
  }
  return x;
}

// One hidden value of a gated variant from its opmath gate and up (the formulas of reference.apply_glu).
template <typename acc_t>
inline acc_t glu_scalar(acc_t gate, acc_t up, Activation act, const Glu& glu) {
  const acc_t a = static_cast<acc_t>(glu.a), b = static_cast<acc_t>(glu.b);
  switch (glu.kind) {
    case GluKind::kClamped: return activation_scalar(std::min(gate, a), act) * (std::clamp(up, -a, a) + b);
    case GluKind::kClampedAfter: return std::min(activation_scalar(gate, act), a) * (std::clamp(up, -a, a) + b);
    case GluKind::kSoftcapped:
      return std::tanh(gate / a) * a * (acc_t(1) / (acc_t(1) + std::exp(-gate))) * (std::tanh(up / b) * b);
    default: return activation_scalar(gate, act) * up;
  }
}

// hidden: [M, H1], grad_out: [M, H] (same floating dtype, the math runs in it)
// -> (act_out [M, H], grad_hidden [M, H1]).
std::pair<at::Tensor, at::Tensor> activation_backward(const at::Tensor& hidden, const at::Tensor& grad_out,
                                                      Activation act, const Glu& glu);

// The forward of the expert MLP's activation for one expert's rows, in row tiles that stay in cache:
// each tile of hidden [M, H1] is read once, act (and GLU's act(gate) * up) is computed in opmath (fp32
// for bf16/fp16, one rounding at the end) and written to act_out [M, H] in hidden's dtype. Parallel over
// tiles when called outside a parallel region; each element depends only on its own row.
void activation_forward_rows(const at::Tensor& hidden, Activation act, const Glu& glu, at::Tensor& act_out);

// The backward of the expert MLP's activation for one expert's rows, in row tiles that stay in cache,
// the math in opmath (fp32 for bf16/fp16); no [M, H] opmath tensor is ever allocated.
// hidden: [M, H1] and grad_act: [M, H] (d loss / d act, before the row scale) in the expert dtype;
// row_scale: [M] opmath. Writes act_out [M, H] (dtype) = act(hidden), grad_hidden [M, H1] (dtype) =
// d loss / d hidden for grad_act * row_scale, d_scale [M] (opmath) = sum_j grad_act * act (act in opmath),
// and, when grad_bias is defined ([H1] opmath), adds the column sums of the opmath grad_hidden to
// it (per tile, then in tile order: the result does not depend on the thread count). Parallel over tiles when called outside a parallel region.
void activation_backward_rows(const at::Tensor& hidden, const at::Tensor& grad_act, const at::Tensor& row_scale,
                              Activation act, const Glu& glu, at::Tensor& act_out, at::Tensor& grad_hidden,
                              at::Tensor& d_scale, at::Tensor& grad_bias);

}  // namespace cumo
