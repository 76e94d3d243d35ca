"""Triton MoE MLP (``moe_kernels.ops.moe_mlp``), eager calls: the router's GEMM, gating, routing plan and experts as
one launch sequence that routes once (the plan the experts run on also gives the expert load).

Without gradients, for decode and small batches (T*K slots in one program): route_one_block_kernel, fc1, fc2,
combine: four launches. Past that: the router's GEMM (cuBLAS), topk_gating_kernel counting the routing blocks'
ids as it writes them, the plan's scan and scatter, fc1, fc2, combine: seven. With gradients: the router's GEMM,
the gating kernel (counting the blocks), the plan (one or two kernels), fc1, fc2, combine, through the eager
autograd Functions of gating.py and experts.py.
Capacity drops add a plan of the ids in priority order and capacity_kernel (whose plan also gives the load), where
``routing.apply_capacity`` runs about twenty-five aten ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.reference import GluSpec
from moe_kernels.triton.experts import _expert_mlp_forward, expert_mlp_and_load
from moe_kernels.triton.gating import topk_gating
from moe_kernels.triton.routing import capacity_drop, gate_and_plan, route_one_block
from moe_kernels.triton.runtime import check_device, check_dtype, device_guard, eager


def moe_mlp(x: Tensor, router_input: Tensor | None, router_weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
            b2: Tensor | None, top_k: int, normalize: bool, activation: str, glu: bool | GluSpec,
            capacity: int | None, return_logits: bool) -> tuple | None:
    """``ops.moe_mlp``'s (out, top_k_weights, top_k_idx, expert_load, logits or None), arguments checked there; or
    None for a call this path leaves to the ops one by one: traced or subclassed tensors (which need the custom
    ops)."""
    tensors = (x, router_input, router_weight, w1, b1, w2, b2)
    if not eager(*tensors):
        return None
    check_dtype(x, "the Triton expert kernels")
    interpret = check_device(*tensors)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not (wants_grad or return_logits) and router_input is None and capacity is None:
        with device_guard(x):
            routed = route_one_block(x, router_weight, top_k, normalize, interpret)
        if routed is not None:  # inference at decode and small batches: four launches
            weights, ids, plan = routed
            out = _expert_mlp_forward(x, weights, ids, w1, b1, w2, b2, activation, glu, False, False, plan,
                                      interpret)[0]
            return out, weights, ids, plan.expert_counts, None
    logits = F.linear(x if router_input is None else router_input, router_weight)
    if capacity is not None:  # the load: the count of the plan in priority order that the drops read, before them
        weights, ids = topk_gating(logits, top_k, normalize)
        kept, load = capacity_drop(ids, w1.shape[0], capacity, interpret)
        out = expert_mlp_and_load(x, weights, kept, w1, b1, w2, b2, activation, glu)[0]
        return out, weights, ids, load, logits if return_logits else None
    weights, ids, plan = gate_and_plan(logits, top_k, normalize, interpret)
    out, load = expert_mlp_and_load(x, weights, ids, w1, b1, w2, b2, activation, glu, plan)
    return out, weights, ids, load, logits if return_logits else None
