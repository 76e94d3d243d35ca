"""Triton expert MLP: launchers and torch.library custom ops (with fakes and autograd).

T tokens, K top_k, E experts, D input features, H hidden (H1 = H or 2*H with GLU), O output
features, R = T*K rows. The kernels live in expert_kernels.py, how they launch in runtime.py; this file
sizes buffers, picks block sizes, launches, and wires the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_expert_mlp_args, double_backward_error
from moe_kernels.reference import ACTIVATIONS, GluSpec, as_glu, glu_code, glu_from_code
from moe_kernels.routing import RoutingPlan
from moe_kernels.triton import runtime
from moe_kernels.triton.routing import routing_plan_from_ids
from moe_kernels.triton.runtime import (
    ELEMENTWISE_TILE,
    cdiv,
    check_device,
    check_dtype,
    device_guard,
    dot_options,
    eager,
    next_power_of_2,
)
from moe_kernels.triton.tiles import INTERPRET_GEMM, INTERPRET_WEIGHT_GRAD, gemm_config, weight_grad_config

# The kernels' constexpr activation codes: positions in the reference's table (expert_kernels.py spells the order).
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
EPILOGUE_PLAIN, EPILOGUE_ACTIVATION, EPILOGUE_ACTIVATION_GRAD = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Grouped GEMM, combine


def _grouped_gemm(a: Tensor, weight: Tensor, b_strides: tuple[int, int], plan: RoutingPlan, out: Tensor,
                  num_cols: int, interpret: bool, *, gather: bool, bias: Tensor | None = None,
                  row_scale: Tensor | None = None, aux: Tensor | None = None,
                  epilogue: int = EPILOGUE_PLAIN, glu: GluSpec | None = None, activation: str = "gelu",
                  store_aux: bool = False) -> None:
    """out rows of expert e = epilogue(A rows @ B[e] (+ bias[e]) (* row_scale)), B[e][k, n] read
    at weight[e] + k * b_strides[0] + n * b_strides[1]; K = a.shape[1]; N = num_cols; glu: fc1's
    GLU variant (the activation epilogues)."""
    aux_t = aux if aux is not None else out
    strides = _gemm_strides(a.stride(), weight.stride(0), b_strides, bias.stride(0) if bias is not None else 0,
                            aux_t.stride(), out.stride())
    spec = _gemm_launch(plan.sorted_slots.numel(), num_cols, a.shape[1], weight.shape[0], strides, plan.top_k,
                        gather, bias is not None, row_scale is not None, epilogue, glu_code(glu), activation,
                        store_aux, a.dtype, a.get_device(), interpret, runtime.allow_tf32())
    _launch_gemm(spec, interpret, a, weight, plan, out, bias, row_scale, aux)


def _gemm_strides(a: tuple[int, int], weight_expert: int, b: tuple[int, int], bias: int, aux: tuple[int, int],
                  out: tuple[int, int]) -> tuple[int, ...]:
    """grouped_gemm_kernel's stride arguments, in its signature's order."""
    return (*a, weight_expert, *b, bias, *aux, *out)


def _launch_gemm(spec: runtime.Launch, interpret: bool, a: Tensor, weight: Tensor, plan: RoutingPlan, out: Tensor,
                 bias: Tensor | None = None, row_scale: Tensor | None = None, aux: Tensor | None = None) -> None:
    """grouped_gemm_kernel's tensors in its signature's order (an absent one: ``out``, which the kernel does not
    read for it)."""
    runtime.launch(spec, interpret, a, weight, bias if bias is not None else out,
                   row_scale if row_scale is not None else out, aux if aux is not None else out, out,
                   plan.sorted_slots, plan.expert_offsets)


@runtime.shape_cache
def _gemm_launch(num_rows: int, num_cols: int, reduce_dim: int, num_experts: int, strides: tuple, top_k: int,
                 gather: bool, has_bias: bool, scale_rows: bool, epilogue: int, glu: tuple, activation: str,
                 store_aux: bool, dtype: torch.dtype, device: int, interpret: bool, allow_tf32: bool) -> runtime.Launch:
    glu_kind, interleaved, glu_a, glu_b = glu  # kind 0: no GLU; the kernel's GLU_KIND counts from plain
    meta = dict(TOP_K=top_k, GATHER_A=gather, HAS_BIAS=has_bias, SCALE_ROWS=scale_rows, EPILOGUE=epilogue,
                GLU=glu_kind > 0, ACTIVATION=ACTIVATION_CODES[activation], STORE_AUX=store_aux,
                GLU_KIND=max(glu_kind - 1, 0), INTERLEAVED=interleaved, GLU_A=glu_a, GLU_B=glu_b,
                BLOCK_E=next_power_of_2(num_experts), **dot_options(dtype, interpret, allow_tf32))
    meta.update(INTERPRET_GEMM if interpret else gemm_config(num_rows / num_experts, dtype, glu_kind > 0, device))
    # Row tiles: at most cdiv(R, BLOCK_M) + the experts with rows (<= min(E, R)); expert_kernels.py says why.
    grid = ((cdiv(num_rows, meta["BLOCK_M"]) + min(num_experts, num_rows)) * cdiv(num_cols, meta["BLOCK_N"]),)
    return runtime.Launch("grouped_gemm_kernel", grid, (num_rows, num_cols, reduce_dim, num_experts, *strides), meta)


def _weight_grad(a: Tensor, b: Tensor, plan: RoutingPlan, grad_w: Tensor, grad_bias: Tensor | None,
                 interpret: bool, *, gather_a: bool, gather_b: bool, row_scale: Tensor | None = None) -> None:
    """grad_w[e] = A_e^T B_e over expert e's rows, grad_bias[e] = column sums of A_e."""
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1), *grad_w.stride(),
               grad_bias.stride(0) if grad_bias is not None else 0)
    spec = _weight_grad_launch(tuple(grad_w.shape), plan.sorted_slots.numel(), strides, plan.top_k, gather_a,
                               gather_b, row_scale is not None, grad_bias is not None, a.dtype, a.get_device(),
                               interpret, runtime.allow_tf32())
    runtime.launch(spec, interpret, a, b, row_scale if row_scale is not None else grad_w, plan.sorted_slots,
                   plan.expert_offsets, grad_w, grad_bias if grad_bias is not None else grad_w)


