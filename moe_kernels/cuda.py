"""CUDA backend: the compiled extension moe_kernels._cuda (csrc/cuda) plus torch's grouped GEMM.

Ops (namespace ``cumo_cuda``, CUDA kernels; fakes and autograd in moe_kernels/gating_ops.py):
    topk_gating(logits, top_k, normalize) -> (top_k_weights, top_k_idx)
    routing_plan(top_k_idx, num_experts) -> (counts, offsets, sorted_slots, slot_rows)
The expert MLP runs the device routing plan, then ``torch._grouped_mm`` per layer (activation and
bias in torch; bias gradients summed in fp32), then a deterministic combine (gather the K rows of
each token, sum in fp32).
Gradients come from torch autograd through those ops. Shapes: T tokens, D inputs, H1 hidden
(2*H with GLU), O outputs, E experts, K = top_k, N = T*K.

No host synchronisation in the routing or the combine. ``torch._grouped_mm`` itself runs CUTLASS
without a sync for bf16 on sm90/sm100; for other dtypes or architectures torch falls back to a
loop over experts that copies the group ends to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels import gating_ops, reference
from moe_kernels.reference import PLAIN_GLU, GluSpec, apply_activation, as_glu, combine
from moe_kernels.routing import RoutingPlan, expert_buckets

try:
    from moe_kernels import _cuda  # noqa: F401  (loading it registers torch.ops.cumo_cuda.*)

    _IMPORT_ERROR: ImportError | None = None
    gating_ops.register_topk_gating("cumo_cuda::topk_gating")
    gating_ops.register_routing_plan("cumo_cuda::routing_plan")
except ImportError as exc:  # the package works without the extension
    _IMPORT_ERROR = exc

# torch._grouped_mm needs 16-byte aligned row strides and base pointers.
GROUPED_MM_ALIGN_BYTES = 16
GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = GROUPED_MM_DTYPES  # what this backend computes on (ops.resolve_backend's "auto" reads it)
COMPILE_DTYPES = (torch.float16, torch.bfloat16)  # fp32 runs eagerly only (a host-synced loop in torch)


def unavailable_reason(device: torch.device) -> str | None:
    """None if the CUDA kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return f"the CUDA extension moe_kernels._cuda is not built ({_IMPORT_ERROR}); run `make ext` with nvcc"
    if device.type != "cuda":
        return f"runs on CUDA tensors only, got {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _require(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'cuda': {reason}")


# The router's losses (ops.router_losses) are PyTorch's: this backend has no fused kernel for them (the
# triton backend has).
router_losses = reference.router_losses

# The expert load (ops.expert_load) is PyTorch's scatter here (the triton backend counts in one kernel).
expert_load = reference.expert_load


def topk_gating(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """logits: [T, E] float -> (top_k_weights [T, K] float32, top_k_idx [T, K] int64).

    Fused softmax (fp32) + top-k (ties to the lower expert id) + optional renormalisation;
    differentiable in the logits.
    """
    _require(logits.device)
    return torch.ops.cumo_cuda.topk_gating(logits, top_k, normalize)


def routing_plan(top_k_idx: Tensor, num_experts: int) -> RoutingPlan:
    """Counting sort of the routing on device; equal to ``moe_kernels.routing.build_routing_plan``.

    top_k_idx: [T, K] integer expert ids (ids outside [0, E) dropped) -> RoutingPlan.
    """
    _require(top_k_idx.device)
    counts, offsets, sorted_slots, slot_rows = torch.ops.cumo_cuda.routing_plan(top_k_idx, num_experts)
    return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k_idx.shape[1])


def grouped_linear(rows: Tensor, weight: Tensor, group_ends: Tensor) -> Tensor:
    """Per-expert ``nn.Linear`` (no bias) over contiguous row groups, by ``torch._grouped_mm``.

    rows: [N, I]; weight: [E, O, I]; group_ends: [E] int32 cumulative row ends -> [N, O].
    Rows past group_ends[-1] are left unspecified (uninitialised memory): callers mask them.
    Feature sizes that are not a multiple of 16 bytes, or 0 (a layer without input features or hidden units),
    are zero-padded (zeros add nothing).
    """
    in_features, out_features = weight.shape[2], weight.shape[1]
    align = GROUPED_MM_ALIGN_BYTES // rows.element_size()
    pad_in = -in_features % align or align * (in_features == 0)
    pad_out = -out_features % align or align * (out_features == 0)
    rows = F.pad(rows, (0, pad_in)) if pad_in else rows.contiguous()
    weight = F.pad(weight, (0, pad_in, 0, pad_out)) if pad_in or pad_out else weight.contiguous()
    # rows are always a fresh allocation here (the caching allocator aligns storages to far more than
    # 16 bytes); a weight may be a view into a larger storage. torch.compile cannot branch on a storage
    # offset (a graph break), so compiled graphs skip the fix-up and leave a misaligned view to
    # _grouped_mm's own error.
    if not torch.compiler.is_compiling() and weight.storage_offset() * weight.element_size() % GROUPED_MM_ALIGN_BYTES:
        weight = weight.clone()
    out = torch._grouped_mm(rows, weight.transpose(1, 2), offs=group_ends)
    return out[:, :out_features] if pad_out else out


