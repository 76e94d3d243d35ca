"""Pure-PyTorch reference ops: the oracle every backend is tested against.

Shapes: T tokens, D input features, H expert hidden size (H1 = H, or 2*H with GLU: gate rows
then up rows, or interleaved), O output features, E experts, K = top_k. Gradients come from PyTorch autograd.
Short and plain on purpose: when a backend and this file disagree, this file is read first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.routing import RoutingPlan, build_routing_plan


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def relu2(x: Tensor) -> Tensor:
    """relu(x)^2 (So et al. 2021, "Primer"; nemotron-h's experts)."""
    return torch.square(F.relu(x))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
    "relu2": relu2,
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


# The GLU variants and the GluSpec fields each reads, in the order the kernels take them (two scalars).
# A kernel's code for a variant is 1 + its position here (0: no GLU).
GLU_KINDS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "clamped": ("limit", "up_offset"),
    "clamped_after": ("limit", "up_offset"),
    "softcapped": ("gate_cap", "up_cap"),
}


@dataclass(frozen=True)
class GluSpec:
    """How a GLU expert turns fc1's 2H columns (gate and up) into its H hidden values.

    kind (a = act(.)):
      plain          a(gate) * up                                                       Llama, Mixtral, ...
      clamped        a(min(gate, limit)) * (clamp(up, -limit, limit) + up_offset)       gpt-oss (quick_gelu,
                                                                                        up_offset 1), deepseek-v4
      clamped_after  min(a(gate), limit) * (clamp(up, -limit, limit) + up_offset)       step3p7
      softcapped     cap(gate, gate_cap) * sigmoid(gate) * cap(up, up_cap),             inkling2 (activation
                     cap(v, c) = c * tanh(v / c)                                        'silu', its c -> inf limit)
    interleaved: gate in columns 0::2 and up in 1::2 (gpt-oss) instead of gate = [:H], up = [H:].
    Fields a kind does not use keep their defaults. ``GluSpec()`` is the plain GLU (``glu=True``).
    """

    kind: str = "plain"
    interleaved: bool = False
    limit: float = math.inf
    up_offset: float = 0.0
    gate_cap: float = math.inf
    up_cap: float = math.inf

    @property
    def scalars(self) -> tuple[float, float]:
        """The fields the kind reads (GLU_KINDS) as the kernels' two scalars, zeros where it reads none."""
        values = [float(getattr(self, name)) for name in GLU_KINDS[self.kind]]
        return (*values, 0.0, 0.0)[:2]


PLAIN_GLU = GluSpec()


def as_glu(glu: bool | GluSpec | None) -> GluSpec | None:
    """The op's ``glu`` argument as a spec: True -> PLAIN_GLU, False/None -> None (no GLU)."""
    if isinstance(glu, GluSpec):
        return glu
    return PLAIN_GLU if glu else None


def glu_code(glu: bool | GluSpec | None) -> tuple[int, bool, float, float]:
    """(kind code, interleaved, *scalars) of ``glu`` for the compiled ops: code 0 is no GLU, else
    1 + the kind's position in GLU_KINDS."""
    if glu is True or glu is PLAIN_GLU:  # the common cases first: this runs on every launch (host path)
        return 1, False, 0.0, 0.0
    if glu is False or glu is None:
        return 0, False, 0.0, 0.0
    return 1 + list(GLU_KINDS).index(glu.kind), glu.interleaved, *glu.scalars


def glu_from_code(code: int, interleaved: bool, a: float, b: float) -> GluSpec | None:
    """The inverse of ``glu_code`` (the compiled ops' fakes and checks rebuild the spec from it)."""
    if code == 0:
        return None
    if code == 1 and not interleaved:  # the plain GLU: the shared spec, which glu_code recognises at once
        return PLAIN_GLU
    if not 1 <= code <= len(GLU_KINDS):
        return GluSpec(f"<code {code}>", interleaved)  # the contract names it
    kind = list(GLU_KINDS)[code - 1]
    return GluSpec(kind, interleaved, **dict(zip(GLU_KINDS[kind], (a, b))))


