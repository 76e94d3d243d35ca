"""Triton expert MLP: the forward and backward launchers and the torch.library custom ops (with fakes and autograd).

T tokens, K top_k, E experts, D input features, H hidden (H1 = H or 2*H with GLU), O output
features, R = T*K rows. The kernels live in expert_kernels.py, how each launches in expert_launches.py; this file
sizes buffers, launches, and wires the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_expert_mlp_args, double_backward_error
from moe_kernels.reference import GluSpec, as_glu, glu_code, glu_from_code
from moe_kernels.routing import RoutingPlan
from moe_kernels.triton import runtime
from moe_kernels.triton.expert_launches import (
    EPILOGUE_ACTIVATION_GRAD,
    combine,
    forward_launches,
    grouped_gemm,
    launch_combine,
    launch_fc2_combine,
    launch_gemm,
    topk_weight_grad_launch,
    weight_grad,
)
from moe_kernels.triton.routing import routing_plan_from_ids
from moe_kernels.triton.runtime import check_device, check_dtype, device_guard, eager


def _check_saved_rows(grad_out: Tensor, x: Tensor, top_k_idx: Tensor, w1: Tensor, w2: Tensor, pre: Tensor,
                      hidden_rows: Tensor, rows: Tensor, need_pre: bool, need_rows: bool) -> None:
    """The buffers a backward reads must be the forward's: [T*K, H1], [T*K, H], [T*K, O] (or empty
    where the forward did not keep them and the backward does not read them)."""
    num_rows = top_k_idx.numel()
    expected = {"grad_out": (grad_out, (x.shape[0], w2.shape[1]), True),
                "pre": (pre, (num_rows, w1.shape[1]), need_pre),
                "hidden_rows": (hidden_rows, (num_rows, w2.shape[2]), True),
                "rows": (rows, (num_rows, w2.shape[1]), need_rows)}
    for name, (t, shape, needed) in expected.items():
        if needed and tuple(t.shape) != shape:
            raise ValueError(f"expert_mlp_backward: {name} must be {list(shape)}, got {list(t.shape)}")


# The forward op returns, besides the output, what its backward reads: fc1's pre-activation rows (when
# x, w1 or b1 need a gradient; [0, H1] otherwise), the activated rows and the unweighted expert output
# rows (when the top-k weights need a gradient; [0, O] otherwise). Which ones it keeps is decided by
# the caller from requires_grad (save_pre, keep_rows): a custom op does not see autograd state. The
# backward op rebuilds the routing plan (one to three small launches) instead of taking one: the raw op
# is callable directly, and a plan it trusted could send a kernel outside every buffer. (The eager
# path, _EagerExpertMLP, keeps the plan it built itself.)
# A custom op's schema takes no GluSpec: the ops take it as reference.glu_code's four scalars
# (glu, glu_interleaved, glu_a, glu_b) and rebuild it with _spec.
def _spec(glu: int, interleaved: bool, glu_a: float, glu_b: float) -> GluSpec | bool:
    return glu_from_code(glu, interleaved, glu_a, glu_b) or False


@torch.library.custom_op("cumo_triton::expert_mlp_forward", mutates_args=())
def _expert_mlp_forward_op(x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor, b1: Tensor | None,
                           w2: Tensor, b2: Tensor | None, activation: str, glu: int, glu_interleaved: bool,
                           glu_a: float, glu_b: float, save_pre: bool,
                           keep_rows: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(glu, glu_interleaved, glu_a, glu_b)
    check_expert_mlp_args(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, spec)
    *outputs, _ = _expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, spec, save_pre,
                                      keep_rows)
    return _op_outputs(*outputs, w1.shape[1])


def _expert_mlp_forward(x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor, b1: Tensor | None,
                        w2: Tensor, b2: Tensor | None, activation: str, glu: bool | GluSpec, save_pre: bool,
                        keep_rows: bool, plan: RoutingPlan | None = None, interpret: bool | None = None
                        ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, RoutingPlan]:
    """The forward launcher, arguments already checked against the contract: (out, pre, hidden_rows,
    rows, the routing plan); pre and rows are None where save_pre / keep_rows do not keep them (an
    inference call allocates neither). ``plan``: the routing plan of top_k_idx when this backend's own
    kernels built it already (``moe.moe_mlp``, ``routing.gate_and_plan``), else it is built here;
    ``interpret``: ``runtime.check_device``'s answer when the caller has it (and checked the dtype)."""
    if interpret is None:
        check_dtype(x, "the Triton expert kernels")
        interpret = check_device(x, top_k_weights, top_k_idx, w1, b1, w2, b2)
    num_tokens, top_k = top_k_idx.shape
    num_experts, hidden1, _ = w1.shape
    out_features, hidden = w2.shape[1], w2.shape[2]
    ids = runtime.flat(top_k_idx, torch.int64)
    weights = runtime.flat(top_k_weights, torch.float32)
    b1 = b1.contiguous() if b1 is not None else None
    b2 = b2.contiguous() if b2 is not None else None
    num_rows = num_tokens * top_k
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)  # every row written by a combine
    pre = torch.empty(num_rows, hidden1, dtype=x.dtype, device=x.device) if save_pre else None
    hidden_rows = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    rows = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device) if keep_rows else None
    with device_guard(x):
        if plan is None:
            plan = routing_plan_from_ids(ids, num_experts, top_k, interpret)
        if num_rows > 0:
            fc1, fc2, combine = forward_launches(num_tokens, top_k, x.stride(), w1.shape, w1.stride(), w2.shape,
                                                 w2.stride(), b1 is not None, b2 is not None, activation,
                                                 glu_code(glu), save_pre, keep_rows, x.dtype,
                                                 x.get_device(), interpret, runtime.allow_tf32())
            launch_gemm(fc1, interpret, x, w1, plan, hidden_rows, bias=b1, aux=pre)
            if combine is None:  # few rows: fc2 and the combine as one pass, no rows buffer
                launch_fc2_combine(fc2, interpret, hidden_rows, w2, b2, plan, ids, weights, out)
            else:  # fc2 folds the top-k weights into its rows unless they are kept
                fc2_rows = rows if keep_rows else torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
                launch_gemm(fc2, interpret, hidden_rows, w2, plan, fc2_rows, bias=b2,
                            row_scale=None if keep_rows else weights)
                launch_combine(combine, interpret, fc2_rows, ids, weights if keep_rows else None, plan, out)
    return out, pre, hidden_rows, rows, plan


