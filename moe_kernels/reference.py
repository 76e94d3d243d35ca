"""Pure-PyTorch reference ops: the oracle every backend is tested against.

Shapes: T tokens, D input features, H expert hidden size (H1 = H, or 2*H with GLU: gate rows
then up rows), O output features, E experts, K = top_k. Gradients come from PyTorch autograd.
Short and plain on purpose: when a backend and this file disagree, this file is read first.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.routing import RoutingPlan, build_routing_plan


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


def apply_activation(hidden: Tensor, activation: str, glu: bool) -> Tensor:
    """hidden: [N, H1] -> [N, H]. With GLU the first half is the gate: act(gate) * up."""
    act = ACTIVATIONS[activation]
    if not glu:
        return act(hidden)
    gate, up = hidden.chunk(2, dim=-1)
    return act(gate) * up


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
    bounds = expert_offsets.tolist()
    out = x.new_zeros(x.shape[0], weight.shape[1])
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
    glu: bool = False,
) -> Tensor:
    """The sparse MoE MLP given a routing decision.

    x: [T, D]; top_k_weights: [T, K] float; top_k_idx: [T, K] int64 (ids outside [0, E) dropped);
    w1: [E, H1, D]; b1: [E, H1] or None; w2: [E, O, H]; b2: [E, O] or None -> [T, O] in x.dtype.
    y[t] = sum_k w[t,k] * (act(x[t] @ w1[e].T + b1[e]) @ w2[e].T + b2[e]), e = idx[t,k].
    """
    plan = build_routing_plan(top_k_idx, w1.shape[0])
    hidden = grouped_gemm(permute(x, plan), w1, plan.expert_offsets, b1)
    hidden = apply_activation(hidden, activation, glu)
    rows = grouped_gemm(hidden, w2, plan.expert_offsets, b2)
    return combine(rows, top_k_weights, top_k_idx, plan)


def unavailable_reason(device: torch.device) -> str | None:
    """The reference runs wherever PyTorch runs."""
    return None
