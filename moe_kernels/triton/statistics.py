"""Triton router statistics (contract: ``moe_kernels.ops.router_statistics``): each row's fp32 softmax and
log-sum-exp in one kernel, their gradient in one more, as a custom op with its fake and autograd.

What it saves is launches: PyTorch's softmax of bf16 logits is a cast and a softmax, its logsumexp about
nine kernels (max, masking of infinities, subtract, exp, sum, log, add), and their backwards five more,
each 10-20 us of host time on a GPU host, in every training step. T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_logits
from moe_kernels.triton import runtime
from moe_kernels.triton.runtime import cdiv, check_device, device_guard, eager, row_tiles

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@runtime.shape_cache
def _statistics_launch(name: str, num_tokens: int, num_experts: int, scalars: tuple,
                       constexprs: tuple) -> runtime.Launch:
    block_t, block_e = row_tiles(num_experts)
    return runtime.Launch(name, (cdiv(num_tokens, block_t),), (num_tokens, num_experts, *scalars),
                          dict(constexprs, BLOCK_T=block_t, BLOCK_E=block_e))


def _router_statistics(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The forward launcher, logits already checked against the contract."""
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton router statistics take {[str(d) for d in SUPPORTED_DTYPES]}, got {logits.dtype}")
    interpret = check_device(logits)
    num_tokens, num_experts = logits.shape
    probs = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=logits.device)
    lse = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    if num_tokens > 0:
        launch = _statistics_launch("router_statistics_kernel", num_tokens, num_experts, logits.stride(), ())
        with device_guard(logits):
            runtime.launch(launch, interpret, logits, probs, lse)
    return probs, lse


def _router_statistics_backward(probs: Tensor, grad_probs: Tensor | None, grad_lse: Tensor | None,
                                logits_dtype: torch.dtype) -> Tensor:
    """d logits [T, E] in ``logits_dtype`` from the forward's probs and the gradients of its outputs."""
    num_tokens, num_experts = probs.shape
    for name, grad, shape in (("grad_probs", grad_probs, (num_tokens, num_experts)), ("grad_lse", grad_lse,
                                                                                       (num_tokens,))):
        if grad is not None and tuple(grad.shape) != shape:
            raise ValueError(f"router_statistics_backward: {name} must be {list(shape)}, got {list(grad.shape)}")
    interpret = check_device(probs, grad_probs, grad_lse)
    grad_logits = torch.empty(num_tokens, num_experts, dtype=logits_dtype, device=probs.device)
    if num_tokens > 0:
        strides = (*(grad_probs.stride() if grad_probs is not None else (0, 0)),
                   grad_lse.stride(0) if grad_lse is not None else 0, *grad_logits.stride())
        launch = _statistics_launch("router_statistics_backward_kernel", num_tokens, num_experts, strides,
                                    (("HAS_GRAD_PROBS", grad_probs is not None), ("HAS_GRAD_LSE", grad_lse is not None)))
        with device_guard(probs):
            runtime.launch(launch, interpret, probs, grad_probs if grad_probs is not None else probs,
                           grad_lse if grad_lse is not None else probs, grad_logits)
    return grad_logits


@torch.library.custom_op("cumo_triton::router_statistics", mutates_args=())
def _router_statistics_op(logits: Tensor) -> tuple[Tensor, Tensor]:
    check_logits(logits, "router_statistics")
    return _router_statistics(logits)


@_router_statistics_op.register_fake
def _(logits):
    num_tokens, num_experts = logits.shape
    return (logits.new_empty(num_tokens, num_experts, dtype=torch.float32),
            logits.new_empty(num_tokens, dtype=torch.float32))


@torch.library.custom_op("cumo_triton::router_statistics_backward", mutates_args=())
def _router_statistics_backward_op(probs: Tensor, grad_probs: Tensor | None, grad_lse: Tensor | None,
                                   logits_dtype: torch.dtype) -> Tensor:
    return _router_statistics_backward(probs, grad_probs, grad_lse, logits_dtype)


@_router_statistics_backward_op.register_fake
def _(probs, grad_probs, grad_lse, logits_dtype):
    return probs.new_empty(probs.shape, dtype=logits_dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.logits_dtype = inputs[0].dtype
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero-filled [T, E]


def _grads(ctx, grad_probs: Tensor | None, grad_lse: Tensor | None, direct: bool) -> Tensor | None:
    if grad_probs is None and grad_lse is None:
        return None
    backward = _router_statistics_backward if direct else _router_statistics_backward_op
    return backward(ctx.saved_tensors[0], grad_probs, grad_lse, ctx.logits_dtype)


_router_statistics_op.register_autograd(lambda ctx, grad_probs, grad_lse: _grads(ctx, grad_probs, grad_lse, False),
                                        setup_context=_setup)


class _EagerRouterStatistics(torch.autograd.Function):
    """Eager training: the custom op's launchers and context without its dispatch (see
    experts._EagerExpertMLP)."""

    @staticmethod
    def forward(ctx, logits):
        output = _router_statistics(logits)
        _setup(ctx, (logits,), output)
        return output

    @staticmethod
    def backward(ctx, grad_probs, grad_lse):
        return _grads(ctx, grad_probs, grad_lse, direct=True)


def router_statistics(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(probs [T, E], lse [T]) fp32 of the logits (checked by moe_kernels/ops.py); float32, float16 or
    bfloat16 logits."""
    if eager(logits):
        if torch.is_grad_enabled() and logits.requires_grad:
            return _EagerRouterStatistics.apply(logits)
        return _router_statistics(logits)
    return _router_statistics_op(logits)
