"""The "cumo" experts backend for Hugging Face transformers (>= 5: the experts interface).

After ``register_transformers()``, ``model.set_experts_implementation("cumo")`` or
``from_pretrained(..., experts_implementation="cumo")`` runs a model's experts on
``moe_kernels.ops.expert_mlp`` with the model's own routing (its router's ``top_k_index`` and
``top_k_weights``): the compiled CPU backend on CPU tensors, Triton on CUDA.

How the experts module's parameters map onto the op (views only: no expert weight is copied per call):
  gate_up_proj [E, 2I, D]                 ->  w1, with GLU     (up_proj [E, I, D] when has_gate=False: no GLU)
  down_proj    [E, D, I]                  ->  w2
  is_transposed ([E, D, 2I] and [E, I, D]) ->  w1, w2 = transposed views (the op takes strided weights)
  *_bias [E, 2I] / [E, D]                 ->  b1, b2
  _apply_gate                             ->  the op's activation and GLU variant (``GATES``), e.g. gpt-oss:
                                              quick_gelu, GluSpec("clamped", interleaved=True, limit, up_offset=1)
  ids >= num_experts (transformers' expert-parallel sentinels) are dropped by the op itself.

Families that run (transformers 5.24): every experts class with the default gate (Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek-V3, ...), beam (the same gate, upcast to fp32), gpt-oss (interleaved gate/up, clamped
SwiGLU with ``up + 1``), openai-privacy-filter and minimax-m3-vl (the same, gate/up halves),
deepseek-v4, hy-v4(-vl), glm5-next (SiLU of the clamped gate times the clamped up), inkling2(-loop)
(softcapped SwiGLU), nemotron-h (relu2, no GLU). A custom gate is checked once per class and setting
against the op's formula on a probe (``_check_gate``), so a gate that transformers changes refuses
instead of computing something else. step3p7's experts (activation, then clamp) map too, but its
model calls them directly, never through the experts interface.

``has_post_expert_norm`` (muse-spark: the module's ``post_expert_norm`` of each expert's output before
the weighted sum) runs unfused: the op folds the routing weight and the sum over k into its second GEMM
and combine, so it is called on the T*K (token, slot) rows with weight 1 and one slot each (x's rows
gathered K times), which gives every expert's output row; the norm, the routing weights and the sum
over k follow in PyTorch. Slower than the fused path (a [T*K, D] copy of x and an unfused combine),
exact all the same.

What does not run, and raises ``UnsupportedExpertsError`` (never a silent fallback):
  - a gate the op has no variant for, or an activation it does not have;
  - a SwiGLU ``alpha`` other than 1.702 (quick_gelu) or 1.0 (silu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from cumo_layers.dense_mlp import UpcycleError, activation_name
from moe_kernels import ops
from moe_kernels.reference import GluSpec, apply_activation, glu_code, glu_from_code

IMPLEMENTATION_NAME = "cumo"
# The op's backend per device type: named, so a backend that cannot run raises instead of falling back.
BACKEND_BY_DEVICE = {"cpu": "cpu", "cuda": "triton"}
# The activations of x * sigmoid(alpha * x), by alpha (gpt-oss's swiglu_alpha).
SIGMOID_GATED_BY_ALPHA = {1.702: "quick_gelu", 1.0: "silu"}
PROBE_WIDTH, PROBE_RTOL = 32, 1e-5  # the gate probe: [16, PROBE_WIDTH] fp32 gate/up columns


class UnsupportedExpertsError(NotImplementedError):
    """A transformers experts module whose layout or gate the "cumo" backend cannot run."""


@dataclass
class ExpertsWeights:
    """An experts module's parameters as the op's operands (views of the module's parameters)."""

    w1: Tensor  # [E, H1, D]
    b1: Tensor | None  # [E, H1]
    w2: Tensor  # [E, D, H]
    b2: Tensor | None  # [E, D]
    activation: str
    glu: bool | GluSpec
    post_norm: nn.Module | None = None  # has_post_expert_norm: applied to each expert's output row


def _sigmoid_gated(alpha: float) -> str:
    if float(alpha) not in SIGMOID_GATED_BY_ALPHA:
        raise UnsupportedExpertsError(
            f"a SwiGLU alpha of {alpha}: the op computes gate * sigmoid(alpha * gate) for alpha "
            f"{sorted(SIGMOID_GATED_BY_ALPHA)} only ({', '.join(SIGMOID_GATED_BY_ALPHA.values())})"
        )
    return SIGMOID_GATED_BY_ALPHA[float(alpha)]


def _gpt_oss_gate(alpha: float, limit: float, interleaved: bool) -> tuple[str, GluSpec]:
    """clamp(gate, max=limit) * sigmoid(alpha * ...) * (clamp(up, -limit, limit) + 1)."""
    return _sigmoid_gated(alpha), GluSpec("clamped", interleaved, limit=float(limit), up_offset=1.0)


def _clamped(activation: str, limit: float, kind: str = "clamped") -> tuple[str, GluSpec]:
    """act(clamp(gate, max=limit)) * clamp(up, -limit, limit) (an infinite limit clamps nothing)."""
    if math.isinf(limit) and limit > 0:
        return activation, GluSpec()
    return activation, GluSpec(kind, limit=float(limit))


def _softcapped(act_fn: nn.Module) -> tuple[str, GluSpec]:
    """softcap(gate) * sigmoid(gate) * softcap(up), the caps of the act_fn's two Softcap modules."""
    return "silu", GluSpec("softcapped", gate_cap=float(act_fn.gate_softcap.softcap),
                           up_cap=float(act_fn.up_softcap.softcap))


# Custom _apply_gate methods (by qualified name) -> the op's (activation, glu) for a module of that class.
# _check_gate verifies each against the method itself before it is trusted.
GATES: dict[str, Callable[[nn.Module], tuple[str, bool | GluSpec]]] = {
    "BeamExperts._apply_gate": lambda m: (activation_name(m.act_fn), True),  # fp32 inside, rounded once
    "GptOssExperts._apply_gate": lambda m: _gpt_oss_gate(m.alpha, m.limit, interleaved=True),
    "OpenAIPrivacyFilterExperts._apply_gate": lambda m: _gpt_oss_gate(m.alpha, m.limit, interleaved=False),
    "MiniMaxM3VLExperts._apply_gate": lambda m: _gpt_oss_gate(m.swiglu_alpha, m.swiglu_limit, interleaved=False),
    "DeepseekV4Experts._apply_gate": lambda m: _clamped(activation_name(m.act_fn), m.limit),
    "HYV4Experts._apply_gate": lambda m: _clamped("silu", m.swiglu_limit),
    "HYV4VLExperts._apply_gate": lambda m: _clamped("silu", m.swiglu_limit),
    "Glm5NextTextExperts._apply_gate": lambda m: _clamped("silu", m.swiglu_limit),
    "Step3p7Experts._apply_gate": lambda m: _clamped(activation_name(m.act_fn), m.limit, "clamped_after"),
    "Inkling2Experts._apply_gate": lambda m: _softcapped(m.act_fn),
    "Inkling2LoopExperts._apply_gate": lambda m: _softcapped(m.act_fn),
}

# (experts class, activation, *glu_code) whose custom gate matched the op's formula on the probe.
_CHECKED_GATES: set[tuple] = set()


# Under torch.compile it runs while dynamo traces, not in the graph; its GLU comes as glu_code's plain values (a
# spec built in traced code reached it with its defaults).
@torch.compiler.assume_constant_result
def _check_gate(experts: nn.Module, activation: str, *code: int | bool | float) -> bool:
    """Run the class's own _apply_gate on a probe (fp32, values past every clamp and cap) and compare it
    with the op's formula for ``glu_from_code(*code)``; raise UnsupportedExpertsError if they differ. Once per
    class and setting."""
    key = (type(experts), activation, *code)
    if key in _CHECKED_GATES:
        return True
    glu = glu_from_code(*code)
    generator = torch.Generator().manual_seed(0)
    limit = getattr(glu, "limit", math.inf)
    probe = torch.randn(16, PROBE_WIDTH, generator=generator) * (2 * limit if math.isfinite(limit) else 4.0)
    with torch.no_grad():
        theirs = type(experts)._apply_gate(experts, probe.clone()).float()
        ours = apply_activation(probe, activation, glu)
    error = float((theirs - ours).abs().max() / ours.abs().max().clamp_min(1e-12))
    if theirs.shape != ours.shape or not error <= PROBE_RTOL:
        raise UnsupportedExpertsError(
            f"its _apply_gate ({type(experts)._apply_gate.__qualname__}) does not compute the op's "
            f"{activation!r} with {glu} (relative difference {error:.3g} on a probe)"
        )
    _CHECKED_GATES.add(key)
    return True


@torch.compiler.assume_constant_result  # a method's name is fixed; dynamo cannot trace reading it
def _qualified_name(function: object) -> str:
    return getattr(function, "__qualname__", repr(function))


def _gate(experts: nn.Module) -> tuple[str, bool | GluSpec]:
    """The op's (activation, glu) for the module's gate; raises UnsupportedExpertsError."""
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(experts, "has_gate", True):
        return activation_name(experts.act_fn), False
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is _default_apply_gate:  # act(gate) * up on halves, whatever is_concatenated says
        return activation_name(experts.act_fn), True
    name = _qualified_name(gate)
    if name not in GATES:
        raise UnsupportedExpertsError(f"its _apply_gate ({name}) is not a GLU variant the op has")
    activation, glu = GATES[name](experts)
    _check_gate(experts, activation, *glu_code(glu))
    return activation, glu


def experts_weights(experts: nn.Module) -> ExpertsWeights:
    """Map a transformers experts module onto the op's operands, or raise UnsupportedExpertsError saying why.

    experts: a module of a class decorated with ``@use_experts_implementation`` (has_gate, has_bias,
    is_transposed, act_fn, gate_up_proj or up_proj, down_proj, optional *_bias, _apply_gate).
    """
    kind = type(experts).__name__
    try:
        post_norm = None
        if getattr(experts, "has_post_expert_norm", False):
            post_norm = getattr(experts, "post_expert_norm", None)
            if not isinstance(post_norm, nn.Module):
                raise UnsupportedExpertsError("has_post_expert_norm but no post_expert_norm module")
        activation, glu = _gate(experts)
    except (UnsupportedExpertsError, UpcycleError) as exc:
        raise UnsupportedExpertsError(
            f'experts_implementation="{IMPLEMENTATION_NAME}" cannot run {kind}: {exc}. '
            'Use "eager" or "grouped_mm" for this model.'
        ) from None
    prefix = "gate_up_proj" if glu is not False else "up_proj"
    w1, w2 = getattr(experts, prefix), experts.down_proj
    if getattr(experts, "is_transposed", False):
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    has_bias = getattr(experts, "has_bias", False)
    b1 = getattr(experts, f"{prefix}_bias") if has_bias else None
    b2 = experts.down_proj_bias if has_bias else None
    return ExpertsWeights(w1, b1, w2, b2, activation, glu, post_norm)


def cumo_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts interface's function: the model's routing, this package's expert MLP.

    hidden_states: [T, D] float; top_k_index: [T, K] int (ids >= num_experts are dropped);
    top_k_weights: [T, K] float -> [T, D] in hidden_states.dtype. Differentiable in hidden_states,
    top_k_weights and the experts' parameters.
    """
    weights = experts_weights(self)
    device_type = hidden_states.device.type
    if device_type not in BACKEND_BY_DEVICE:
        raise UnsupportedExpertsError(f'experts_implementation="{IMPLEMENTATION_NAME}" has no backend for {device_type}')
    x = hidden_states
    if torch.is_autocast_enabled(device_type):  # the op takes one dtype; eager's F.linear would autocast
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weights = replace(weights, **{name: None if p is None else p.to(dtype) for name, p in
                                      (("w1", weights.w1), ("b1", weights.b1), ("w2", weights.w2), ("b2", weights.b2))})
    backend = BACKEND_BY_DEVICE[device_type]
    if weights.post_norm is not None:
        return _experts_with_post_norm(x, top_k_index, top_k_weights, weights, backend).to(hidden_states.dtype)
    out = ops.expert_mlp(
        x, top_k_weights.float(), top_k_index.long(), weights.w1, weights.b1, weights.w2, weights.b2,
        activation=weights.activation, glu=weights.glu, backend=backend,
    )
    return out.to(hidden_states.dtype)


def _experts_with_post_norm(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, weights: ExpertsWeights,
                            backend: str) -> Tensor:
    """sum_k w[t, k] * norm(expert_{idx[t, k]}(x[t])): the op on the T*K slot rows (one slot each,
    weight 1: every expert's unweighted output row; a dropped id gives a zero row, which the norm
    keeps at zero), then the norm, the weights and the sum over k."""
    num_tokens, top_k = top_k_index.shape
    slot_rows = x.repeat_interleave(top_k, dim=0)
    ones = torch.ones(num_tokens * top_k, 1, dtype=torch.float32, device=x.device)
    rows = ops.expert_mlp(
        slot_rows, ones, top_k_index.reshape(-1, 1).long(), weights.w1, weights.b1, weights.w2, weights.b2,
        activation=weights.activation, glu=weights.glu, backend=backend,
    )
    rows = weights.post_norm(rows).view(num_tokens, top_k, -1)
    return (rows * top_k_weights.to(rows.dtype).unsqueeze(-1)).sum(dim=1)


def register_transformers() -> None:
    """Register "cumo" in transformers' experts interface (idempotent).

    Then ``model.set_experts_implementation("cumo")`` or
    ``AutoModelForCausalLM.from_pretrained(path, experts_implementation="cumo")`` runs the model's
    experts on this package's ops. Raises ImportError if transformers (>= 5, with
    ``transformers.integrations.moe``) is not installed.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, cumo_experts_forward)