def _op_outputs(out: Tensor, pre: Tensor | None, hidden_rows: Tensor, rows: Tensor | None,
                hidden1: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward op's four outputs: a buffer the forward did not keep is a [0, N] tensor (an op returns
    tensors)."""
    return (out, pre if pre is not None else out.new_empty(0, hidden1), hidden_rows,
            rows if rows is not None else out.new_empty(0, out.shape[1]))


@_expert_mlp_forward_op.register_fake
def _(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, glu_interleaved, glu_a, glu_b, save_pre,
      keep_rows):
    check_expert_mlp_args(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation,
                          _spec(glu, glu_interleaved, glu_a, glu_b), allow_meta=True)
    num_rows = top_k_idx.shape[0] * top_k_idx.shape[1]
    hidden1, out_features, hidden = w1.shape[1], w2.shape[1], w2.shape[2]
    return (x.new_empty(x.shape[0], out_features), x.new_empty(num_rows if save_pre else 0, hidden1),
            x.new_empty(num_rows, hidden), x.new_empty(num_rows if keep_rows else 0, out_features))


# Gradients that are not wanted come back as [0] tensors (a custom op returns tensors, not None).
@torch.library.custom_op("cumo_triton::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward_op(grad_out: Tensor, x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor,
                            w2: Tensor, pre: Tensor, hidden_rows: Tensor, rows: Tensor, activation: str, glu: int,
                            glu_interleaved: bool, glu_a: float, glu_b: float,
                            need_x: bool, need_weights: bool, need_w1: bool, need_b1: bool, need_w2: bool,
                            need_b2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(glu, glu_interleaved, glu_a, glu_b)
    check_expert_mlp_args(x, top_k_weights, top_k_idx, w1, None, w2, None, activation, spec)
    check_dtype(x, "the Triton expert kernels")
    _check_saved_rows(grad_out, x, top_k_idx, w1, w2, pre, hidden_rows, rows, need_x or need_w1 or need_b1,
                      need_weights)
    grads = _expert_mlp_backward_launch(grad_out, x, top_k_weights, top_k_idx, w1, w2, pre, hidden_rows, rows,
                                        activation, spec, need_x, need_weights, need_w1, need_b1, need_w2, need_b2)
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # an op returns tensors


def _expert_mlp_backward_launch(grad_out: Tensor, x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor,
                                w2: Tensor, pre: Tensor, hidden_rows: Tensor, rows: Tensor, activation: str,
                                glu: bool | GluSpec, need_x: bool, need_weights: bool, need_w1: bool, need_b1: bool,
                                need_w2: bool, need_b2: bool, plan: RoutingPlan | None = None
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward launcher, arguments already checked (by the op, or saved by the forward): (grad_x,
    grad_weights, grad_w1, grad_b1, grad_w2, grad_b2), None where not wanted. ``plan``: the forward's routing
    plan, if the caller kept it (else it is rebuilt from top_k_idx)."""
    spec = as_glu(glu)
    interpret = check_device(grad_out, x, w1, w2, pre, hidden_rows, rows)
    num_tokens, top_k = top_k_idx.shape
    ids = runtime.flat(top_k_idx, torch.int64)
    weights = runtime.flat(top_k_weights, torch.float32)
    num_experts, hidden1, d_in = w1.shape
    out_features, hidden = w2.shape[1], w2.shape[2]
    num_rows = num_tokens * top_k
    grad_out = grad_out.to(x.dtype)
    grad_x = grad_weights = None
    grad_w2_t = torch.empty_like(w2, memory_format=torch.contiguous_format) if (need_w2 or need_b2) else None
    grad_b2_t = torch.empty(num_experts, out_features, dtype=w2.dtype, device=w2.device) if need_b2 else None
    grad_w1_t = torch.empty_like(w1, memory_format=torch.contiguous_format) if (need_w1 or need_b1) else None
    grad_b1_t = torch.empty(num_experts, hidden1, dtype=w1.dtype, device=w1.device) if need_b1 else None

    with device_guard(x):
        if plan is None:
            plan = routing_plan_from_ids(ids, num_experts, top_k, interpret)
        if need_weights:
            grad_weights = torch.empty(num_rows, dtype=torch.float32, device=x.device)  # every slot written
            if num_rows > 0:
                launch = topk_weight_grad_launch(num_rows, out_features, num_experts,
                                                 (*grad_out.stride(), *rows.stride()), top_k, interpret)
                runtime.launch(launch, interpret, grad_out, rows, plan.slot_rows, ids, grad_weights)
            grad_weights = grad_weights.view(num_tokens, top_k).to(top_k_weights.dtype)
        if grad_w2_t is not None:
            # dW2[e] = (w * dy[token])^T h over expert e's rows; db2 = column sums.
            if num_rows > 0:
                weight_grad(grad_out, hidden_rows, plan, grad_w2_t, grad_b2_t, interpret,
                            gather_a=True, gather_b=False, row_scale=weights)
            else:
                grad_w2_t.zero_()
                if grad_b2_t is not None:
                    grad_b2_t.zero_()
        if need_x or need_w1 or need_b1:
            grad_pre = torch.empty(num_rows, hidden1, dtype=x.dtype, device=x.device)
            if num_rows > 0:
                # d pre = act'(pre) * (w * dy[token]) @ W2[e]; B[e][o, h] = w2[e, o, h].
                grouped_gemm(grad_out, w2, (w2.stride(1), w2.stride(2)), plan, grad_pre, hidden, interpret,
                             gather=True, row_scale=weights, aux=pre, epilogue=EPILOGUE_ACTIVATION_GRAD,
                             glu=spec, activation=activation)
            if grad_w1_t is not None:
                if num_rows > 0:
                    weight_grad(grad_pre, x, plan, grad_w1_t, grad_b1_t, interpret, gather_a=False, gather_b=True)
                else:
                    grad_w1_t.zero_()
                    if grad_b1_t is not None:
                        grad_b1_t.zero_()
            if need_x:
                grad_x = torch.empty(num_tokens, d_in, dtype=x.dtype, device=x.device)  # the combine writes all
                if num_rows > 0:
                    # dX rows = d pre @ W1[e] (B[e][h, d] = w1[e, h, d]), then a gather-sum over the
                    # k slots back to token order: deterministic, no atomics.
                    grad_x_rows = torch.empty(num_rows, d_in, dtype=x.dtype, device=x.device)
                    grouped_gemm(grad_pre, w1, (w1.stride(1), w1.stride(2)), plan, grad_x_rows, d_in,
                                 interpret, gather=False)
                    combine(grad_x_rows, ids, None, plan, num_experts, grad_x, interpret)
    pick = [(need_w1, grad_w1_t), (need_b1, grad_b1_t), (need_w2, grad_w2_t), (need_b2, grad_b2_t)]
    return grad_x, grad_weights, *[t if wanted else None for wanted, t in pick]


