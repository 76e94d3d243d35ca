// Expert activations on one tile of rows, through ATen's vectorised CPU kernels.
// Same functions as moe_kernels/reference.py; with GLU the first half of the columns is the gate:
// act(gate) * up.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

namespace cumo {

enum class Activation { kGelu, kGeluTanh, kQuickGelu, kSilu, kRelu };

Activation parse_activation(c10::string_view name);

// hidden: [M, H1] -> [M, H] in hidden's dtype (the forward of inference and training).
at::Tensor activation_forward(const at::Tensor& hidden, Activation act, bool glu);

// hidden: [M, H1], grad_out: [M, H] (same floating dtype, the math runs in it)
// -> (act_out [M, H], grad_hidden [M, H1]).
std::pair<at::Tensor, at::Tensor> activation_backward(const at::Tensor& hidden, const at::Tensor& grad_out,
                                                      Activation act, bool glu);

}  // namespace cumo