@runtime.shape_cache
def _weight_grad_launch(shape: tuple[int, int, int], num_rows: int, strides: tuple, top_k: int, gather_a: bool,
                        gather_b: bool, scale_a: bool, has_bias: bool, dtype: torch.dtype, device: int,
                        interpret: bool, allow_tf32: bool) -> runtime.Launch:
    num_experts, p_dim, q_dim = shape
    meta = dict(TOP_K=top_k, GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=scale_a, HAS_BIAS=has_bias,
                **dot_options(dtype, interpret, allow_tf32))
    meta.update(INTERPRET_WEIGHT_GRAD if interpret else weight_grad_config(num_rows / num_experts, dtype, device))
    grid = (cdiv(p_dim, meta["BLOCK_P"]) * cdiv(q_dim, meta["BLOCK_Q"]), num_experts)
    return runtime.Launch("grouped_weight_grad_kernel", grid, (p_dim, q_dim, num_experts, *strides), meta)


def _combine(rows: Tensor, ids: Tensor, weights: Tensor | None, plan: RoutingPlan, num_experts: int,
             out: Tensor, interpret: bool) -> None:
    """out[t] = sum over kept k of (weights[t, k] *) rows[slot_rows[t*K + k]]."""
    spec = _combine_launch(*out.shape, num_experts, (*rows.stride(), *out.stride()), plan.top_k, weights is not None,
                           interpret)
    _launch_combine(spec, interpret, rows, ids, weights, plan, out)


def _launch_combine(spec: runtime.Launch, interpret: bool, rows: Tensor, ids: Tensor, weights: Tensor | None,
                    plan: RoutingPlan, out: Tensor) -> None:
    runtime.launch(spec, interpret, rows, plan.slot_rows, ids, weights if weights is not None else rows, out)


