"""Triton top-k gating: the fused router (fp32 softmax, top-k, renormalisation) as a custom op with
its fake and autograd (the backward recomputes the softmax). T tokens, E experts, K top_k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_gating_args
from moe_kernels.triton import runtime
from moe_kernels.triton.runtime import cdiv, check_device, check_dtype, device_guard, eager, next_power_of_2, row_tiles


@runtime.shape_cache
def _gating_launch(name: str, num_tokens: int, num_experts: int, strides: tuple, top_k: int,
                   normalize: bool, block_tokens: int = 0, accumulate: bool = False) -> runtime.Launch:
    """topk_gating_kernel or its backward: BLOCK_T tokens of all E logits per program. ``block_tokens`` (forward
    only): the routing blocks' tokens, when the kernel counts each block's ids for the routing plan;
    ``accumulate`` (backward only): an incoming logits gradient is added."""
    block_t, block_e = row_tiles(num_experts)
    meta = dict(TOP_K=top_k, NORMALIZE=normalize, BLOCK_T=block_tokens or block_t, BLOCK_E=block_e,
                BLOCK_K=next_power_of_2(top_k))
    if name == "topk_gating_kernel":
        meta.update(HISTOGRAM=block_tokens > 0, BLOCK_B=next_power_of_2(num_experts + 1) if block_tokens else 1)
    else:
        meta.update(ACCUMULATE=accumulate)
    return runtime.Launch(name, (cdiv(num_tokens, meta["BLOCK_T"]),), (num_tokens, num_experts, *strides), meta)


@torch.library.custom_op("cumo_triton::topk_gating", mutates_args=())
def _topk_gating_op(logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    check_gating_args(logits, top_k, normalize)
    return _topk_gating(logits, top_k, normalize)


def _topk_gating(logits: Tensor, top_k: int, normalize: bool, block_counts: Tensor | None = None,
                 block_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """The gating launcher, arguments already checked. ``block_counts`` [blocks, E+1] int64: filled with the
    histogram of each routing block of ``block_tokens`` tokens (``routing.gate_and_plan``)."""
    check_dtype(logits, "the Triton gating kernels")  # fp64 logits: a TypeError, not fp32 weights and routing
    interpret = check_device(logits)
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens > 0:
        spec = _gating_launch("topk_gating_kernel", num_tokens, num_experts, logits.stride(), top_k, normalize,
                              block_tokens if block_counts is not None else 0)
        with device_guard(logits):
            runtime.launch(spec, interpret, logits, weights, ids, block_counts if block_counts is not None else ids)
    return weights, ids


@_topk_gating_op.register_fake
def _(logits, top_k, normalize):
    num_tokens = logits.shape[0]
    return (logits.new_empty(num_tokens, top_k, dtype=torch.float32),
            logits.new_empty(num_tokens, top_k, dtype=torch.int64))


@torch.library.custom_op("cumo_triton::topk_gating_backward", mutates_args=())
def _topk_gating_backward_op(logits: Tensor, ids: Tensor, grad_weights: Tensor, top_k: int,
                             normalize: bool) -> Tensor:
    return _topk_gating_backward(logits, ids, grad_weights, top_k, normalize)


def _topk_gating_backward(logits: Tensor, ids: Tensor, grad_weights: Tensor, top_k: int, normalize: bool,
                          grad_in: Tensor | None = None) -> Tensor:
    """The gating backward launcher: d logits from d weights (the softmax is recomputed), plus ``grad_in`` [T, E]
    (the logits' gradient from their other uses, added in the kernel) when given."""
    interpret = check_device(logits, ids, grad_weights)
    num_tokens, num_experts = logits.shape
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if num_tokens > 0:
        accumulate = grad_in is not None
        spec = _gating_launch("topk_gating_backward_kernel", num_tokens, num_experts,
                              (*logits.stride(), *(grad_in.stride() if accumulate else (0, 0)), *grad_logits.stride()),
                              top_k, normalize, accumulate=accumulate)
        with device_guard(logits):
            runtime.launch(spec, interpret, logits, ids, runtime.flat(grad_weights, torch.float32),
                           grad_in if accumulate else grad_logits, grad_logits)
    return grad_logits


@_topk_gating_backward_op.register_fake
def _(logits, ids, grad_weights, top_k, normalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _topk_gating_setup(ctx, inputs, output):
    logits, top_k, normalize = inputs
    _, ids = output
    ctx.save_for_backward(logits, ids)
    ctx.top_k, ctx.normalize = top_k, normalize
    ctx.mark_non_differentiable(ids)
    ctx.set_materialize_grads(False)


def _topk_gating_grads(ctx, grad_weights: Tensor | None, direct: bool) -> tuple:
    if grad_weights is None:
        return None, None, None
    logits, ids = ctx.saved_tensors
    backward = _topk_gating_backward if direct else _topk_gating_backward_op
    return backward(logits, ids, grad_weights, ctx.top_k, ctx.normalize), None, None


def _topk_gating_op_backward(ctx, grad_weights, _grad_ids):
    return _topk_gating_grads(ctx, grad_weights, direct=False)


_topk_gating_op.register_autograd(_topk_gating_op_backward, setup_context=_topk_gating_setup)


class _EagerTopKGating(torch.autograd.Function):
    """Eager training: the custom op's launchers and context without its dispatch (see
    experts._EagerExpertMLP)."""

    # forward(ctx, ...), not a separate setup_context: Function.apply binds the arguments of a forward
    # without ctx through inspect.signature on every call (~10 us).
    @staticmethod
    def forward(ctx, logits, top_k, normalize):
        output = _topk_gating(logits, top_k, normalize)
        _topk_gating_setup(ctx, (logits, top_k, normalize), output)
        return output

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        return _topk_gating_grads(ctx, grad_weights, direct=True)


def topk_gating(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """The fused Triton router (contract: ``moe_kernels.ops.topk_gating``, checked by moe_kernels/ops.py)."""
    if eager(logits):
        if torch.is_grad_enabled() and logits.requires_grad:
            return _EagerTopKGating.apply(logits, top_k, normalize)
        return _topk_gating(logits, top_k, normalize)
    return _topk_gating_op(logits, top_k, normalize)
