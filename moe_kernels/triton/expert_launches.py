"""How the Triton expert kernels launch: each launcher's tiles, grid, strides and constexprs, built once per shape
(``runtime.Launch``, ``runtime.shape_cache``), and its tensors in the kernel's signature order. The grouped GEMM
(fc1, fc2 and their input gradients), the weight gradients, the combine (alone, or with fc2 for few rows) and the
top-k weight gradient; a forward's fc1, fc2 and combine as one cached trio. The kernels: expert_kernels.py; the ops
and autograd: experts.py.

T tokens, K top_k, E experts, D input features, H hidden (H1 = H or 2*H with GLU), O output features, R = T*K rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.reference import ACTIVATIONS, GluSpec, glu_code
from moe_kernels.routing import RoutingPlan
from moe_kernels.triton import runtime
from moe_kernels.triton.runtime import ELEMENTWISE_TILE, cdiv, dot_options, next_power_of_2
from moe_kernels.triton.tiles import INTERPRET_GEMM, INTERPRET_WEIGHT_GRAD, gemm_config, weight_grad_config

# The kernels' constexpr activation codes: positions in the reference's table (expert_kernels.py spells the order).
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
EPILOGUE_PLAIN, EPILOGUE_ACTIVATION, EPILOGUE_ACTIVATION_GRAD = 0, 1, 2


def grouped_gemm(a: Tensor, weight: Tensor, b_strides: tuple[int, int], plan: RoutingPlan, out: Tensor,
                 num_cols: int, interpret: bool, *, gather: bool, bias: Tensor | None = None,
                 row_scale: Tensor | None = None, aux: Tensor | None = None,
                 epilogue: int = EPILOGUE_PLAIN, glu: GluSpec | None = None, activation: str = "gelu",
                 store_aux: bool = False) -> None:
    """out rows of expert e = epilogue(A rows @ B[e] (+ bias[e]) (* row_scale)), B[e][k, n] read
    at weight[e] + k * b_strides[0] + n * b_strides[1]; K = a.shape[1]; N = num_cols; glu: fc1's
    GLU variant (the activation epilogues)."""
    aux_t = aux if aux is not None else out
    strides = gemm_strides(a.stride(), weight.stride(0), b_strides, bias.stride(0) if bias is not None else 0,
                           aux_t.stride(), out.stride())
    spec = gemm_launch(plan.sorted_slots.numel(), num_cols, a.shape[1], weight.shape[0], strides, plan.top_k,
                       gather, bias is not None, row_scale is not None, epilogue, glu_code(glu), activation,
                       store_aux, a.dtype, a.get_device(), interpret, runtime.allow_tf32())
    launch_gemm(spec, interpret, a, weight, plan, out, bias, row_scale, aux)


def gemm_strides(a: tuple[int, int], weight_expert: int, b: tuple[int, int], bias: int, aux: tuple[int, int],
                 out: tuple[int, int]) -> tuple[int, ...]:
    """grouped_gemm_kernel's stride arguments, in its signature's order."""
    return (*a, weight_expert, *b, bias, *aux, *out)


def launch_gemm(spec: runtime.Launch, interpret: bool, a: Tensor, weight: Tensor, plan: RoutingPlan, out: Tensor,
                bias: Tensor | None = None, row_scale: Tensor | None = None, aux: Tensor | None = None) -> None:
    """grouped_gemm_kernel's tensors in its signature's order (an absent one: ``out``, which the kernel does not
    read for it)."""
    runtime.launch(spec, interpret, a, weight, bias if bias is not None else out,
                   row_scale if row_scale is not None else out, aux if aux is not None else out, out,
                   plan.sorted_slots, plan.expert_offsets)


@runtime.shape_cache
def gemm_launch(num_rows: int, num_cols: int, reduce_dim: int, num_experts: int, strides: tuple, top_k: int,
                gather: bool, has_bias: bool, scale_rows: bool, epilogue: int, glu: tuple, activation: str,
                store_aux: bool, dtype: torch.dtype, device: int, interpret: bool, allow_tf32: bool) -> runtime.Launch:
    glu_kind, interleaved, glu_a, glu_b = glu  # kind 0: no GLU; the kernel's GLU_KIND counts from plain
    meta = dict(TOP_K=top_k, GATHER_A=gather, HAS_BIAS=has_bias, SCALE_ROWS=scale_rows, EPILOGUE=epilogue,
                GLU=glu_kind > 0, ACTIVATION=ACTIVATION_CODES[activation], STORE_AUX=store_aux,
                GLU_KIND=max(glu_kind - 1, 0), INTERLEAVED=interleaved, GLU_A=glu_a, GLU_B=glu_b,
                BLOCK_E=next_power_of_2(num_experts), **dot_options(dtype, interpret, allow_tf32))
    meta.update(INTERPRET_GEMM if interpret else gemm_config(num_rows / num_experts, dtype, glu_kind > 0, device,
                                                             epilogue))
    # Row tiles: at most cdiv(R, BLOCK_M) + the experts with rows (<= min(E, R)); expert_kernels.py says why.
    grid = ((cdiv(num_rows, meta["BLOCK_M"]) + min(num_experts, num_rows)) * cdiv(num_cols, meta["BLOCK_N"]),)
    return runtime.Launch("grouped_gemm_kernel", grid, (num_rows, num_cols, reduce_dim, num_experts, *strides), meta)


def weight_grad(a: Tensor, b: Tensor, plan: RoutingPlan, grad_w: Tensor, grad_bias: Tensor | None,
                interpret: bool, *, gather_a: bool, gather_b: bool, row_scale: Tensor | None = None) -> None:
    """grad_w[e] = A_e^T B_e over expert e's rows, grad_bias[e] = column sums of A_e."""
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1), *grad_w.stride(),
               grad_bias.stride(0) if grad_bias is not None else 0)
    spec = weight_grad_launch(tuple(grad_w.shape), plan.sorted_slots.numel(), strides, plan.top_k, gather_a,
                              gather_b, row_scale is not None, grad_bias is not None, a.dtype, a.get_device(),
                              interpret, runtime.allow_tf32())
    runtime.launch(spec, interpret, a, b, row_scale if row_scale is not None else grad_w, plan.sorted_slots,
                   plan.expert_offsets, grad_w, grad_bias if grad_bias is not None else grad_w)


