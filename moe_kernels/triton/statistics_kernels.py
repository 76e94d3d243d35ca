"""Triton kernels of the router's statistics: each row's fp32 softmax and log-sum-exp, and their gradient.

T tokens, E experts. Launched by moe_kernels/triton/statistics.py (through runtime.launch, which defines
these kernels once per mode: compiled, or interpreted on CPU tensors).
"""

import triton
import triton.language as tl


@triton.jit
def router_statistics_kernel(
    logits_ptr, probs_ptr, lse_ptr, T, E, stride_lt, stride_le,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """probs = softmax(logits), lse = logsumexp(logits) per row, in fp32, as PyTorch defines them at the
    edges: a row with a +inf logit has lse +inf (and NaN probs), an all -inf row lse -inf.

    Reads logits [T, E]; writes probs [T, E] and lse [T] fp32, contiguous. Grid: (cdiv(T, BLOCK_T),).
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    mask = token_mask[:, None] & expert_mask[None, :]
    logits = tl.load(logits_ptr + tokens[:, None] * stride_lt + experts[None, :] * stride_le,
                     mask=mask, other=0.0).to(tl.float32)
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)
    exp = tl.exp(logits - shift[:, None])
    total = tl.sum(exp, axis=1)
    tl.store(probs_ptr + tokens[:, None] * E + experts[None, :], exp / total[:, None], mask=mask)
    tl.store(lse_ptr + tokens, shift + tl.log(total), mask=token_mask)


@triton.jit
def router_statistics_backward_kernel(
    probs_ptr, grad_probs_ptr, grad_lse_ptr, grad_logits_ptr, T, E,
    stride_gpt, stride_gpe, stride_gl, stride_gt, stride_ge,
    HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """d logits = p * (g - sum_e g_e p_e + g_lse): the softmax's Jacobian applied to g = dL/dprobs plus
    the log-sum-exp's (its gradient is p). Gradients may be broadcast views (stride 0).

    Reads probs [T, E] fp32 (contiguous, the forward's), grad_probs [T, E] and grad_lse [T]; writes
    grad_logits [T, E]. Grid: (cdiv(T, BLOCK_T),).
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    mask = token_mask[:, None] & (experts < E)[None, :]
    probs = tl.load(probs_ptr + tokens[:, None] * E + experts[None, :], mask=mask, other=0.0)
    grad = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_GRAD_PROBS:
        grad = tl.load(grad_probs_ptr + tokens[:, None] * stride_gpt + experts[None, :] * stride_gpe,
                       mask=mask, other=0.0).to(tl.float32)
        grad = grad - tl.sum(grad * probs, axis=1)[:, None]
    if HAS_GRAD_LSE:
        grad = grad + tl.load(grad_lse_ptr + tokens * stride_gl, mask=token_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(grad_logits_ptr + tokens[:, None] * stride_gt + experts[None, :] * stride_ge,
             (probs * grad).to(grad_logits_ptr.dtype.element_ty), mask=mask)
