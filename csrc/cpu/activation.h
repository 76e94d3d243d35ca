// Expert activations on one tile of rows, through ATen's vectorised CPU kernels.
// Same functions as moe_kernels/reference.py; with GLU the first half of the columns is the gate:
// act(gate) * up.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>

namespace cumo {

enum class Activation { kGelu, kGeluTanh, kQuickGelu, kSilu, kRelu };

Activation parse_activation(c10::string_view name);

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
  }
  return x;
}

// hidden: [M, H1], grad_out: [M, H] (same floating dtype, the math runs in it)
// -> (act_out [M, H], grad_hidden [M, H1]).
std::pair<at::Tensor, at::Tensor> activation_backward(const at::Tensor& hidden, const at::Tensor& grad_out,
                                                      Activation act, bool glu);

// The forward of the expert MLP's activation for one expert's rows, in row tiles that stay in cache:
// each tile of hidden [M, H1] is read once, act (and GLU's act(gate) * up) is computed in opmath (fp32
// for bf16/fp16, one rounding at the end) and written to act_out [M, H] in hidden's dtype. Parallel over
// tiles when called outside a parallel region; each element depends only on its own row.
void activation_forward_rows(const at::Tensor& hidden, Activation act, bool glu, at::Tensor& act_out);

// The backward of the expert MLP's activation for one expert's rows, in row tiles that stay in cache,
// the math in opmath (fp32 for bf16/fp16); no [M, H] opmath tensor is ever allocated.
// hidden: [M, H1] and grad_act: [M, H] (d loss / d act, before the row scale) in the expert dtype;
// row_scale: [M] opmath. Writes act_out [M, H] (dtype) = act(hidden), grad_hidden [M, H1] (dtype) =
// d loss / d hidden for grad_act * row_scale, d_scale [M] (opmath) = sum_j grad_act * act (act in opmath),
// and, when grad_bias is defined ([H1] opmath), adds the column sums of the opmath grad_hidden to
// it (per tile, then in tile order: the result does not depend on the thread count). Parallel over tiles when called outside a parallel region.
void activation_backward_rows(const at::Tensor& hidden, const at::Tensor& grad_act, const at::Tensor& row_scale,
                              Activation act, bool glu, at::Tensor& act_out, at::Tensor& grad_hidden,
                              at::Tensor& d_scale, at::Tensor& grad_bias);

}  // namespace cumo