@runtime.shape_cache
def weight_grad_launch(shape: tuple[int, int, int], num_rows: int, strides: tuple, top_k: int, gather_a: bool,
                       gather_b: bool, scale_a: bool, has_bias: bool, dtype: torch.dtype, device: int,
                       interpret: bool, allow_tf32: bool) -> runtime.Launch:
    num_experts, p_dim, q_dim = shape
    meta = dict(TOP_K=top_k, GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=scale_a, HAS_BIAS=has_bias,
                **dot_options(dtype, interpret, allow_tf32))
    meta.update(INTERPRET_WEIGHT_GRAD if interpret else weight_grad_config(num_rows / num_experts, dtype, device))
    # The first Q tile's programs write the bias gradient: one Q tile even where Q = 0 (no D or no H).
    grid = (cdiv(p_dim, meta["BLOCK_P"]) * max(1, cdiv(q_dim, meta["BLOCK_Q"])), num_experts)
    return runtime.Launch("grouped_weight_grad_kernel", grid, (p_dim, q_dim, num_experts, *strides), meta)


def combine(rows: Tensor, ids: Tensor, weights: Tensor | None, plan: RoutingPlan, num_experts: int,
            out: Tensor, interpret: bool) -> None:
    """out[t] = sum over kept k of (weights[t, k] *) rows[slot_rows[t*K + k]]."""
    spec = combine_launch(*out.shape, num_experts, (*rows.stride(), *out.stride()), plan.top_k, weights is not None,
                          interpret)
    launch_combine(spec, interpret, rows, ids, weights, plan, out)


def launch_combine(spec: runtime.Launch, interpret: bool, rows: Tensor, ids: Tensor, weights: Tensor | None,
                   plan: RoutingPlan, out: Tensor) -> None:
    runtime.launch(spec, interpret, rows, plan.slot_rows, ids, weights if weights is not None else rows, out)