class ExpertBias(torch.autograd.Function):
    """rows + bias[row_experts] ([N, C] + [E, C] gathered by [N] expert ids). The bias gradient is
    summed over each expert's rows in fp32 and rounded once, as the reference's per-expert sum is:
    autograd's index_select backward would accumulate thousands of bf16 rows in bf16."""

    @staticmethod
    def forward(rows: Tensor, bias: Tensor, row_experts: Tensor) -> Tensor:
        return rows + bias.index_select(0, row_experts)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, bias, row_experts = inputs
        ctx.save_for_backward(row_experts)
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype

    @staticmethod
    def backward(ctx, grad: Tensor):
        (row_experts,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            accumulate = torch.promote_types(grad.dtype, torch.float32)
            grad_bias = torch.zeros(ctx.bias_shape, dtype=accumulate, device=grad.device)
            grad_bias = grad_bias.index_add_(0, row_experts, grad.to(accumulate)).to(ctx.bias_dtype)
        return grad, grad_bias, None


def expert_mlp_from_plan(
    x: Tensor,
    top_k_weights: Tensor,
    top_k_idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str,
    glu: bool,
    plan: RoutingPlan,
) -> Tensor:
    """The expert MLP on a given routing plan, in torch ops on any device.

    Shapes as ``expert_mlp``. Rows past offsets[E] (dropped slots) are zeroed after each GEMM
    (where, not multiply: their memory is uninitialised), so neither values nor gradients leak.
    """
    num_experts = w1.shape[0]
    num_rows = top_k_idx.numel()
    group_ends = plan.expert_offsets[1:].to(torch.int32)
    kept_rows = (torch.arange(num_rows, device=x.device) < plan.expert_offsets[num_experts]).unsqueeze(1)
    row_experts = expert_buckets(top_k_idx, num_experts).index_select(0, plan.sorted_slots).clamp(max=num_experts - 1)

    rows = torch.where(kept_rows, x.index_select(0, plan.sorted_tokens), 0)
    hidden = grouped_linear(rows, w1, group_ends)
    if b1 is not None:
        hidden = ExpertBias.apply(hidden, b1, row_experts)
    hidden = apply_activation(torch.where(kept_rows, hidden, 0), activation, glu)
    out = grouped_linear(hidden, w2, group_ends)
    if b2 is not None:
        out = ExpertBias.apply(out, b2, row_experts)
    out = torch.where(kept_rows, out, 0)

    return combine(out, top_k_weights, top_k_idx, plan)


def expert_mlp(
    x: Tensor,
    top_k_weights: Tensor,
    top_k_idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str = "gelu",
    glu: bool | GluSpec = False,
) -> Tensor:
    """The CUDA expert MLP (contract: ``moe_kernels.ops.expert_mlp``); float32/float16/bfloat16
    only (torch._grouped_mm); GLU: the plain one only (a GluSpec variant raises NotImplementedError)."""
    return _expert_mlp_and_plan(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu)[0]


def _expert_mlp_and_plan(x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor, b1: Tensor | None,
                         w2: Tensor, b2: Tensor | None, activation: str,
                         glu: bool | GluSpec) -> tuple[Tensor, RoutingPlan]:
    spec = as_glu(glu)
    if spec is not None and spec != PLAIN_GLU:
        raise NotImplementedError(f"backend 'cuda' runs the plain GLU (act(gate) * up, gate rows then up rows) only, "
                                  f"not {spec}; use backend='triton' (or 'torch') for this GLU variant")
    _require(x.device)
    if torch.compiler.is_compiling() and x.dtype not in COMPILE_DTYPES:
        raise TypeError(f"backend 'cuda' under torch.compile takes {[str(d) for d in COMPILE_DTYPES]} "
                        f"(torch._grouped_mm traces 16-bit operands only), got {x.dtype}; use backend='triton'")
    if x.dtype not in GROUPED_MM_DTYPES:
        raise TypeError(f"backend 'cuda' runs {[str(d) for d in GROUPED_MM_DTYPES]} (torch._grouped_mm), got {x.dtype}")
    plan = routing_plan(top_k_idx, w1.shape[0])
    return expert_mlp_from_plan(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, plan), plan


def moe_mlp(x: Tensor, router_input: Tensor | None, router_weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
            b2: Tensor | None, top_k: int, normalize: bool, activation: str, glu: bool | GluSpec,
            capacity: int | None, return_logits: bool) -> tuple | None:
    """``ops.moe_mlp`` routed once: the routing plan the experts run on gives the expert load (``expert_load`` is
    PyTorch's scatter here, five more kernels). Capacity drops are left to the ops one by one (None)."""
    if capacity is not None:
        return None
    logits = F.linear(x if router_input is None else router_input, router_weight)
    weights, idx = topk_gating(logits, top_k, normalize)
    out, plan = _expert_mlp_and_plan(x, weights, idx, w1, b1, w2, b2, activation, glu)
    return out, weights, idx, plan.expert_counts, logits if return_logits else None
