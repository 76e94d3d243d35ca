"""Triton kernels of the expert MLP: activations and GLU variants, grouped GEMMs over expert segments,
weight gradients, the combine back to token order (alone, or with fc2 for few rows) and the top-k weights'
gradient. Launched by moe_kernels/triton/experts.py.

T tokens, K top_k slots per token, E experts, D input features, H expert hidden size
(H1 = H, or 2*H with GLU: gate rows then up rows, or interleaved), O output features, R = T*K rows.
A *slot* is ``t * K + k``; a *row* is a position in expert-sorted order (see moe_kernels.routing):
expert e owns rows ``[offsets[e], offsets[e+1])``, dropped slots sit in ``[offsets[E], R)`` and are
never computed. Row tiles of the grouped GEMMs never straddle two experts: expert e has
``ceil(count_e / BLOCK_M)`` tiles, so the grid is sized for the worst case ``ceil(R / BLOCK_M) + E``
and surplus programs exit; no host sync, CUDA-graph capturable.

Every row/token index is widened to int64 before it is multiplied by a stride, so offsets past
2**31 elements (T*K*D at scale) are safe. Accumulation is fp32; loads keep their dtype for tl.dot
(DOT_FP32 converts the operands first: the interpreter's bf16 tl.dot is wrong) and are converted
explicitly wherever arithmetic mixes dtypes.
"""

import triton
import triton.language as tl

# Activation codes (constexpr): positions in moe_kernels.reference.ACTIVATIONS (experts.py maps names to them).
GELU, GELU_TANH, QUICK_GELU, SILU, RELU, RELU2 = 0, 1, 2, 3, 4, 5
# GLU variant codes (constexpr GLU_KIND): positions in moe_kernels.reference.GLU_KINDS.
GLU_PLAIN, GLU_CLAMPED, GLU_CLAMPED_AFTER, GLU_SOFTCAPPED = 0, 1, 2, 3


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """fp32 act(x)."""
    if ACTIVATION == 0:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:  # gelu (tanh): 0.5 * (1 + tanh(z)) == sigmoid(2z), without cancellation
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * _sigmoid(2.0 * z)
    elif ACTIVATION == 2:  # quick_gelu
        y = x * _sigmoid(1.702 * x)
    elif ACTIVATION == 3:  # silu
        y = x * _sigmoid(x)
    elif ACTIVATION == 4:  # relu
        y = tl.maximum(x, 0.0)
    else:  # relu2
        y = tl.maximum(x, 0.0) * tl.maximum(x, 0.0)
    return y


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """fp32 d act(x) / dx."""
    if ACTIVATION == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        d = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACTIVATION == 1:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = _sigmoid(2.0 * z)
        d = s + x * 2.0 * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACTIVATION == 2:
        s = _sigmoid(1.702 * x)
        d = s + 1.702 * x * s * (1.0 - s)
    elif ACTIVATION == 3:
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == 4:
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:
        d = 2.0 * tl.maximum(x, 0.0)
    return d


@triton.jit
def _tanh(x):
    """fp32 tanh(x) to a few ulp everywhere. 2 * sigmoid(2x) - 1 cancels near 0, where softcapped's arguments
    (x / cap, caps of 30 or 50) mostly are: an odd Taylor polynomial below |x| = 0.3 (the first omitted term is
    below 1e-8 of x there), (1 - e^{-2|x|}) / (1 + e^{-2|x|}) with x's sign above."""
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    t = tl.exp(-2.0 * ax)
    large = (1.0 - t) / (1.0 + t)
    return tl.where(ax < 0.3, small, tl.where(x < 0.0, -large, large))


@triton.jit
def _clamp(x, LIMIT: tl.constexpr):
    return tl.minimum(tl.maximum(x, -LIMIT), LIMIT)