@runtime.shape_cache
def combine_launch(num_tokens: int, num_cols: int, num_experts: int, strides: tuple, top_k: int,
                   apply_weights: bool, interpret: bool) -> runtime.Launch:
    block_n = min(next_power_of_2(max(num_cols, 1)), 16 if interpret else 128)
    block_t = max(1, min(64, ELEMENTWISE_TILE // block_n))
    return runtime.Launch("combine_kernel", (cdiv(num_tokens, block_t), cdiv(num_cols, block_n)),
                          (num_tokens, num_cols, num_experts, *strides),
                          dict(TOP_K=top_k, APPLY_WEIGHTS=apply_weights, BLOCK_T=block_t, BLOCK_N=block_n))


@runtime.shape_cache
def topk_weight_grad_launch(num_rows: int, out_features: int, num_experts: int, strides: tuple, top_k: int,
                            interpret: bool) -> runtime.Launch:
    block_n = min(next_power_of_2(out_features), 16 if interpret else 128)
    block_s = max(1, min(128, ELEMENTWISE_TILE // block_n))
    return runtime.Launch("topk_weight_grad_kernel", (cdiv(num_rows, block_s),),
                          (num_rows, out_features, num_experts, *strides),
                          dict(TOP_K=top_k, BLOCK_S=block_s, BLOCK_N=block_n))


@runtime.shape_cache
def forward_launches(num_tokens: int, top_k: int, x_strides: tuple[int, int], w1_shape: tuple[int, int, int],
                     w1_strides: tuple[int, int, int], w2_shape: tuple[int, int, int], w2_strides: tuple[int, int, int],
                     has_b1: bool, has_b2: bool, activation: str, glu: tuple, save_pre: bool, keep_rows: bool,
                     dtype: torch.dtype, device: int, interpret: bool,
                     allow_tf32: bool) -> tuple[runtime.Launch, runtime.Launch, runtime.Launch]:
    """A forward's fc1, fc2 and combine, built once per shape: its buffers are fresh and contiguous (pre [R, H1]
    when saved, hidden_rows [R, H], rows [R, O], out [T, O]; biases made contiguous). Where the rows are not kept
    and number at most E, fc2 is ``fc2_combine_kernel`` (no rows buffer) and the combine None."""
    num_experts, hidden1, d_in = w1_shape
    _, out_features, hidden = w2_shape
    num_rows = num_tokens * top_k
    # fc1: token rows gathered in-kernel; B[e][d, h] = w1[e, h, d]; pre (aux) kept when saved.
    aux = (hidden1, 1) if save_pre else (hidden, 1)
    fc1 = gemm_launch(num_rows, hidden, d_in, num_experts,
                      gemm_strides(x_strides, w1_strides[0], (w1_strides[2], w1_strides[1]), hidden1 if has_b1 else 0,
                                   aux, (hidden, 1)),
                      top_k, True, has_b1, False, EPILOGUE_ACTIVATION, glu, activation, save_pre, dtype, device,
                      interpret, allow_tf32)
    if not keep_rows and num_rows <= num_experts:  # about a row per expert: fc2 and the combine as one pass
        fc2 = fc2_combine_launch(num_tokens, out_features, hidden, num_experts,
                                 (hidden, 1, *w2_strides, out_features if has_b2 else 0, out_features, 1), top_k,
                                 has_b2, interpret)
        return fc1, fc2, None
    # fc2: the top-k weight is folded into the epilogue unless its gradient is needed.
    fc2 = gemm_launch(num_rows, out_features, hidden, num_experts,
                      gemm_strides((hidden, 1), w2_strides[0], (w2_strides[2], w2_strides[1]),
                                   out_features if has_b2 else 0, (out_features, 1), (out_features, 1)),
                      top_k, False, has_b2, not keep_rows, EPILOGUE_PLAIN, glu_code(None), "gelu", False, dtype,
                      device, interpret, allow_tf32)
    combine = combine_launch(num_tokens, out_features, num_experts, (out_features, 1, out_features, 1), top_k,
                             keep_rows, interpret)
    return fc1, fc2, combine


def launch_fc2_combine(spec: runtime.Launch, interpret: bool, hidden_rows: Tensor, w2: Tensor, b2: Tensor | None,
                       plan: RoutingPlan, ids: Tensor, weights: Tensor, out: Tensor) -> None:
    runtime.launch(spec, interpret, hidden_rows, w2, b2 if b2 is not None else out, plan.slot_rows, ids, weights, out)


@runtime.shape_cache
def fc2_combine_launch(num_tokens: int, out_features: int, hidden: int, num_experts: int, strides: tuple,
                       top_k: int, has_bias: bool, interpret: bool) -> runtime.Launch:
    block_k = next_power_of_2(top_k)
    if interpret:
        block_n = block_h = 16  # small, so that tests cross tile edges
    else:
        # >= 256 programs (two per SM of an H100) where the columns allow. The loop's loads are not pipelined,
        # so each step's tile is what a program has in flight: ~8192 weights (16 KB in bf16) over 8 warps, 4 MB
        # over 256 programs, past the ~3.5 MB that H100/H200 bandwidth times DRAM latency asks for.
        block_n = max(8, min(64, next_power_of_2(cdiv(num_tokens * out_features, 256)), 8192 // (block_k * 64)))
        block_h = min(next_power_of_2(hidden), max(16, 8192 // (block_k * block_n)))
    meta = dict(TOP_K=top_k, HAS_BIAS=has_bias, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_H=block_h)
    if not interpret:
        meta["num_warps"] = 8
    return runtime.Launch("fc2_combine_kernel", (num_tokens, cdiv(out_features, block_n)),
                          (num_tokens, out_features, hidden, num_experts, *strides), meta)