@_expert_mlp_backward_op.register_fake
def _(grad_out, x, top_k_weights, top_k_idx, w1, w2, pre, hidden_rows, rows, activation, glu, glu_interleaved, glu_a,
      glu_b, need_x, need_weights, need_w1, need_b1, need_w2, need_b2):
    def shaped(wanted, *shape, dtype=None):
        return x.new_empty(*shape, dtype=dtype or x.dtype) if wanted else x.new_empty(0)

    num_experts = w1.shape[0]
    return (shaped(need_x, *x.shape), shaped(need_weights, *top_k_weights.shape, dtype=top_k_weights.dtype),
            shaped(need_w1, *w1.shape), shaped(need_b1, num_experts, w1.shape[1]),
            shaped(need_w2, *w2.shape), shaped(need_b2, num_experts, w2.shape[1]))


def _expert_mlp_setup(ctx, inputs, output):
    x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu, _save_pre, _keep_rows = inputs
    _, pre, hidden_rows, rows = output
    ctx.save_for_backward(x, top_k_weights, top_k_idx, w1, w2, pre, hidden_rows, rows)
    ctx.activation, ctx.glu = activation, glu
    ctx.mark_non_differentiable(pre, hidden_rows, rows)
    # No zero-filled gradients for those outputs: pre and hidden_rows are as large as the activations.
    ctx.set_materialize_grads(False)


