"""CPU backend: the compiled extension moe_kernels._C (csrc/cpu), its fake kernels and autograd.

Ops (namespace ``cumo``, CPU kernels in C++):
    routing_plan(top_k_idx, num_experts) -> (counts, offsets, sorted_slots, slot_rows)
    expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu, save_hidden)
        -> (y, hidden)
    expert_mlp_backward(grad_y, x, top_k_weights, top_k_idx, w1, b1, w2, b2, hidden, activation, *glu,
                        grad_input, grad_params)
        -> (grad_x, grad_top_k_weights, grad_w1, grad_b1, grad_w2, grad_b2)   ([0] where not asked for)
    (*glu: the four scalars of ``reference.glu_code``: kind code, interleaved, and the kind's two values)
    topk_gating(logits, top_k, normalize) -> (top_k_weights, top_k_idx)   (csrc/cpu/gating.cpp)
Every output shape depends only on input shapes, so the fake kernels need no data and the ops
trace under torch.compile. The forward saves the pre-activation hidden rows [T*K, H1] only when a
gradient can be needed (save_hidden); backward recomputes the activation from them, or the hidden
rows too when they were not saved. Backward rebuilds the routing plan from top_k_idx (a counting
sort) instead of taking one from its caller, so no tensor handed to these ops can index outside a
buffer. The C++ ops check the argument contract of ``moe_kernels.contract`` themselves; the fakes
run the Python check, so a mix of meta and CPU tensors raises instead of returning empty memory
(all-meta inputs still get meta outputs: shape inference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels import gating_ops, reference
from moe_kernels.contract import check_expert_mlp_args, double_backward_error
from moe_kernels.reference import GluSpec, glu_code, glu_from_code
from moe_kernels.routing import RoutingPlan

try:
    from moe_kernels import _C  # noqa: F401  (loading it registers torch.ops.cumo.*)

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the package works without the extension
    _IMPORT_ERROR = exc


def unavailable_reason(device: torch.device) -> str | None:
    """None if the compiled CPU kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"the C++ extension moe_kernels._C is not built ({_IMPORT_ERROR}); run `make ext`"
    if torch.device(device).type != "cpu":
        return f"runs on CPU tensors only, got {torch.device(device).type}"
    return None


def _require_extension() -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(unavailable_reason(torch.device("cpu")))


def routing_plan(top_k_idx: Tensor, num_experts: int) -> RoutingPlan:
    """Counting sort of the routing on CPU; equal to ``moe_kernels.routing.build_routing_plan``.

    top_k_idx: [T, K] integer expert ids (ids outside [0, E) dropped) -> RoutingPlan.
    """
    _require_extension()
    counts, offsets, sorted_slots, slot_rows = torch.ops.cumo.routing_plan(top_k_idx, num_experts)
    return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k_idx.shape[1])


# The router's losses (ops.router_losses) are PyTorch's: on the CPU its softmax and logsumexp are as fast
# as a fused kernel (no launches to save).
router_losses = reference.router_losses

# The expert load (ops.expert_load) is PyTorch's scatter: on the CPU a fused kernel would save nothing.
expert_load = reference.expert_load


def topk_gating(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """logits: [T, E] float -> (top_k_weights [T, K] float32, top_k_idx [T, K] int64)."""
    _require_extension()
    try:
        op = torch.ops.cumo.topk_gating
    except (AttributeError, RuntimeError) as exc:
        raise RuntimeError(
            "backend 'cpu': the op cumo::topk_gating is not in the built extension "
            "(csrc/cpu/gating.cpp missing or not rebuilt); use backend='torch' for gating"
        ) from exc
    return op(logits, top_k, normalize)


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
    """The compiled expert MLP (contract: ``moe_kernels.ops.expert_mlp``)."""
    _require_extension()
    save_hidden = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, top_k_weights, w1, b1, w2, b2)
    )
    y, *_ = torch.ops.cumo.expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu_code(glu),
                                              save_hidden)
    return y


def _register() -> None:
    """Fake kernels and autograd for the ops of moe_kernels._C."""

    @torch.library.register_fake("cumo::expert_mlp_forward")
    def _forward_fake(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, interleaved, glu_a, glu_b,
                      save_hidden):
        spec = glu_from_code(glu, interleaved, glu_a, glu_b) or False
        check_expert_mlp_args(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, spec, allow_meta=True)
        n = top_k_idx.numel()
        return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(n if save_hidden else 0, w1.shape[1])

    @torch.library.register_fake("cumo::expert_mlp_backward")
    def _backward_fake(grad_y, x, top_k_weights, top_k_idx, w1, b1, w2, b2, hidden, activation, glu, interleaved, glu_a,
                       glu_b, grad_input, grad_params):
        spec = glu_from_code(glu, interleaved, glu_a, glu_b) or False
        check_expert_mlp_args(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, spec, allow_meta=True)
        def shaped(tensor, wanted):
            return x.new_empty(tensor.shape) if wanted and tensor is not None else x.new_empty(0)

        return (
            shaped(x, grad_input),
            top_k_weights.new_empty(top_k_weights.shape),
            shaped(w1, grad_params),
            shaped(b1, grad_params),
            shaped(w2, grad_params),
            shaped(b2, grad_params),
        )

    def _setup_context(ctx, inputs, output):
        x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu, save_hidden = inputs
        _, hidden = output
        ctx.activation, ctx.glu = activation, glu
        ctx.save_for_backward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, hidden)
        ctx.mark_non_differentiable(hidden)
        # Otherwise autograd hands backward a zero-filled gradient for every non-differentiable output:
        # a [T*K, H1] tensor of zeros for hidden alone, as large as the saved activations.
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_y, *_unused):
        x, top_k_weights, top_k_idx, w1, b1, w2, b2, hidden = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_y is None:  # y took no part in the loss (grads are not materialised)
            return (None,) * 13
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not differentiable
            raise RuntimeError(double_backward_error("cpu"))
        grad_input, grad_params = need[0], any(need[i] for i in (3, 4, 5, 6))
        gx, gw, gw1, gb1, gw2, gb2 = torch.ops.cumo.expert_mlp_backward(
            grad_y, x, top_k_weights, top_k_idx, w1, b1, w2, b2, hidden, ctx.activation, *ctx.glu, grad_input,
            grad_params,
        )
        params = [g if need[i] else None for i, g in zip((3, 4, 5, 6), (gw1, gb1, gw2, gb2))]
        return (gx if grad_input else None, gw if need[1] else None, None, *params, *(None,) * 6)

    torch.library.register_autograd("cumo::expert_mlp_forward", _backward, setup_context=_setup_context)

    # The gating and routing ops' fakes (and the gating backward) are shared with the cuda extension.
    gating_ops.register_routing_plan("cumo::routing_plan")
    if hasattr(torch.ops.cumo, "topk_gating"):  # csrc/cpu/gating.cpp
        gating_ops.register_topk_gating("cumo::topk_gating")


if _IMPORT_ERROR is None:
    _register()
