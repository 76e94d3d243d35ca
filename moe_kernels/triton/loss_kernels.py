"""Triton kernels of the router's losses (moe_kernels.reference.router_losses): each row's fp32 softmax and
log-sum-exp, reduced to the balance and z losses, and their gradient.

T tokens, E experts, S samples of T / S tokens (the balance weights have one row per sample). Launched by
moe_kernels/triton/losses.py (through runtime.launch, which defines these kernels once per mode:
compiled, or interpreted on CPU tensors).
"""

import triton
import triton.language as tl


@triton.jit
def _rows(logits_ptr, weights_ptr, tokens, token_mask, experts, expert_mask, tokens_per_sample, stride_lt,
          stride_le, stride_ws, stride_we):
    """(probs, lse, balance weights) of a [BLOCK_T, BLOCK_E] tile, fp32, PyTorch's softmax and logsumexp
    at the edges (a +inf logit: lse +inf, NaN probs; a row of -inf: lse -inf, NaN probs)."""
    mask = token_mask[:, None] & expert_mask[None, :]
    logits = tl.load(logits_ptr + tokens[:, None] * stride_lt + experts[None, :] * stride_le,
                     mask=mask, other=0.0).to(tl.float32)
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)
    exp = tl.exp(logits - shift[:, None])
    total = tl.sum(exp, axis=1)
    samples = tokens // tokens_per_sample
    weights = tl.load(weights_ptr + samples[:, None] * stride_ws + experts[None, :] * stride_we,
                      mask=mask, other=0).to(tl.float32)  # float weights or integer counts
    return exp / total[:, None], shift + tl.log(total), weights


@triton.jit
def router_losses_kernel(
    logits_ptr, weights_ptr, partials_ptr, T, E, tokens_per_sample,
    stride_lt, stride_le, stride_ws, stride_we, z_weight, balance_scale,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Each program's share of balance = balance_scale * sum p * w and z = z_weight * sum lse^2 (z_weight =
    z_scale / T) over its BLOCK_T tokens.

    Reads logits [T, E], balance weights [S, E] (float or integer counts); writes partials [2, programs] fp32
    (balance shares, then z shares; summed in a fixed order by router_losses_reduce_kernel). Grid:
    (cdiv(T, BLOCK_T),).
    """
    pid = tl.program_id(0)
    tokens = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    probs, lse, weights = _rows(logits_ptr, weights_ptr, tokens, token_mask, experts, expert_mask, tokens_per_sample,
                                stride_lt, stride_le, stride_ws, stride_we)
    mask = token_mask[:, None] & expert_mask[None, :]
    balance = tl.sum(tl.sum(tl.where(mask, probs * weights, 0.0), axis=1), axis=0) * balance_scale
    z = tl.sum(tl.where(token_mask, lse * lse, 0.0), axis=0) * z_weight
    tl.store(partials_ptr + pid, balance)
    tl.store(partials_ptr + tl.num_programs(0) + pid, z)


@triton.jit
def router_losses_reduce_kernel(
    partials_ptr, balance_ptr, z_ptr, aux_ptr, num_partials, balance_coef, z_coef,
    BLOCK_P: tl.constexpr,
):
    """balance, z (the sums of the partials, in a fixed order: deterministic) and aux = balance_coef *
    balance + z_coef * z, three fp32 scalars; zeros when there are no partials (T = 0). Grid: (1,)."""
    offsets = tl.arange(0, BLOCK_P)
    balance = tl.zeros((BLOCK_P,), dtype=tl.float32)
    z = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_P):
        mask = start + offsets < num_partials
        balance += tl.load(partials_ptr + start + offsets, mask=mask, other=0.0)
        z += tl.load(partials_ptr + num_partials + start + offsets, mask=mask, other=0.0)
    balance_sum = tl.sum(balance, axis=0)
    z_sum = tl.sum(z, axis=0)
    tl.store(balance_ptr, balance_sum)
    tl.store(z_ptr, z_sum)
    tl.store(aux_ptr, balance_sum * balance_coef + z_sum * z_coef)


@triton.jit
def router_losses_backward_kernel(
    logits_ptr, weights_ptr, grad_balance_ptr, grad_z_ptr, grad_aux_ptr, grad_logits_ptr, T, E, tokens_per_sample,
    stride_lt, stride_le, stride_ws, stride_we, stride_gt, stride_ge, z_weight, balance_coef, z_coef, balance_scale,
    HAS_GRAD_BALANCE: tl.constexpr, HAS_GRAD_Z: tl.constexpr, HAS_GRAD_AUX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """d logits = p * (g_b * balance_scale * (w - sum_e p_e w_e) + g_z * 2 * z_weight * lse), with g_b =
    dL/dbalance + balance_coef * dL/daux and g_z = dL/dz + z_coef * dL/daux (the softmax's Jacobian applied to the
    balance weights, and the log-sum-exp's, whose gradient is p). Softmax and lse are recomputed, not stored.

    Reads logits [T, E], weights [S, E] and the three scalar gradients (those present); writes grad_logits
    [T, E]. Grid: (cdiv(T, BLOCK_T),).
    """
    grad_b = 0.0
    grad_z = 0.0
    if HAS_GRAD_BALANCE:
        grad_b += tl.load(grad_balance_ptr).to(tl.float32)
    if HAS_GRAD_Z:
        grad_z += tl.load(grad_z_ptr).to(tl.float32)
    if HAS_GRAD_AUX:
        grad_aux = tl.load(grad_aux_ptr).to(tl.float32)
        grad_b += balance_coef * grad_aux
        grad_z += z_coef * grad_aux
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    probs, lse, weights = _rows(logits_ptr, weights_ptr, tokens, token_mask, experts, expert_mask, tokens_per_sample,
                                stride_lt, stride_le, stride_ws, stride_we)
    centred = weights - tl.sum(probs * weights, axis=1)[:, None]
    grad = probs * ((grad_b * balance_scale) * centred + (2.0 * z_weight * grad_z) * lse[:, None])
    tl.store(grad_logits_ptr + tokens[:, None] * stride_gt + experts[None, :] * stride_ge,
             grad.to(grad_logits_ptr.dtype.element_ty), mask=token_mask[:, None] & expert_mask[None, :])