def _expert_mlp_grads(ctx, grad_out: Tensor | None, direct: bool) -> tuple:
    """The gradients of every forward input, through the backward op or (direct) its launcher."""
    if grad_out is None:
        return (None,) * 14
    if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not differentiable
        raise RuntimeError(double_backward_error("triton"))
    needs = ctx.needs_input_grad
    wanted = (needs[0], needs[1], needs[3], needs[4], needs[5], needs[6])
    if direct:
        grads = _expert_mlp_backward_launch(grad_out, *ctx.saved_tensors, ctx.activation, _spec(*ctx.glu), *wanted,
                                            plan=ctx.plan)
    else:
        grads = _expert_mlp_backward_op(grad_out, *ctx.saved_tensors, ctx.activation, *ctx.glu, *wanted)
    grad_x, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2 = (g if need else None for g, need in zip(grads, wanted))
    return grad_x, grad_weights, None, grad_w1, grad_b1, grad_w2, grad_b2, *(None,) * 7


def _expert_mlp_backward(ctx, grad_out, *_unused):
    return _expert_mlp_grads(ctx, grad_out, direct=False)


_expert_mlp_forward_op.register_autograd(_expert_mlp_backward, setup_context=_expert_mlp_setup)


class _EagerExpertMLP(torch.autograd.Function):
    """Eager training: the custom op's forward launcher, context and backward launcher, without its
    dispatch. Each custom-op call costs a chain of dispatcher and Python hops (autograd wrapper,
    redispatch, the Python kernel behind a dynamo guard): on the H200 host of 2026-11-26 the two
    ops of a training step spent about 1.5 ms of host time there, twice the step's GPU time. Routed
    once: the backward reuses the forward's routing plan, which this path built itself (the raw
    backward op rebuilds it, since a caller could hand it any plan). Tracing and tensor subclasses
    take the custom op (``runtime.eager``). forward takes ctx (no separate setup_context): Function.apply
    binds the arguments of a forward without it through inspect.signature on every call."""

    @staticmethod
    def forward(ctx, x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, glu_interleaved, glu_a, glu_b,
                save_pre, keep_rows):
        inputs = (x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, glu_interleaved, glu_a, glu_b,
                  save_pre, keep_rows)
        *outputs, ctx.plan = _expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation,
                                                 _spec(glu, glu_interleaved, glu_a, glu_b), save_pre, keep_rows)
        outputs = _op_outputs(*outputs, w1.shape[1])
        _expert_mlp_setup(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        return _expert_mlp_grads(ctx, grad_out, direct=True)


def expert_mlp(x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor, b1: Tensor | None,
               w2: Tensor, b2: Tensor | None, activation: str = "gelu", glu: bool | GluSpec = False) -> Tensor:
    """The Triton expert MLP (contract: ``moe_kernels.ops.expert_mlp``); float32/float16/bfloat16. (``ops.moe_mlp``
    runs the forward launcher on its own routing plan: ``moe.py``.)"""
    grad_enabled = torch.is_grad_enabled()

    def needs_grad(t: Tensor | None) -> bool:
        return grad_enabled and t is not None and t.requires_grad

    save_pre = needs_grad(x) or needs_grad(w1) or needs_grad(b1)  # d pre-activation is needed
    keep_rows = needs_grad(top_k_weights)  # the top-k weight gradient reads the unweighted expert rows
    if eager(x, top_k_weights, top_k_idx, w1, b1, w2, b2):
        if not (save_pre or keep_rows or needs_grad(w2) or needs_grad(b2)):  # inference: the launchers alone
            return _expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, False, False)[0]
        return _EagerExpertMLP.apply(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu_code(glu),
                                     save_pre, keep_rows)[0]
    return _expert_mlp_forward_op(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu_code(glu), save_pre,
                                  keep_rows)[0]
