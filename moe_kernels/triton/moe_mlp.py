"""Triton MoE MLP inference (``moe_kernels.ops.moe_mlp`` without gradients): the router's GEMM, gating, routing
plan and experts as one launch sequence, the plan built once and its counts returned as the expert load.

Decode and small batches (T*K slots in one program): route_one_block_kernel, fc1, fc2, combine: four launches.
Larger batches: the router's GEMM (cuBLAS), topk_gating_kernel, the routing plan (three kernels), fc1, fc2,
combine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.reference import GluSpec
from moe_kernels.triton.experts import _expert_mlp_forward
from moe_kernels.triton.gating import _topk_gating
from moe_kernels.triton.routing import route_one_block
from moe_kernels.triton.runtime import check_device, check_dtype, device_guard, eager


def moe_mlp_inference(x: Tensor, router_weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                      b2: Tensor | None, top_k: int, normalize: bool, activation: str,
                      glu: bool | GluSpec) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(out, top_k_weights, top_k_idx, expert_load) of ``ops.moe_mlp`` (arguments checked there), or None when
    the call is not for this path: a gradient is wanted, or the tensors are traced or subclasses (then the ops
    run one by one, through their autograd and custom ops)."""
    tensors = (x, router_weight, w1, b1, w2, b2)
    if not eager(*tensors) or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return None
    check_dtype(x, "the Triton expert kernels")
    interpret = check_device(*tensors)
    with device_guard(x):
        routed = route_one_block(x, router_weight, top_k, normalize, interpret)
    if routed is None:
        weights, ids = _topk_gating(F.linear(x, router_weight), top_k, normalize)
        plan = None
    else:
        weights, ids, plan = routed
    out, _, _, _, plan = _expert_mlp_forward(x, weights, ids, w1, b1, w2, b2, activation, glu, False, False, plan)
    return out, weights, ids, plan.expert_counts