def split_gate_up(hidden: Tensor, glu: GluSpec) -> tuple[Tensor, Tensor]:
    """hidden: [..., 2H] -> (gate, up), each [..., H] (views)."""
    if glu.interleaved:
        return hidden[..., 0::2], hidden[..., 1::2]
    return hidden.chunk(2, dim=-1)


def softcap(x: Tensor, cap: float) -> Tensor:
    return torch.tanh(x / cap) * cap


def apply_glu(gate: Tensor, up: Tensor, activation: str, glu: GluSpec) -> Tensor:
    """gate, up: [..., H] -> [..., H], the spec's formula. Its gradients are autograd's: a clamp passes
    the gradient strictly inside its limits only (torch.clamp's backward zeroes it at the limits too)."""
    act = ACTIVATIONS[activation]
    if glu.kind == "plain":
        return act(gate) * up
    if glu.kind == "softcapped":
        return softcap(gate, glu.gate_cap) * torch.sigmoid(gate) * softcap(up, glu.up_cap)
    up = up.clamp(min=-glu.limit, max=glu.limit) + glu.up_offset
    if glu.kind == "clamped":
        return act(gate.clamp(max=glu.limit)) * up
    return act(gate).clamp(max=glu.limit) * up


def apply_activation(hidden: Tensor, activation: str, glu: bool | GluSpec) -> Tensor:
    """hidden: [N, H1] -> [N, H]. With GLU (True: the plain one, or a GluSpec) hidden holds gate and
    up columns: ``apply_glu``."""
    spec = as_glu(glu)
    if spec is None:
        return ACTIVATIONS[activation](hidden)
    return apply_glu(*split_gate_up(hidden, spec), activation, spec)


