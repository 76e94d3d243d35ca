// Activation forward/backward for the expert MLP; see activation.h.
#include "activation.h"

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

at::Tensor activation_forward(const at::Tensor& hidden, Activation act, bool glu) {
  if (!glu) return act_forward(hidden, act);
  const int64_t h = hidden.size(1) / 2;
  at::Tensor out = act_forward(hidden.narrow(1, 0, h), act);
  out.mul_(hidden.narrow(1, h, h));
  return out;
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

}  // namespace cumo
