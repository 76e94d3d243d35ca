"""What the Triton tests count: the kernel launches each part of the expert MLP makes (so a silent
fallback to PyTorch cannot pass), and the small helpers every Triton test file shares."""

from __future__ import annotations

import moe_kernels.triton as triton_backend

# Forward: the routing plan, fc1 and fc2, the combine. Backward with every input requiring grad: top-k
# weight grad, dW2 and dW1, d pre-activation and dX rows, the dX gather-sum; eager, it reuses the
# forward's routing plan (the backward custom op, which a caller can hand any plan, rebuilds it).
EXPERT_FORWARD_KERNELS = {"grouped_gemm_kernel": 2, "combine_kernel": 1}
EXPERT_BACKWARD_KERNELS = {"topk_weight_grad_kernel": 1, "grouped_weight_grad_kernel": 2, "grouped_gemm_kernel": 2,
                           "combine_kernel": 1}


def routing_kernels(shape) -> dict:
    """One launch when the T*K slots fit one program (decode, small batch: at most 128 slots, and slots times the
    E + 1 buckets, each rounded up to a power of two, at most 16384), else the histogram and the scatter, with a
    scan kernel between them where the blocks (of whole tokens, at most 128 lanes, lanes x buckets at most 8192)
    times the buckets are more than ``SCAN_IN_SCATTER_TILE``."""
    from moe_kernels.triton.routing import SCAN_IN_SCATTER_TILE

    slots = shape.tokens * shape.top_k
    if slots == 0:
        return {}
    buckets = 1 << shape.experts.bit_length()
    if max(16, 1 << (slots - 1).bit_length()) * buckets <= 16384 and slots <= 128:
        return {"routing_one_block_kernel": 1}
    block_tokens = max(1, max(16, min(128, 8192 // buckets)) // (1 << (shape.top_k - 1).bit_length()))
    blocks = -(-slots // (block_tokens * shape.top_k))
    scan = blocks * buckets > SCAN_IN_SCATTER_TILE
    return {"routing_histogram_kernel": 1, **({"routing_scan_kernel": 1} if scan else {}), "routing_scatter_kernel": 1}


def forward_kernels(shape) -> dict:
    return {**routing_kernels(shape), **EXPERT_FORWARD_KERNELS}


def backward_kernels(shape, custom_op: bool = False) -> dict:
    return {**(routing_kernels(shape) if custom_op else {}), **EXPERT_BACKWARD_KERNELS}


def launches() -> dict[str, int]:
    counts = dict(triton_backend.LAUNCHES)
    triton_backend.reset_launch_counts()
    return counts


def differentiable(args):
    """Mark the float tensors of an expert_mlp problem as requiring grad (ids stay as they are)."""
    return [a.detach().clone().requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