def topk_gating(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Softmax in fp32, then top-k, then (optionally) renormalise the k weights to sum to 1.

    logits: [T, E] float -> (top_k_weights [T, K] float32 (float64 for float64 logits),
    top_k_idx [T, K] int64). Ties go to the lower expert index.
    """
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    # A stable descending sort, not torch.topk: topk does not promise ties go to the lower id.
    weights, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, idx = weights[:, :top_k], idx[:, :top_k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def expert_load(top_k_idx: Tensor, num_experts: int) -> Tensor:
    """top_k_idx: [T, K] integer -> [E] int64 assignments per expert (no host sync on GPU)."""
    flat = top_k_idx.reshape(-1).long()
    # Ids below 0 count into bucket 0 and ids >= E into bucket E + 1, both cut off: ids outside
    # [0, E) (capacity drops, expert-parallel sentinels) are not counted.
    buckets = flat.clamp(-1, num_experts) + 1
    counts = torch.zeros(num_experts + 2, dtype=torch.int64, device=flat.device)
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(buckets.shape)
    return counts.scatter_add_(0, buckets, ones)[1:-1]


def router_losses(logits: Tensor, balance_weights: Tensor, z_scale: float, balance_coef: float,
                  z_coef: float, balance_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The router's auxiliary losses from its logits, softmax and log-sum-exp per row in fp32:

        balance = balance_scale * sum_t sum_e softmax(logits_t)_e * balance_weights[s(t), e]
        z       = z_scale * mean_t logsumexp(logits_t)^2
        aux     = balance_coef * balance + z_coef * z

    logits: [T, E] float; balance_weights: [S, E] float or integer (no gradient), S dividing T, token t in sample
    s(t) = t // (T / S) -> three scalars, float32 (float64 for float64 logits), 0 when T = 0.
    Differentiable in the logits. Any load-balancing loss linear in the probabilities fits: Switch's
    (S = 1, the expert load scaled by E / (T*K*T)) and CuMo's per-sample one (cumo_layers.router builds both).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_tokens, num_experts = logits.shape
    num_samples = balance_weights.shape[0]
    probs = torch.softmax(logits, dim=-1).reshape(num_samples, num_tokens // num_samples, num_experts)
    balance = (probs * balance_weights.to(logits.dtype).unsqueeze(1)).sum() * balance_scale
    z = torch.logsumexp(logits, dim=-1).square().sum() * (z_scale / max(num_tokens, 1))
    return balance, z, balance * balance_coef + z * z_coef


def permute(x: Tensor, plan: RoutingPlan) -> Tensor:
    """Gather token rows into expert-contiguous order.

    x: [T, D] -> [T*K, D]; row r holds x[sorted_slots[r] // K]. Rows past offsets[E] belong to
    dropped slots; they are gathered too (static shape) and ignored downstream.
    """
    return x.index_select(0, plan.sorted_tokens)


def grouped_gemm(x: Tensor, weight: Tensor, expert_offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-expert GEMM over contiguous row segments.

    x: [N, I]; weight: [E, O, I] (nn.Linear layout); expert_offsets: [E+1] int64;
    bias: [E, O] or None -> [N, O], row r of expert e is x[r] @ weight[e].T + bias[e].
    Rows past offsets[E] (dropped) are zero.
    """
    if x.shape[0] == 0:
        # No rows, so no bounds to read (torch.compile would trace data-dependent ones it never uses). The empty
        # result still depends on x and the weight: a backward must reach whatever produced x (under expert
        # parallelism, an all_to_all that every rank joins, whether or not it received rows).
        empty = torch.mm(x, weight[0].t())
        return empty if bias is None else empty + bias[0]
    out = x.new_zeros(x.shape[0], weight.shape[1])
    bounds = expert_offsets.tolist()
    if torch.compiler.is_exporting():  # ordered row indices: torch.export needs to know (inductor is fine without)
        for lo, hi in zip(bounds, bounds[1:]):
            torch._check(lo >= 0)
            torch._check(hi >= lo)
            torch._check(hi <= x.shape[0])
    for e in range(weight.shape[0]):
        seg = x[bounds[e]:bounds[e + 1]] @ weight[e].t()
        out[bounds[e]:bounds[e + 1]] = seg if bias is None else seg + bias[e]
    return out


def combine(rows: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, plan: RoutingPlan) -> Tensor:
    """Weighted sum of each token's K expert outputs, back in token order (deterministic).

    rows: [T*K, O] expert-sorted; top_k_weights: [T, K] float; top_k_idx: [T, K] int
    -> [T, O] in rows.dtype, accumulated in fp32 (fp64 for fp64 rows). Dropped slots contribute exactly zero
    (selected away, never multiplied, so a NaN in a dropped row cannot leak).
    """
    num_tokens, top_k = top_k_weights.shape
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    per_slot = rows.index_select(0, plan.slot_rows).to(accumulate).view(num_tokens, top_k, rows.shape[1])
    kept = ((top_k_idx >= 0) & (top_k_idx < plan.num_experts)).unsqueeze(-1)
    weighted = torch.where(kept, per_slot * top_k_weights.to(accumulate).unsqueeze(-1), 0.0)
    return weighted.sum(dim=1).to(rows.dtype)


def expert_mlp(
    x: Tensor,
    top_k_weights: Tensor,
    top_k_idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str = "gelu",
    glu: bool | GluSpec = False,
) -> Tensor:
    """The sparse MoE MLP given a routing decision.

    x: [T, D]; top_k_weights: [T, K] float; top_k_idx: [T, K] int64 (ids outside [0, E) dropped);
    w1: [E, H1, D]; b1: [E, H1] or None; w2: [E, O, H]; b2: [E, O] or None -> [T, O] in x.dtype.
    y[t] = sum_k w[t,k] * (act(x[t] @ w1[e].T + b1[e]) @ w2[e].T + b2[e]), e = idx[t,k]; with ``glu``
    act is ``apply_activation``'s gate/up product.
    """
    plan = build_routing_plan(top_k_idx, w1.shape[0])
    hidden = grouped_gemm(permute(x, plan), w1, plan.expert_offsets, b1)
    hidden = apply_activation(hidden, activation, glu)
    rows = grouped_gemm(hidden, w2, plan.expert_offsets, b2)
    return combine(rows, top_k_weights, top_k_idx, plan)


def unavailable_reason(device: torch.device) -> str | None:
    """The reference runs wherever PyTorch runs."""
    return None