@runtime.shape_cache
def _combine_launch(num_tokens: int, num_cols: int, num_experts: int, strides: tuple, top_k: int,
                    apply_weights: bool, interpret: bool) -> runtime.Launch:
    block_n = min(next_power_of_2(max(num_cols, 1)), 16 if interpret else 128)
    block_t = max(1, min(64, ELEMENTWISE_TILE // block_n))
    return runtime.Launch("combine_kernel", (cdiv(num_tokens, block_t), cdiv(num_cols, block_n)),
                          (num_tokens, num_cols, num_experts, *strides),
                          dict(TOP_K=top_k, APPLY_WEIGHTS=apply_weights, BLOCK_T=block_t, BLOCK_N=block_n))


@runtime.shape_cache
def _topk_weight_grad_launch(num_rows: int, out_features: int, num_experts: int, strides: tuple, top_k: int,
                             interpret: bool) -> runtime.Launch:
    block_n = min(next_power_of_2(out_features), 16 if interpret else 128)
    block_s = max(1, min(128, ELEMENTWISE_TILE // block_n))
    return runtime.Launch("topk_weight_grad_kernel", (cdiv(num_rows, block_s),),
                          (num_rows, out_features, num_experts, *strides),
                          dict(TOP_K=top_k, BLOCK_S=block_s, BLOCK_N=block_n))


# ----------------------------------------------------------------------------------------------
# Expert MLP


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
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)  # the combine writes every row
    pre = torch.empty(num_rows, hidden1, dtype=x.dtype, device=x.device) if save_pre else None
    hidden_rows = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    rows = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    with device_guard(x):
        if plan is None:
            plan = routing_plan_from_ids(ids, num_experts, top_k, interpret)
        if num_rows > 0:
            fc1, fc2, combine = _forward_launches(num_tokens, top_k, x.stride(), w1.shape, w1.stride(), w2.shape,
                                                  w2.stride(), b1 is not None, b2 is not None, activation,
                                                  glu_code(glu), save_pre, keep_rows, x.dtype,
                                                  x.get_device(), interpret, runtime.allow_tf32())
            _launch_gemm(fc1, interpret, x, w1, plan, hidden_rows, bias=b1, aux=pre)
            _launch_gemm(fc2, interpret, hidden_rows, w2, plan, rows, bias=b2, row_scale=None if keep_rows else weights)
            _launch_combine(combine, interpret, rows, ids, weights if keep_rows else None, plan, out)
    return out, pre, hidden_rows, rows if keep_rows else None, plan


@runtime.shape_cache
def _forward_launches(num_tokens: int, top_k: int, x_strides: tuple[int, int], w1_shape: tuple[int, int, int],
                      w1_strides: tuple[int, int, int], w2_shape: tuple[int, int, int], w2_strides: tuple[int, int, int],
                      has_b1: bool, has_b2: bool, activation: str, glu: tuple, save_pre: bool, keep_rows: bool,
                      dtype: torch.dtype, device: int, interpret: bool,
                      allow_tf32: bool) -> tuple[runtime.Launch, runtime.Launch, runtime.Launch]:
    """A forward's fc1, fc2 and combine, built once per shape: its buffers are fresh and contiguous (pre [R, H1]
    when saved, hidden_rows [R, H], rows [R, O], out [T, O]; biases made contiguous)."""
    num_experts, hidden1, d_in = w1_shape
    _, out_features, hidden = w2_shape
    num_rows = num_tokens * top_k
    # fc1: token rows gathered in-kernel; B[e][d, h] = w1[e, h, d]; pre (aux) kept when saved.
    aux = (hidden1, 1) if save_pre else (hidden, 1)
    fc1 = _gemm_launch(num_rows, hidden, d_in, num_experts,
                       _gemm_strides(x_strides, w1_strides[0], (w1_strides[2], w1_strides[1]), hidden1 if has_b1 else 0,
                                     aux, (hidden, 1)),
                       top_k, True, has_b1, False, EPILOGUE_ACTIVATION, glu, activation, save_pre, dtype, device,
                       interpret, allow_tf32)
    # fc2: the top-k weight is folded into the epilogue unless its gradient is needed.
    fc2 = _gemm_launch(num_rows, out_features, hidden, num_experts,
                       _gemm_strides((hidden, 1), w2_strides[0], (w2_strides[2], w2_strides[1]),
                                     out_features if has_b2 else 0, (out_features, 1), (out_features, 1)),
                       top_k, False, has_b2, not keep_rows, EPILOGUE_PLAIN, glu_code(None), "gelu", False, dtype,
                       device, interpret, allow_tf32)
    combine = _combine_launch(num_tokens, out_features, num_experts, (out_features, 1, out_features, 1), top_k,
                              keep_rows, interpret)
    return fc1, fc2, combine


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
                launch = _topk_weight_grad_launch(num_rows, out_features, num_experts,
                                                  (*grad_out.stride(), *rows.stride()), top_k, interpret)
                runtime.launch(launch, interpret, grad_out, rows, plan.slot_rows, ids, grad_weights)
            grad_weights = grad_weights.view(num_tokens, top_k).to(top_k_weights.dtype)
        if grad_w2_t is not None:
            # dW2[e] = (w * dy[token])^T h over expert e's rows; db2 = column sums.
            if num_rows > 0:
                _weight_grad(grad_out, hidden_rows, plan, grad_w2_t, grad_b2_t, interpret,
                             gather_a=True, gather_b=False, row_scale=weights)
            else:
                grad_w2_t.zero_()
                if grad_b2_t is not None:
                    grad_b2_t.zero_()
        if need_x or need_w1 or need_b1:
            grad_pre = torch.empty(num_rows, hidden1, dtype=x.dtype, device=x.device)
            if num_rows > 0:
                # d pre = act'(pre) * (w * dy[token]) @ W2[e]; B[e][o, h] = w2[e, o, h].
                _grouped_gemm(grad_out, w2, (w2.stride(1), w2.stride(2)), plan, grad_pre, hidden, interpret,
                              gather=True, row_scale=weights, aux=pre, epilogue=EPILOGUE_ACTIVATION_GRAD,
                              glu=spec, activation=activation)
            if grad_w1_t is not None:
                if num_rows > 0:
                    _weight_grad(grad_pre, x, plan, grad_w1_t, grad_b1_t, interpret, gather_a=False, gather_b=True)
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
                    _grouped_gemm(grad_pre, w1, (w1.stride(1), w1.stride(2)), plan, grad_x_rows, d_in,
                                  interpret, gather=False)
                    _combine(grad_x_rows, ids, None, plan, num_experts, grad_x, interpret)
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
                save_pre, keep_rows, plan):
        inputs = (x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu, glu_interleaved, glu_a, glu_b,
                  save_pre, keep_rows)
        *outputs, ctx.plan = _expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation,
                                                 _spec(glu, glu_interleaved, glu_a, glu_b), save_pre, keep_rows, plan)
        outputs = _op_outputs(*outputs, w1.shape[1])
        _expert_mlp_setup(ctx, inputs, outputs)
        ctx.mark_non_differentiable(ctx.plan.expert_counts)
        return *outputs, ctx.plan.expert_counts  # the counts: the expert load, for a caller that routes once

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        return *_expert_mlp_grads(ctx, grad_out, direct=True), None


def expert_mlp(x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor, b1: Tensor | None,
               w2: Tensor, b2: Tensor | None, activation: str = "gelu", glu: bool | GluSpec = False) -> Tensor:
    """The Triton expert MLP (contract: ``moe_kernels.ops.expert_mlp``); float32/float16/bfloat16."""
    return expert_mlp_and_load(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu)[0]


def expert_mlp_and_load(x: Tensor, top_k_weights: Tensor, top_k_idx: Tensor, w1: Tensor, b1: Tensor | None,
                        w2: Tensor, b2: Tensor | None, activation: str = "gelu", glu: bool | GluSpec = False,
                        plan: RoutingPlan | None = None) -> tuple[Tensor, Tensor | None]:
    """``expert_mlp`` and, when it ran eagerly, the counts of the routing plan it ran on (the expert load: routed
    once); None under tracing, whose custom op keeps its plan inside. ``plan``: top_k_idx's routing plan when this
    backend's kernels built it already (``routing.gate_and_plan``; eager calls), else it is built here."""
    grad_enabled = torch.is_grad_enabled()

    def needs_grad(t: Tensor | None) -> bool:
        return grad_enabled and t is not None and t.requires_grad

    save_pre = needs_grad(x) or needs_grad(w1) or needs_grad(b1)  # d pre-activation is needed
    keep_rows = needs_grad(top_k_weights)  # the top-k weight gradient reads the unweighted expert rows
    if eager(x, top_k_weights, top_k_idx, w1, b1, w2, b2):
        if not (save_pre or keep_rows or needs_grad(w2) or needs_grad(b2)):  # inference: the launchers alone
            out, _, _, _, plan = _expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu,
                                                     False, False, plan)
            return out, plan.expert_counts
        outputs = _EagerExpertMLP.apply(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu_code(glu),
                                        save_pre, keep_rows, plan)
        return outputs[0], outputs[-1]
    return _expert_mlp_forward_op(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, *glu_code(glu), save_pre,
                                  keep_rows)[0], None