@triton.jit
def _glu(gate, up, ACTIVATION: tl.constexpr, GLU_KIND: tl.constexpr, GLU_A: tl.constexpr, GLU_B: tl.constexpr):
    """fp32 hidden value from fp32 gate and up: the formulas of moe_kernels.reference.apply_glu
    (GLU_A, GLU_B: limit and up offset of the clamped kinds, gate and up caps of softcapped)."""
    if GLU_KIND == 0:  # plain
        y = _activation(gate, ACTIVATION) * up
    elif GLU_KIND == 1:  # clamped
        y = _activation(tl.minimum(gate, GLU_A), ACTIVATION) * (_clamp(up, GLU_A) + GLU_B)
    elif GLU_KIND == 2:  # clamped_after
        y = tl.minimum(_activation(gate, ACTIVATION), GLU_A) * (_clamp(up, GLU_A) + GLU_B)
    else:  # softcapped
        y = _tanh(gate / GLU_A) * GLU_A * _sigmoid(gate) * (_tanh(up / GLU_B) * GLU_B)
    return y


@triton.jit
def _glu_grad(grad, gate, up, ACTIVATION: tl.constexpr, GLU_KIND: tl.constexpr, GLU_A: tl.constexpr,
              GLU_B: tl.constexpr):
    """fp32 (d gate, d up) for d hidden = grad. A clamp passes the gradient strictly inside its limits
    (lo < x < hi) and zeroes it elsewhere, at the limits too (torch.clamp's backward)."""
    if GLU_KIND == 0:
        d_gate = grad * up * _activation_grad(gate, ACTIVATION)
        d_up = grad * _activation(gate, ACTIVATION)
    elif GLU_KIND == 1:
        clamped_gate = tl.minimum(gate, GLU_A)
        d_gate = tl.where(gate < GLU_A,
                          grad * (_clamp(up, GLU_A) + GLU_B) * _activation_grad(clamped_gate, ACTIVATION), 0.0)
        d_up = tl.where((up > -GLU_A) & (up < GLU_A), grad * _activation(clamped_gate, ACTIVATION), 0.0)
    elif GLU_KIND == 2:
        gate_act = _activation(gate, ACTIVATION)
        d_gate = tl.where(gate_act < GLU_A,
                          grad * (_clamp(up, GLU_A) + GLU_B) * _activation_grad(gate, ACTIVATION), 0.0)
        d_up = tl.where((up > -GLU_A) & (up < GLU_A), grad * tl.minimum(gate_act, GLU_A), 0.0)
    else:
        tanh_gate = _tanh(gate / GLU_A)
        sig = _sigmoid(gate)
        factor = tanh_gate * GLU_A * sig
        tanh_up = _tanh(up / GLU_B)
        d_gate = grad * (tanh_up * GLU_B) * ((1.0 - tanh_gate * tanh_gate) * sig + factor * (1.0 - sig))
        d_up = grad * factor * (1.0 - tanh_up * tanh_up)
    return d_gate, d_up


# ----------------------------------------------------------------------------------------------
# Grouped GEMM over expert segments


