"""The "cumo" experts backend for Hugging Face transformers (>= 5: the experts interface).

After ``register_transformers()``, ``model.set_experts_implementation("cumo")`` or
``from_pretrained(..., experts_implementation="cumo")`` runs a model's experts on
``moe_kernels.ops.expert_mlp`` with the model's own routing (its router's ``top_k_index`` and
``top_k_weights``): the compiled CPU backend on CPU tensors, Triton on CUDA.

How the experts module's parameters map onto the op (views only: no expert weight is copied per call):
  gate_up_proj [E, 2I, D] (gate rows, then up rows)  ->  w1, GLU    (up_proj [E, I, D] when has_gate=False)
  down_proj    [E, D, I]                             ->  w2
  is_transposed ([E, D, 2I] and [E, I, D])           ->  w1, w2 = transposed views (the op takes strided weights)
  *_bias [E, 2I] / [E, D]                            ->  b1, b2
  ids >= num_experts (transformers' expert-parallel sentinels) are dropped by the op itself.

What does not run on this backend, and raises ``UnsupportedExpertsError`` (never a silent fallback):
  - interleaved gate/up (``is_concatenated=False``, gpt-oss): the op's GLU pairs column j with column
    j + I; interleaved rows would need a copy of gate_up_proj on every call;
  - a custom ``_apply_gate`` (gpt-oss, openai-privacy-filter, minimax-m3-vl: clamped SwiGLU with ``up + 1``;
    deepseek-v4, hy-v4(-vl), glm5-next: clamped up/gate; inkling2: a two-input act_fn): the op's GLU
    is ``act(gate) * up``; a clamp of ``up`` is outside what an activation of the gate can express;
  - ``has_post_expert_norm`` (muse-spark): a norm between each expert and the weighted sum, which the op fuses;
  - an activation the op does not have (e.g. nemotron-h's relu2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cumo_layers.dense_mlp import UpcycleError, activation_name
from moe_kernels import ops

IMPLEMENTATION_NAME = "cumo"
# The op's backend per device type: named, so a backend that cannot run raises instead of falling back.
BACKEND_BY_DEVICE = {"cpu": "cpu", "cuda": "triton"}
# Custom _apply_gate methods that compute exactly act(gate) * up on gate-then-up halves
# (beam's upcasts to fp32 and rounds once, which is what the op's activation does).
EQUIVALENT_GATES = {"BeamExperts._apply_gate"}


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
    glu: bool


def _gate_is_plain(experts: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(experts), "_apply_gate", None)
    return gate is _default_apply_gate or getattr(gate, "__qualname__", None) in EQUIVALENT_GATES


def experts_weights(experts: nn.Module) -> ExpertsWeights:
    """Map a transformers experts module onto the op's operands, or raise UnsupportedExpertsError saying why.

    experts: a module of a class decorated with ``@use_experts_implementation`` (has_gate, has_bias,
    is_transposed, is_concatenated, act_fn, gate_up_proj or up_proj, down_proj, optional *_bias).
    """
    kind = type(experts).__name__
    problems = []
    if getattr(experts, "has_post_expert_norm", False):
        problems.append("has_post_expert_norm: a norm runs between each expert and the weighted sum")
    has_gate = getattr(experts, "has_gate", True)
    if has_gate and not getattr(experts, "is_concatenated", True):
        problems.append("interleaved gate/up rows (is_concatenated=False) would need a copy of gate_up_proj per call")
    if has_gate and not _gate_is_plain(experts):
        problems.append(f"its _apply_gate ({type(experts)._apply_gate.__qualname__}) is not act(gate) * up")
    activation = None
    if not problems:  # a custom gate may not have an act_fn at all
        try:
            activation = activation_name(experts.act_fn)
        except UpcycleError as exc:
            problems.append(str(exc))
    if problems:
        raise UnsupportedExpertsError(
            f'experts_implementation="{IMPLEMENTATION_NAME}" cannot run {kind}: ' + "; ".join(problems)
            + '. Use "eager" or "grouped_mm" for this model.'
        )
    prefix = "gate_up_proj" if has_gate else "up_proj"
    w1, w2 = getattr(experts, prefix), experts.down_proj
    if getattr(experts, "is_transposed", False):
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    has_bias = getattr(experts, "has_bias", False)
    b1 = getattr(experts, f"{prefix}_bias") if has_bias else None
    b2 = experts.down_proj_bias if has_bias else None
    return ExpertsWeights(w1, b1, w2, b2, activation, has_gate)


def cumo_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts interface's function: the model's routing, this package's expert MLP.

    hidden_states: [T, D] float; top_k_index: [T, K] int (ids >= num_experts are dropped);
    top_k_weights: [T, K] float -> [T, D] in hidden_states.dtype. Differentiable in hidden_states,
    top_k_weights and the experts' parameters.
    """
    weights = experts_weights(self)
    w1, b1, w2, b2 = weights.w1, weights.b1, weights.w2, weights.b2
    device_type = hidden_states.device.type
    if device_type not in BACKEND_BY_DEVICE:
        raise UnsupportedExpertsError(f'experts_implementation="{IMPLEMENTATION_NAME}" has no backend for {device_type}')
    x = hidden_states
    if torch.is_autocast_enabled(device_type):  # the op takes one dtype; eager's F.linear would autocast
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        w1, b1, w2, b2 = (None if p is None else p.to(dtype) for p in (w1, b1, w2, b2))
    out = ops.expert_mlp(
        x, top_k_weights.float(), top_k_index.long(), w1, b1, w2, b2,
        activation=weights.activation, glu=weights.glu, backend=BACKEND_BY_DEVICE[device_type],
    )
    return out.to(hidden_states.dtype)


def register_transformers() -> None:
    """Register "cumo" in transformers' experts interface (idempotent).

    Then ``model.set_experts_implementation("cumo")`` or
    ``AutoModelForCausalLM.from_pretrained(path, experts_implementation="cumo")`` runs the model's
    experts on this package's ops. Raises ImportError if transformers (>= 5, with
    ``transformers.integrations.moe``) is not installed.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, cumo_experts_forward)
