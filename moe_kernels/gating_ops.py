"""Autograd and fake (meta) registrations of the compiled gating and routing ops.

The C++ ops ``cumo::topk_gating`` (CPU) and ``cumo_cuda::topk_gating`` (CUDA) only run forward;
this file gives them a backward and a fake implementation, so they are differentiable in the
logits and traceable by torch.compile. ``cumo::routing_plan`` and ``cumo_cuda::routing_plan`` get a
fake implementation.
Call the ``register_*`` functions after the extension that defines the op is loaded; they are
idempotent.

Shapes: T tokens, E experts, K = top_k, N = T*K slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_gating_args

_REGISTERED: set[str] = set()


def topk_gating_backward(
    grad_weights: Tensor, logits: Tensor, top_k_idx: Tensor, normalize: bool
) -> Tensor:
    """Gradient of softmax -> gather(top_k_idx) -> (renormalise) w.r.t. the logits.

    grad_weights: [T, K] float; logits: [T, E] float; top_k_idx: [T, K] int64 -> [T, E] logits.dtype.
    Computed in float32, or float64 for float64 logits (the weights' dtype, as the forward).
    """
    accumulate = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(accumulate), dim=-1)
    grad = grad_weights.to(accumulate)
    if normalize:
        selected = probs.gather(1, top_k_idx)
        total = selected.sum(dim=-1, keepdim=True)
        weights = selected / total
        grad = (grad - (grad * weights).sum(dim=-1, keepdim=True)) / total
    grad_probs = torch.zeros_like(probs).scatter_add_(1, top_k_idx, grad)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
    return grad_logits.to(logits.dtype)


def _gating_fake(logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    check_gating_args(logits, top_k, normalize, allow_meta=True)
    num_tokens = logits.shape[0]
    weights = logits.new_empty((num_tokens, top_k), dtype=torch.promote_types(logits.dtype, torch.float32))
    idx = logits.new_empty((num_tokens, top_k), dtype=torch.int64)
    return weights, idx


def _gating_setup_context(ctx, inputs, output) -> None:
    logits, _top_k, normalize = inputs
    _weights, idx = output
    ctx.save_for_backward(logits, idx)
    ctx.normalize = normalize


def _gating_backward(ctx, grad_weights: Tensor | None, _grad_idx):
    logits, idx = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return topk_gating_backward(grad_weights, logits, idx, ctx.normalize), None, None


def register_topk_gating(qualname: str) -> None:
    """Fake + autograd for a ``topk_gating(Tensor logits, int top_k, bool normalize)`` op."""
    if qualname in _REGISTERED:
        return
    torch.library.register_fake(qualname)(_gating_fake)
    torch.library.register_autograd(qualname, _gating_backward, setup_context=_gating_setup_context)
    _REGISTERED.add(qualname)


def _routing_plan_fake(top_k_idx: Tensor, num_experts: int):
    torch._check(top_k_idx.dim() == 2, lambda: "routing_plan: top_k_idx must be [T, K]")
    torch._check(num_experts >= 1, lambda: f"routing_plan: num_experts must be >= 1, got {num_experts}")
    num_slots = top_k_idx.shape[0] * top_k_idx.shape[1]
    long = dict(dtype=torch.int64)
    return (
        top_k_idx.new_empty((num_experts,), **long),
        top_k_idx.new_empty((num_experts + 1,), **long),
        top_k_idx.new_empty((num_slots,), **long),
        top_k_idx.new_empty((num_slots,), **long),
    )


def register_routing_plan(qualname: str) -> None:
    """Fake for a ``routing_plan(Tensor top_k_idx, int num_experts)`` op."""
    if qualname in _REGISTERED:
        return
    torch.library.register_fake(qualname)(_routing_plan_fake)
    _REGISTERED.add(qualname)