@triton.jit
def _expert_tile(pid_m, expert_offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of row tile pid_m; expert >= E for a surplus program.

    Tiles go expert after expert, ceil(count_e / BLOCK_M) each, so a tile never spans two experts.
    """
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    starts = tl.load(expert_offsets_ptr + experts, mask=expert_mask, other=0)
    ends = tl.load(expert_offsets_ptr + experts + 1, mask=expert_mask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_through = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_through <= pid_m).to(tl.int32), axis=0)
    chosen = experts == expert
    first_tile = tl.sum(tl.where(chosen, tiles_through - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(chosen, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(chosen, ends, 0), axis=0)
    return expert, row_start, row_end


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, row_scale_ptr, aux_ptr, out_ptr, sorted_slots_ptr, expert_offsets_ptr,
    R, N, K, E,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_bias_e,
    stride_auxm, stride_auxn, stride_om, stride_on,
    TOP_K: tl.constexpr, GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_ROWS: tl.constexpr,
    EPILOGUE: tl.constexpr, GLU: tl.constexpr, ACTIVATION: tl.constexpr, STORE_AUX: tl.constexpr,
    GLU_KIND: tl.constexpr, INTERLEAVED: tl.constexpr, GLU_A: tl.constexpr, GLU_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """For each kept row r of expert e: acc[r, n] = sum_k A[a(r), k] * B[e, k, n] (+ bias[e, n]),
    times row_scale[slot(r)] if SCALE_ROWS, then the epilogue, for n in [0, N).

    A rows: a(r) = sorted_slots[r] // TOP_K (token rows gathered in-kernel, no permuted copy) if
    GATHER_A, else r. B is read through strides, so W [E, N, K] (nn.Linear) and W^T both work.
    EPILOGUE 0: out = acc.
    EPILOGUE 1 (fc1): out = act(acc) [R, N]; with GLU acc reads the gate columns of B and a second
                     accumulator the up columns (n and N + n, or 2n and 2n + 1 if INTERLEAVED: the
                     weights are read in place, never reordered) and out = _glu(gate, up) (GLU_KIND,
                     GLU_A, GLU_B); STORE_AUX keeps the pre-activation [R, N or 2N] in aux for the backward.
    EPILOGUE 2 (fc2 backward into fc1's output): acc is d act; aux holds the pre-activation;
                     out = d pre-activation [R, N or 2N] (gate and up in aux's columns with GLU).
    Grid: ((cdiv(R, BLOCK_M) + min(E, R)) * cdiv(N, BLOCK_N),), grouped GROUP_M row tiles at a time: the
    experts' tiles number sum_e ceil(count_e / BLOCK_M) <= cdiv(R, BLOCK_M) + (experts with rows, at most
    min(E, R)), so at decode (R = K rows) the grid holds about K + 1 row tiles, not E + 1.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(R, BLOCK_M) + tl.minimum(E, R)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_in_group) % group_size_m
    pid_n = (pid % pids_in_group) // group_size_m

    expert, row_start, row_end = _expert_tile(pid_m, expert_offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if GATHER_A or SCALE_ROWS:
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    if GATHER_A:
        a_rows = slots // TOP_K
    else:
        a_rows = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    cols64 = cols.to(tl.int64)
    # Columns of hidden value n's gate and up in fc1's [R, 2N] output (and in B, aux, and EPILOGUE 2's out).
    if INTERLEAVED:
        gate_cols = 2 * cols64
        up_cols = gate_cols + 1
    else:
        gate_cols = cols64
        up_cols = cols64 + N
    if EPILOGUE == 1:
        b_cols = gate_cols
    else:
        b_cols = cols64
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + b_cols[None, :] * stride_bn
    b_up_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + up_cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (ks[None, :] < k_left), other=0.0)
        b_mask = (ks[:, None] < k_left) & col_mask[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GLU and EPILOGUE == 1:
            b_up = tl.load(b_up_ptrs, mask=b_mask, other=0.0)
            if DOT_FP32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            b_up_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias_row = bias_ptr + expert.to(tl.int64) * stride_bias_e
        acc += tl.load(bias_row + b_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GLU and EPILOGUE == 1:
            acc_up += tl.load(bias_row + up_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SCALE_ROWS:
        acc = acc * tl.load(row_scale_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]

    mask = row_mask[:, None] & col_mask[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols64[None, :] * stride_on
    out_gate_ptrs = out_ptr + rows[:, None] * stride_om + gate_cols[None, :] * stride_on
    out_up_ptrs = out_ptr + rows[:, None] * stride_om + up_cols[None, :] * stride_on
    out_ty = out_ptr.dtype.element_ty
    aux_ptrs = aux_ptr + rows[:, None] * stride_auxm + gate_cols[None, :] * stride_auxn
    aux_up_ptrs = aux_ptr + rows[:, None] * stride_auxm + up_cols[None, :] * stride_auxn
    if EPILOGUE == 0:
        tl.store(out_ptrs, acc.to(out_ty), mask=mask)
    elif EPILOGUE == 1:
        if STORE_AUX:
            tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            if GLU:
                tl.store(aux_up_ptrs, acc_up.to(aux_ptr.dtype.element_ty), mask=mask)
        if GLU:
            hidden = _glu(acc, acc_up, ACTIVATION, GLU_KIND, GLU_A, GLU_B)
        else:
            hidden = _activation(acc, ACTIVATION)
        tl.store(out_ptrs, hidden.to(out_ty), mask=mask)
    else:
        pre = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            up = tl.load(aux_up_ptrs, mask=mask, other=0.0).to(tl.float32)
            d_gate, d_up = _glu_grad(acc, pre, up, ACTIVATION, GLU_KIND, GLU_A, GLU_B)
            tl.store(out_gate_ptrs, d_gate.to(out_ty), mask=mask)
            tl.store(out_up_ptrs, d_up.to(out_ty), mask=mask)
        else:
            tl.store(out_ptrs, (acc * _activation_grad(pre, ACTIVATION)).to(out_ty), mask=mask)


@triton.jit
def grouped_weight_grad_kernel(
    a_ptr, b_ptr, row_scale_ptr, sorted_slots_ptr, expert_offsets_ptr, grad_w_ptr, grad_bias_ptr,
    P, Q, E,
    stride_am, stride_ap, stride_bm, stride_bq, stride_ge, stride_gp, stride_gq, stride_gbe,
    TOP_K: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """grad_w[e] = sum over expert e's rows r of A[a(r), :]^T B[b(r), :]  -> [P, Q];
    grad_bias[e] = sum_r A[a(r), :] (programs of the first Q tile). A row is scaled by
    row_scale[slot(r)] if SCALE_A. Each program owns one (expert, P tile, Q tile) and walks its
    expert's rows: no atomics, deterministic, experts with no rows get zeros.
    Grid: (cdiv(P, BLOCK_P) * max(cdiv(Q, BLOCK_Q), 1), E).
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    num_pid_q = tl.maximum(tl.cdiv(Q, BLOCK_Q), 1)  # Q = 0: one tile, which writes the bias gradient
    pid_p = pid // num_pid_q
    pid_q = pid % num_pid_q
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = ps < P
    q_mask = qs < Q
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for first in range(row_start, row_end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = rows < row_end
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
        if GATHER_A:
            a_rows = slots // TOP_K
        else:
            a_rows = rows
        if GATHER_B:
            b_rows = slots // TOP_K
        else:
            b_rows = rows
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ps[None, :] * stride_ap,
                    mask=row_mask[:, None] & p_mask[None, :], other=0.0)
        if SCALE_A:
            scale = tl.load(row_scale_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[:, None]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=row_mask[:, None] & q_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(a.to(tl.float32), axis=0)
    grad_ptrs = grad_w_ptr + expert * stride_ge + ps[:, None].to(tl.int64) * stride_gp + qs[None, :] * stride_gq
    tl.store(grad_ptrs, acc.to(grad_w_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])
    if HAS_BIAS:
        if pid_q == 0:
            tl.store(grad_bias_ptr + expert * stride_gbe + ps, bias_acc.to(grad_bias_ptr.dtype.element_ty),
                     mask=p_mask)


# ----------------------------------------------------------------------------------------------
# Combine back to token order, and the gradient of the top-k weights


@triton.jit
def combine_kernel(
    rows_ptr, slot_rows_ptr, ids_ptr, weights_ptr, out_ptr, T, N, E,
    stride_rm, stride_rn, stride_om, stride_on,
    TOP_K: tl.constexpr, APPLY_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum over kept slots k of (weights[t, k] *) rows[slot_rows[t*K + k]], in fp32.

    A gather-sum in slot order: deterministic, no atomics. Dropped slots are selected away and
    their rows never read, so a NaN there cannot leak. Grid: (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)).
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slots = tokens * TOP_K + k
        ids = tl.load(ids_ptr + slots, mask=token_mask, other=-1)
        kept = token_mask & (ids >= 0) & (ids < E)
        rows = tl.load(slot_rows_ptr + slots, mask=kept, other=0)
        values = tl.load(rows_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                         mask=kept[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        if APPLY_WEIGHTS:
            values = values * tl.load(weights_ptr + slots, mask=kept, other=0.0)[:, None]
        acc += tl.where(kept[:, None], values, 0.0)
    tl.store(out_ptr + tokens[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & col_mask[None, :])


@triton.jit
def fc2_combine_kernel(
    hidden_ptr, w_ptr, bias_ptr, slot_rows_ptr, ids_ptr, weights_ptr, out_ptr, T, N, H, E,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_bias_e, stride_om, stride_on,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fc2 and the combine in one token-major pass, for few rows (decode): out[t, n] = sum over kept slots k of
    weights[t, k] * (sum_h hidden[slot_rows[t*K + k], h] * W[e, n, h] (+ bias[e, n])), e = ids[t, k], in fp32
    and rounded once. A program owns one token's BLOCK_N output columns and reads its K experts' W[e] slices
    together, a [BLOCK_K, BLOCK_N, BLOCK_H] tile per step of H (all K loads in flight at once: the kernel is a
    bandwidth-bound GEMV); the sum over k is a fixed-order reduction: deterministic, no atomics, no [R, N] rows
    buffer and no combine launch. Each (token, expert) pair reads its own slice, so this pays where experts see
    about one row each (T*K <= E); past that the grouped GEMM, which reads each W[e] once for all its rows, does.
    Dropped slots are masked: their rows and weights never read. Grid: (T, cdiv(N, BLOCK_N)).
    """
    token = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    slots = token * TOP_K + ks
    experts = tl.load(ids_ptr + slots, mask=ks < TOP_K, other=-1)
    kept = (ks < TOP_K) & (experts >= 0) & (experts < E)
    hidden_rows = hidden_ptr + tl.load(slot_rows_ptr + slots, mask=kept, other=0) * stride_hm
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < N
    w_rows = w_ptr + experts[:, None, None] * stride_we + cols[None, :, None] * stride_wn  # [BLOCK_K, BLOCK_N, 1]
    w_mask = kept[:, None, None] & col_mask[None, :, None]
    hs = tl.arange(0, BLOCK_H)
    part = tl.zeros((BLOCK_K, BLOCK_N, BLOCK_H), dtype=tl.float32)
    for first in range(0, H, BLOCK_H):
        h_mask = first + hs < H
        h = tl.load(hidden_rows[:, None] + (first + hs)[None, :] * stride_hk, mask=kept[:, None] & h_mask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_rows + (first + hs)[None, None, :] * stride_wk, mask=w_mask & h_mask[None, None, :],
                    other=0.0).to(tl.float32)
        part += w * h[:, None, :]
    value = tl.sum(part, axis=2)  # [BLOCK_K, BLOCK_N]: each kept expert's output columns
    if HAS_BIAS:
        value += tl.load(bias_ptr + experts[:, None] * stride_bias_e + cols[None, :],
                         mask=kept[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    weights = tl.load(weights_ptr + slots, mask=kept, other=0.0)
    acc = tl.sum(weights[:, None] * value, axis=0)  # a dropped slot: weight 0 times value 0
    tl.store(out_ptr + token * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def topk_weight_grad_kernel(
    grad_out_ptr, rows_ptr, slot_rows_ptr, ids_ptr, grad_weights_ptr, num_slots, N, E,
    stride_gm, stride_gn, stride_rm, stride_rn,
    TOP_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_weights[t, k] = <grad_out[t], rows[slot_rows[t*K + k]]> for kept slots, 0 for dropped.

    rows are the unweighted expert outputs [R, N]. Writes fp32 [T*K]. Grid: (cdiv(T*K, BLOCK_S),).
    """
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_mask = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=slot_mask, other=-1)
    kept = slot_mask & (ids >= 0) & (ids < E)
    rows = tl.load(slot_rows_ptr + slots, mask=kept, other=0)
    tokens = slots // TOP_K
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for first in range(0, N, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        mask = kept[:, None] & (cols < N)[None, :]
        grad = tl.load(grad_out_ptr + tokens[:, None] * stride_gm + cols[None, :] * stride_gn,
                       mask=mask, other=0.0).to(tl.float32)
        values = tl.load(rows_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                         mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(grad * values, axis=1)
    tl.store(grad_weights_ptr + slots, tl.where(kept, acc, 0.0), mask=slot_mask)
