"""Triton MoE MLP (``moe_kernels.ops.moe_mlp``), eager calls: the router's GEMM, gating, routing plan and experts as
one launch sequence that routes once (the plan the experts run on also gives the expert load).

Without gradients, for decode and small batches (T*K slots in one program): route_one_block_kernel, fc1, fc2,
combine: four launches; three at T*K <= E (decode), where fc2 and the combine are one kernel. Past that:
route_blocks_kernel (the router's GEMM and the gating, counting the routing blocks' ids as it writes them), the
plan's scatter, fc1, fc2, combine: five, up to 2048 tokens at D = 1024 and top-8 of 64 experts and for any CuMo batch.
Past 2048 such tokens the scatter's scan is a kernel of its own, and for larger GEMMs (``routing.ROUTER_REREAD_BYTES``)
cuBLAS computes the logits that topk_gating_kernel then gates: up to seven.
With gradients, the same launches as one autograd node (``_EagerMoE``), whose backward runs the experts' backward
on the forward's plan, the gating backward (adding the logits' gradient from the router's losses in the kernel)
and the router GEMM's two products, the experts' input gradient accumulated into the router's by one addmm.
Capacity drops add a plan of the ids in priority order and capacity_kernel (whose plan also gives the load), where
``routing.apply_capacity`` runs about twenty-five aten ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.contract import double_backward_error
from moe_kernels.reference import GluSpec
from moe_kernels.routing import RoutingPlan
from moe_kernels.triton.experts import _expert_mlp_backward_launch, _expert_mlp_forward
from moe_kernels.triton.gating import _topk_gating, _topk_gating_backward
from moe_kernels.triton.routing import capacity_drop, gate_and_plan, route_blocks, route_one_block
from moe_kernels.triton.runtime import check_device, check_dtype, device_guard, eager


def moe_mlp(x: Tensor, router_input: Tensor | None, router_weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
            b2: Tensor | None, top_k: int, normalize: bool, activation: str, glu: bool | GluSpec,
            capacity: int | None, return_logits: bool) -> tuple | None:
    """``ops.moe_mlp``'s (out, top_k_weights, top_k_idx, expert_load, logits or None), arguments checked there; or
    None for a call this path leaves to the ops one by one: traced or subclassed tensors (which need the custom
    ops)."""
    tensors = (x, router_input, router_weight, w1, b1, w2, b2)
    if not eager(*tensors):
        return None
    check_dtype(x, "the Triton expert kernels")
    interpret = check_device(*tensors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, weights, ids, load, logits = _EagerMoE.apply(x, router_input, router_weight, w1, b1, w2, b2, top_k,
                                                          normalize, activation, glu, capacity, interpret)
        return out, weights, ids, load, logits if return_logits else None
    if not return_logits and router_input is None and capacity is None:
        with device_guard(x):
            routed = route_one_block(x, router_weight, top_k, normalize, interpret)
        if routed is not None:  # decode and small batches: three or four launches
            weights, ids, plan = routed
            out = _expert_mlp_forward(x, weights, ids, w1, b1, w2, b2, activation, glu, False, False, plan,
                                      interpret)[0]
            return out, weights, ids, plan.expert_counts, None
    logits, weights, ids, kept, plan, load = _route(x if router_input is None else router_input, router_weight,
                                                    top_k, normalize, capacity, return_logits, interpret)
    out, *_, plan = _expert_mlp_forward(x, weights, kept, w1, b1, w2, b2, activation, glu, False, False, plan,
                                        interpret)
    return out, weights, ids, plan.expert_counts if load is None else load, logits if return_logits else None


def _route(router_in: Tensor, router_weight: Tensor, top_k: int, normalize: bool, capacity: int | None,
           keep_logits: bool, interpret: bool
           ) -> tuple[Tensor | None, Tensor, Tensor, Tensor, RoutingPlan | None, Tensor | None]:
    """The router's GEMM and gating (no autograd) and what the experts run on: (logits, or None where not
    ``keep_logits`` and the gating kernel computed them; weights, ids, kept ids, the plan of the kept ids or None,
    the load or None). Dropless, the kept ids are the ids and their plan's counts the load, and the gating kernel
    computes the logits where the GEMM is small enough (``routing.route_blocks``); with capacity, the load is the
    count of the plan in priority order that the drops read, before them, and the experts build the plan of what is
    kept."""
    if capacity is None:
        routed = route_blocks(router_in, router_weight, top_k, normalize, keep_logits, interpret)
        if routed is None:  # a router GEMM too large for the gating kernel's programs: cuBLAS's
            logits = F.linear(router_in, router_weight)
            routed = (logits, *gate_and_plan(logits, top_k, normalize, interpret))
        logits, weights, ids, plan = routed
        return logits, weights, ids, ids, plan, None
    logits = F.linear(router_in, router_weight)
    weights, ids = _topk_gating(logits, top_k, normalize)
    kept, load = capacity_drop(ids, router_weight.shape[0], capacity, interpret)
    return logits, weights, ids, kept, None, load


class _EagerMoE(torch.autograd.Function):
    """Eager training of the whole MoE MLP as one autograd node. Against a router GEMM node, a gating Function and
    an expert Function: one Function call and one node fewer each, no separate accumulation of the input
    gradient (an addmm) or of the logits' gradient (the gating backward kernel adds it), on a host where each
    aten op and autograd node costs ~10-20 us. Differentiable in x, router_input, router_weight, w1, b1, w2,
    b2; the top-k weights and the logits are differentiable outputs, the ids and the load are not."""

    @staticmethod
    def forward(ctx, x, router_input, router_weight, w1, b1, w2, b2, top_k, normalize, activation, glu, capacity,
                interpret):
        router_in = x if router_input is None else router_input
        logits, weights, ids, kept, plan, load = _route(router_in, router_weight, top_k, normalize, capacity, True,
                                                        interpret)
        needs = ctx.needs_input_grad
        # The router's gradients need the top-k weights' gradient, which reads the unweighted expert rows.
        ctx.router_grad = needs[2] or needs[1] or (router_input is None and needs[0])
        save_pre = needs[0] or needs[3] or needs[4]
        out, pre, hidden_rows, rows, ctx.plan = _expert_mlp_forward(x, weights, kept, w1, b1, w2, b2, activation,
                                                                    glu, save_pre, ctx.router_grad, plan, interpret)
        load = ctx.plan.expert_counts if load is None else load
        ctx.save_for_backward(x, router_in, router_weight, w1, w2, logits, weights, ids, kept, pre, hidden_rows, rows)
        ctx.separate_router_input = router_input is not None
        ctx.top_k, ctx.normalize, ctx.activation, ctx.glu = top_k, normalize, activation, glu
        ctx.mark_non_differentiable(ids, load)
        ctx.set_materialize_grads(False)
        return out, weights, ids, load, logits

    @staticmethod
    def backward(ctx, grad_out, grad_weights, _grad_ids, _grad_load, grad_logits):
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not differentiable
            raise RuntimeError(double_backward_error("triton"))
        x, router_in, router_weight, w1, w2, logits, weights, ids, kept, pre, hidden_rows, rows = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        grad_router_input = grad_router_weight = None
        if grad_out is not None:
            wanted = (needs[0], ctx.router_grad, needs[3], needs[4], needs[5], needs[6])
            grads = _expert_mlp_backward_launch(grad_out, x, weights, kept, w1, w2, pre, hidden_rows, rows,
                                                ctx.activation, ctx.glu, *wanted, plan=ctx.plan)
            grad_x, grad_experts_weights, grad_w1, grad_b1, grad_w2, grad_b2 = (
                g if need else None for g, need in zip(grads, wanted))
            if grad_experts_weights is not None:
                grad_weights = grad_experts_weights if grad_weights is None else grad_experts_weights + grad_weights
        if ctx.router_grad and (grad_weights is not None or grad_logits is not None):
            if grad_weights is not None:
                grad_logits = _topk_gating_backward(logits, ids, grad_weights, ctx.top_k, ctx.normalize, grad_logits)
            if needs[2]:
                grad_router_weight = grad_logits.t().mm(router_in)
            if ctx.separate_router_input:
                grad_router_input = grad_logits.mm(router_weight) if needs[1] else None
            elif needs[0]:  # the router's share of x's gradient, added onto the experts' by the GEMM itself
                grad_x = (grad_logits.mm(router_weight) if grad_x is None
                          else torch.addmm(grad_x, grad_logits, router_weight))
        return grad_x, grad_router_input, grad_router_weight, grad_w1, grad_b1, grad_w2, grad_b2, *(None,) * 6
