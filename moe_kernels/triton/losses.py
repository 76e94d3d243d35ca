"""Triton router losses (contract: ``moe_kernels.ops.router_losses``): the balance, z and weighted auxiliary
loss in two small kernels forward (per-block shares, then their sum in a fixed order) and one backward,
as a custom op with its fake and autograd.

What it saves is launches, each 10-20 us of host time on a GPU host in every training step: PyTorch's
version casts the logits, runs a softmax and a logsumexp (about nine kernels: max, masking of infinities,
subtract, exp, sum, log, add), then the loss arithmetic (a reduction, a dot product, a square, a mean, the
weighted sum), and backward as many again. T tokens, E experts, S samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_router_losses_args
from moe_kernels.triton import runtime
from moe_kernels.triton.runtime import (
    cdiv,
    check_device,
    check_dtype,
    device_guard,
    eager,
    next_power_of_2,
    row_tiles,
)

REDUCE_TILE = 1024  # partials summed per step of the reduce kernel


@runtime.shape_cache
def _rows_launch(name: str, num_tokens: int, num_experts: int, tokens_per_sample: int, scalars: tuple,
                 constexprs: tuple) -> runtime.Launch:
    block_t, block_e = row_tiles(num_experts)
    return runtime.Launch(name, (cdiv(num_tokens, block_t),), (num_tokens, num_experts, tokens_per_sample, *scalars),
                          dict(constexprs, BLOCK_T=block_t, BLOCK_E=block_e))


@runtime.shape_cache
def _reduce_launch(num_partials: int, balance_coef: float, z_coef: float) -> runtime.Launch:
    return runtime.Launch("router_losses_reduce_kernel", (1,), (num_partials, balance_coef, z_coef),
                          dict(BLOCK_P=min(REDUCE_TILE, next_power_of_2(max(num_partials, 1)))))


def _router_losses(logits: Tensor, balance_weights: Tensor, z_scale: float, balance_coef: float,
                   z_coef: float, balance_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The forward launchers, arguments already checked against the contract."""
    check_dtype(logits, "the Triton router losses")
    interpret = check_device(logits, balance_weights)
    num_tokens, num_experts = logits.shape
    balance, z, aux = (torch.empty((), dtype=torch.float32, device=logits.device) for _ in range(3))
    with device_guard(logits):
        partials, num_partials = balance, 0  # no tokens: the reduce kernel writes zeros
        if num_tokens > 0:
            launch = _rows_launch("router_losses_kernel", num_tokens, num_experts,
                                  num_tokens // balance_weights.shape[0],
                                  (*logits.stride(), *balance_weights.stride(), z_scale / num_tokens,
                                   float(balance_scale)), ())
            num_partials = launch.grid[0]
            partials = torch.empty(2, num_partials, dtype=torch.float32, device=logits.device)
            runtime.launch(launch, interpret, logits, balance_weights, partials)
        runtime.launch(_reduce_launch(num_partials, float(balance_coef), float(z_coef)), interpret, partials,
                       balance, z, aux)
    return balance, z, aux


def _router_losses_backward(logits: Tensor, balance_weights: Tensor, grad_balance: Tensor | None,
                            grad_z: Tensor | None, grad_aux: Tensor | None, z_scale: float, balance_coef: float,
                            z_coef: float, balance_scale: float) -> Tensor:
    """d logits [T, E], in the logits' dtype, from the gradients of the three losses (None: not used)."""
    grads = {"grad_balance": grad_balance, "grad_z": grad_z, "grad_aux": grad_aux}
    for name, grad in grads.items():
        if grad is not None and grad.dim() != 0:
            raise ValueError(f"router_losses_backward: {name} must be a 0-d tensor, got shape {list(grad.shape)}")
    interpret = check_device(logits, balance_weights, grad_balance, grad_z, grad_aux)
    num_tokens, num_experts = logits.shape
    grad_logits = torch.empty(num_tokens, num_experts, dtype=logits.dtype, device=logits.device)
    if num_tokens > 0:
        flags = tuple((f"HAS_{name.upper()}", grad is not None) for name, grad in grads.items())
        launch = _rows_launch("router_losses_backward_kernel", num_tokens, num_experts,
                              num_tokens // balance_weights.shape[0],
                              (*logits.stride(), *balance_weights.stride(), *grad_logits.stride(), z_scale / num_tokens,
                               float(balance_coef), float(z_coef), float(balance_scale)), flags)
        with device_guard(logits):
            runtime.launch(launch, interpret, logits, balance_weights,
                           *[grad if grad is not None else logits for grad in grads.values()], grad_logits)
    return grad_logits


@torch.library.custom_op("cumo_triton::router_losses", mutates_args=())
def _router_losses_op(logits: Tensor, balance_weights: Tensor, z_scale: float, balance_coef: float,
                      z_coef: float, balance_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    check_router_losses_args(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)
    return _router_losses(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)


@_router_losses_op.register_fake
def _(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale):
    return tuple(logits.new_empty((), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("cumo_triton::router_losses_backward", mutates_args=())
def _router_losses_backward_op(logits: Tensor, balance_weights: Tensor, grad_balance: Tensor | None,
                               grad_z: Tensor | None, grad_aux: Tensor | None, z_scale: float, balance_coef: float,
                               z_coef: float, balance_scale: float) -> Tensor:
    check_router_losses_args(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)
    return _router_losses_backward(logits, balance_weights, grad_balance, grad_z, grad_aux, z_scale, balance_coef,
                                   z_coef, balance_scale)


@_router_losses_backward_op.register_fake
def _(logits, balance_weights, grad_balance, grad_z, grad_aux, z_scale, balance_coef, z_coef, balance_scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, balance_weights, *ctx.scalars = inputs
    ctx.save_for_backward(logits, balance_weights)
    ctx.set_materialize_grads(False)  # a loss that does not reach the result keeps a None gradient


def _grads(ctx, grad_balance: Tensor | None, grad_z: Tensor | None, grad_aux: Tensor | None, direct: bool) -> tuple:
    if grad_balance is None and grad_z is None and grad_aux is None:
        return (None,) * 6
    backward = _router_losses_backward if direct else _router_losses_backward_op
    grad_logits = backward(*ctx.saved_tensors, grad_balance, grad_z, grad_aux, *ctx.scalars)
    return grad_logits, None, None, None, None, None


_router_losses_op.register_autograd(lambda ctx, *grads: _grads(ctx, *grads, direct=False), setup_context=_setup)


class _EagerRouterLosses(torch.autograd.Function):
    """Eager training: the custom op's launchers and context without its dispatch (see
    experts._EagerExpertMLP)."""

    @staticmethod
    def forward(ctx, logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale):
        output = _router_losses(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)
        _setup(ctx, (logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale), output)
        return output

    @staticmethod
    def backward(ctx, grad_balance, grad_z, grad_aux):
        return _grads(ctx, grad_balance, grad_z, grad_aux, direct=True)


def router_losses(logits: Tensor, balance_weights: Tensor, z_scale: float, balance_coef: float,
                  z_coef: float, balance_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(balance, z, aux) fp32 scalars (arguments checked by moe_kernels/ops.py); float32, float16 or bfloat16
    logits; float or integer balance weights (read in fp32, times balance_scale), which get no gradient."""
    args = (logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)
    if eager(logits, balance_weights):
        if torch.is_grad_enabled() and logits.requires_grad:
            return _EagerRouterLosses.apply(*args)
        return _router_losses(*args)
    return _router_losses_op(*args)
