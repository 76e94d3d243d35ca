"""Routing plan: where each (token, slot) assignment goes in expert-contiguous order.

Shapes: T tokens, K = top_k slots per token, E experts. A *slot* is the flat index
``t * K + k`` of one assignment. A *row* is a position in the expert-sorted order.

Convention shared by every backend: an expert index outside ``[0, E)`` marks a *dropped*
assignment (capacity overflow, or a sentinel slot of another rank under expert parallelism).
Dropped slots sort after every kept one, into rows ``[offsets[E], T*K)``, and contribute zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class RoutingPlan(NamedTuple):
    """Expert-contiguous order of the T*K assignments.

    expert_counts:  [E] int64, kept assignments per expert.
    expert_offsets: [E+1] int64, exclusive scan of the counts; expert e owns rows
                    ``[offsets[e], offsets[e+1])``; ``offsets[E]`` is the number of kept rows.
    sorted_slots:   [T*K] int64, the slot held by each row (token = slot // top_k).
    slot_rows:      [T*K] int64, inverse of ``sorted_slots``: the row of each slot.
    top_k:          K.
    """

    expert_counts: Tensor
    expert_offsets: Tensor
    sorted_slots: Tensor
    slot_rows: Tensor
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.expert_counts.numel()

    @property
    def sorted_tokens(self) -> Tensor:
        """[T*K] int64: the token that each row reads."""
        return torch.div(self.sorted_slots, self.top_k, rounding_mode="floor")


def expert_buckets(top_k_idx: Tensor, num_experts: int) -> Tensor:
    """top_k_idx: [T, K] int -> [T*K] int64 bucket per slot, dropped slots in bucket E."""
    flat = top_k_idx.reshape(-1).to(torch.int64)
    kept = (flat >= 0) & (flat < num_experts)
    return torch.where(kept, flat, torch.full_like(flat, num_experts))


def build_routing_plan(top_k_idx: Tensor, num_experts: int) -> RoutingPlan:
    """Stable counting sort of the T*K assignments by expert.

    top_k_idx: [T, K] integer expert ids (ids outside [0, E) are dropped) -> RoutingPlan.
    Within an expert, rows keep slot order (token-major), so the plan is deterministic.
    Uses scatter-add for the histogram (no host sync on GPU, unlike ``bincount``) and a
    stable sort of small integer keys, which PyTorch runs as a radix (counting) sort.
    """
    if top_k_idx.dim() != 2:
        raise ValueError(f"top_k_idx must be [T, K], got shape {tuple(top_k_idx.shape)}")
    top_k = top_k_idx.shape[1]
    buckets = expert_buckets(top_k_idx, num_experts)
    histogram = torch.zeros(num_experts + 1, dtype=torch.int64, device=buckets.device)
    histogram.scatter_add_(0, buckets, torch.ones_like(buckets))
    counts = histogram[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=buckets.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    sorted_slots = torch.sort(buckets, stable=True).indices
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(sorted_slots.numel(), device=buckets.device)
    return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)


def apply_capacity(top_k_idx: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Drop assignments past each expert's capacity (GShard priority).

    top_k_idx: [T, K] int64 -> [T, K] int64 with overflow assignments set to E (dropped).
    Priority: every token's first choice before any second choice, then token order, so a
    token loses its lower-ranked experts first.
    """
    num_tokens, top_k = top_k_idx.shape
    priority_order = top_k_idx.t().reshape(-1)  # k-major: all first choices, then all second...
    plan = build_routing_plan(priority_order.unsqueeze(1), num_experts)
    rows = plan.slot_rows
    buckets = expert_buckets(priority_order.unsqueeze(1), num_experts)
    starts = plan.expert_offsets[buckets.clamp(max=num_experts - 1)]
    rank_in_expert = rows - starts
    kept = (buckets < num_experts) & (rank_in_expert < capacity)
    dropped = torch.where(kept, priority_order, torch.full_like(priority_order, num_experts))
    return dropped.view(top_k, num_tokens).t().contiguous()


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Switch/GShard capacity: ceil(capacity_factor * T * K / E) assignments per expert."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)
