"""Triton kernels of the router: fused fp32 softmax, top-k and renormalisation, and its backward.

T tokens, E experts, K top_k. Launched by moe_kernels/triton/gating.py (through runtime.launch, which
defines these kernels once per mode: compiled, or interpreted on CPU tensors).
"""

import triton
import triton.language as tl


@triton.jit
def _softmax_rows(logits_ptr, tokens, token_mask, experts, expert_mask, stride_lt, stride_le):
    """fp32 softmax over the E columns of a [BLOCK_T, BLOCK_E] tile of logits; padding columns are 0."""
    mask = token_mask[:, None] & expert_mask[None, :]
    logits = tl.load(logits_ptr + tokens[:, None] * stride_lt + experts[None, :] * stride_le,
                     mask=mask, other=0.0).to(tl.float32)
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return exp / tl.sum(exp, axis=1)[:, None]


@triton.jit
def topk_gating_kernel(
    logits_ptr, weights_ptr, ids_ptr, T, E, stride_lt, stride_le,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 softmax over E, top-k by repeated arg-max (ties to the lower id), optional renormalise.

    Reads logits [T, E]; writes weights [T, K] fp32 and ids [T, K] int64. Grid: (cdiv(T, BLOCK_T),).
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    probs = _softmax_rows(logits_ptr, tokens, token_mask, experts, expert_mask, stride_lt, stride_le)
    # Probabilities are >= 0: padding columns (-1) are never picked, picked ones become -2.
    work = tl.where(expert_mask[None, :], probs, -1.0)
    # A NaN/inf logit makes the whole row NaN: such a token takes the lowest unpicked ids with NaN
    # weights (what the reference's stable sort gives), never an id outside [0, E).
    poisoned = tl.sum(tl.where(expert_mask[None, :] & (probs != probs), 1, 0), axis=1) > 0
    ks = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(work, axis=1)
        candidate = tl.where(poisoned[:, None], expert_mask[None, :] & (work != -2.0), work == best[:, None])
        best_id = tl.min(tl.where(candidate, experts[None, :], BLOCK_E), axis=1)
        best = tl.where(poisoned, float("nan"), best)
        top_w = tl.where(ks[None, :] == k, best[:, None], top_w)
        top_i = tl.where(ks[None, :] == k, best_id[:, None].to(tl.int64), top_i)
        work = tl.where(experts[None, :] == best_id[:, None], -2.0, work)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out_mask = token_mask[:, None] & (ks[None, :] < TOP_K)
    out_offsets = tokens[:, None] * TOP_K + ks[None, :]
    tl.store(weights_ptr + out_offsets, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offsets, top_i, mask=out_mask)


@triton.jit
def topk_gating_backward_kernel(
    logits_ptr, ids_ptr, grad_weights_ptr, grad_logits_ptr, T, E,
    stride_lt, stride_le, stride_gt, stride_ge,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradient of topk_gating w.r.t. the logits (softmax recomputed, not stored).

    s_k = p[id_k]; w_k = s_k / S (S = sum_k s_k) -> dL/ds_k = (dw_k - sum_j dw_j w_j) / S;
    dL/dlogits = p * (g - sum_e g_e p_e), g scattering dL/ds_k to the chosen experts.
    Reads logits [T, E], ids [T, K], grad_weights [T, K] fp32; writes grad_logits [T, E].
    Grid: (cdiv(T, BLOCK_T),).
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    probs = _softmax_rows(logits_ptr, tokens, token_mask, experts, expert_mask, stride_lt, stride_le)

    ks = tl.arange(0, BLOCK_K)
    k_mask = token_mask[:, None] & (ks[None, :] < TOP_K)
    k_offsets = tokens[:, None] * TOP_K + ks[None, :]
    ids = tl.load(ids_ptr + k_offsets, mask=k_mask, other=-1)
    grad_w = tl.load(grad_weights_ptr + k_offsets, mask=k_mask, other=0.0)
    if NORMALIZE:
        picked = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            id_k = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
            p_k = tl.sum(tl.where(experts[None, :] == id_k[:, None], probs, 0.0), axis=1)
            picked = tl.where(ks[None, :] == k, p_k[:, None], picked)
        total = tl.where(token_mask, tl.sum(picked, axis=1), 1.0)  # padding tokens: no 0/0
        weights = picked / total[:, None]
        grad_picked = (grad_w - tl.sum(grad_w * weights, axis=1)[:, None]) / total[:, None]
    else:
        grad_picked = grad_w
    grad_probs = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        id_k = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
        g_k = tl.sum(tl.where(ks[None, :] == k, grad_picked, 0.0), axis=1)
        grad_probs = tl.where(experts[None, :] == id_k[:, None], g_k[:, None], grad_probs)
    grad_logits = probs * (grad_probs - tl.sum(grad_probs * probs, axis=1)[:, None])
    tl.store(grad_logits_ptr + tokens[:, None] * stride_gt + experts[None, :] * stride_ge,
             grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=token_mask[:, None] & expert_mask[None, :])
