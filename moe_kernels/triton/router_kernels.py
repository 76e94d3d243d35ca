"""Triton kernels of the router: the fused fp32 softmax, top-k and renormalisation (and its backward), the
routing plan (a stable counting sort of the T*K slots by expert: one block when they fit, else histogram,
scan and scatter, the scan inside the scatter when the per-block counts are few), the router's GEMM with the
gating and the blocks' counts, and, for decode and small batches, the router's GEMM, its gating and the
routing plan in one program. Launched by
moe_kernels/triton/gating.py and routing.py (through runtime.launch, which defines these kernels once per mode:
compiled, or interpreted on CPU tensors).

T tokens, D features, E experts, K top_k. A *slot* is ``t * K + k``; a *row* is a position in expert-sorted
order (see moe_kernels.routing): expert e owns rows ``[offsets[e], offsets[e+1])``, dropped slots (ids outside
[0, E)) sit in ``[offsets[E], R)``, R = T*K.
"""

import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# Gating: softmax, top-k, renormalisation


@triton.jit
def _softmax(logits, expert_mask):
    """fp32 softmax over the E columns of a [BLOCK_T, BLOCK_E] tile; padding columns get 0."""
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return exp / tl.sum(exp, axis=1)[:, None]


@triton.jit
def _softmax_rows(logits_ptr, tokens, token_mask, experts, expert_mask, stride_lt, stride_le):
    """_softmax of a [BLOCK_T, BLOCK_E] tile of logits read from memory."""
    mask = token_mask[:, None] & expert_mask[None, :]
    logits = tl.load(logits_ptr + tokens[:, None] * stride_lt + experts[None, :] * stride_le,
                     mask=mask, other=0.0).to(tl.float32)
    return _softmax(logits, expert_mask)


@triton.jit
def _top_k(probs, experts, expert_mask, TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-k of each row of probabilities by repeated arg-max (ties to the lower id), optionally renormalised:
    ([BLOCK_T, BLOCK_K] fp32 weights, [BLOCK_T, BLOCK_K] int64 ids; columns past TOP_K are 0)."""
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
    return top_w, top_i


@triton.jit
def topk_gating_kernel(
    logits_ptr, weights_ptr, ids_ptr, block_counts_ptr, T, E, stride_lt, stride_le,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    HISTOGRAM: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """fp32 softmax over E, top-k, optional renormalisation (``_top_k``); with HISTOGRAM also what
    routing_histogram_kernel would count of the ids it writes: the program's BLOCK_T tokens are one routing block.

    Reads logits [T, E]; writes weights [T, K] fp32 and ids [T, K] int64 (and block_counts [cdiv(T, BLOCK_T), E+1]
    int64, BLOCK_B > E). Grid: (cdiv(T, BLOCK_T),).
    """
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    probs = _softmax_rows(logits_ptr, tokens, token_mask, experts, expert_mask, stride_lt, stride_le)
    top_w, top_i = _top_k(probs, experts, expert_mask, TOP_K, NORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K)
    _store_gating(weights_ptr, ids_ptr, block_counts_ptr, top_w, top_i, block, tokens, token_mask, T, E, TOP_K,
                  BLOCK_T, BLOCK_K, HISTOGRAM, BLOCK_T, BLOCK_B)


@triton.jit
def _store_gating(weights_ptr, ids_ptr, block_counts_ptr, top_w, top_i, block, tokens, token_mask, T, E,
                  TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, HISTOGRAM: tl.constexpr,
                  ROUTE_T: tl.constexpr, BLOCK_B: tl.constexpr):
    """Writes a program's BLOCK_T tokens' top-k weights and ids ([T, K] each) and, with HISTOGRAM, the rows of
    routing_histogram_kernel's counts over the E + 1 buckets of the BLOCK_T / ROUTE_T routing blocks of ROUTE_T
    tokens they make up."""
    ks = tl.arange(0, BLOCK_K)
    out_mask = token_mask[:, None] & (ks[None, :] < TOP_K)
    out_offsets = tokens[:, None] * TOP_K + ks[None, :]
    tl.store(weights_ptr + out_offsets, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offsets, top_i, mask=out_mask)
    if HISTOGRAM:  # a [BLOCK_T / ROUTE_T, ROUTE_T * BLOCK_K] view of the lanes: a routing block a row
        lane_ids = tl.reshape(top_i, (BLOCK_T // ROUTE_T, ROUTE_T * BLOCK_K))
        lane_mask = tl.reshape(out_mask, (BLOCK_T // ROUTE_T, ROUTE_T * BLOCK_K))
        bins = tl.arange(0, BLOCK_B)
        one_hot = ((lane_ids[:, :, None] == bins[None, None, :]) & lane_mask[:, :, None]).to(tl.int32)
        counts = tl.sum(one_hot, axis=1).to(tl.int64)
        rows = block * (BLOCK_T // ROUTE_T) + tl.arange(0, BLOCK_T // ROUTE_T)
        tl.store(block_counts_ptr + rows[:, None] * (E + 1) + bins[None, :], counts,
                 mask=(rows[:, None] * ROUTE_T < T) & (bins[None, :] < E + 1))


@triton.jit
def topk_gating_backward_kernel(
    logits_ptr, ids_ptr, grad_weights_ptr, grad_in_ptr, grad_logits_ptr, T, E,
    stride_lt, stride_le, stride_it, stride_ie, stride_gt, stride_ge,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradient of topk_gating w.r.t. the logits (softmax recomputed, not stored).

    s_k = p[id_k]; w_k = s_k / S (S = sum_k s_k) -> dL/ds_k = (dw_k - sum_j dw_j w_j) / S;
    dL/dlogits = p * (g - sum_e g_e p_e), g scattering dL/ds_k to the chosen experts.
    Reads logits [T, E], ids [T, K], grad_weights [T, K] fp32 and, with ACCUMULATE, grad_in [T, E]: the logits'
    gradient from their other uses (the router's losses), added in fp32; writes grad_logits [T, E].
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
    mask = token_mask[:, None] & expert_mask[None, :]
    if ACCUMULATE:
        grad_logits += tl.load(grad_in_ptr + tokens[:, None] * stride_it + experts[None, :] * stride_ie, mask=mask,
                               other=0.0).to(tl.float32)
    tl.store(grad_logits_ptr + tokens[:, None] * stride_gt + experts[None, :] * stride_ge,
             grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Routing plan


@triton.jit
def _buckets(ids_ptr, slots, slot_mask, E):
    """Bucket of each slot: its expert, or E for a dropped slot (id outside [0, E))."""
    ids = tl.load(ids_ptr + slots, mask=slot_mask, other=-1)
    return tl.where((ids >= 0) & (ids < E), ids, E)


@triton.jit
def _plan_one_block(buckets, slots, lane_mask, counts_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr, E,
                    BLOCK_B: tl.constexpr):
    """The whole routing plan from one block of lanes, in slot order (lanes that are masked off hold no slot):
    counts [E] and offsets [E+1] of the buckets, each slot's row and each row's slot. Stable: a slot's row is
    its bucket's offset plus the earlier slots of that bucket."""
    bins = tl.arange(0, BLOCK_B)
    one_hot = ((buckets[:, None] == bins[None, :]) & lane_mask[:, None]).to(tl.int32)
    counts = tl.sum(one_hot, axis=0)
    offsets = tl.cumsum(counts, axis=0) - counts
    tl.store(counts_ptr + bins, counts.to(tl.int64), mask=bins < E)
    tl.store(offsets_ptr + bins, offsets.to(tl.int64), mask=bins < E + 1)
    before = tl.cumsum(one_hot, axis=0) - one_hot + offsets[None, :]
    rows = tl.sum(tl.where(one_hot > 0, before, 0), axis=1).to(tl.int64)
    tl.store(slot_rows_ptr + slots, rows, mask=lane_mask)
    tl.store(sorted_slots_ptr + rows, slots, mask=lane_mask)


@triton.jit
def routing_one_block_kernel(ids_ptr, counts_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr, num_slots, E,
                             BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """The whole routing plan in one program when every slot fits one block (decode, small batch):
    the histogram, scan and scatter of the three kernels below without their global round trips.

    Reads ids [R] int64; writes counts [E], offsets [E+1], slot_rows [R], sorted_slots [R]. Grid: (1,).
    """
    slots = tl.arange(0, BLOCK_S).to(tl.int64)
    slot_mask = slots < num_slots
    buckets = _buckets(ids_ptr, slots, slot_mask, E)
    _plan_one_block(buckets, slots, slot_mask, counts_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr, E,
                    BLOCK_E)


@triton.jit
def routing_histogram_kernel(ids_ptr, block_counts_ptr, num_slots, E,
                             SLOTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per slot-block histogram over the E+1 buckets; a block is SLOTS slots (whole tokens: a multiple of K),
    BLOCK_S >= SLOTS lanes.

    Reads ids [R] int64; writes block_counts [num_blocks, E+1] int64. Grid: (num_blocks,).
    """
    block = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_S)
    slots = block * SLOTS + lanes
    slot_mask = (lanes < SLOTS) & (slots < num_slots)
    buckets = _buckets(ids_ptr, slots, slot_mask, E)
    bins = tl.arange(0, BLOCK_E)
    one_hot = (buckets[:, None] == bins[None, :]) & slot_mask[:, None]
    counts = tl.sum(one_hot.to(tl.int64), axis=0)
    tl.store(block_counts_ptr + block * (E + 1) + bins, counts, mask=bins < E + 1)


@triton.jit
def routing_scan_kernel(block_counts_ptr, counts_ptr, offsets_ptr, num_blocks, E,
                        BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """Exclusive scans: block_counts becomes, in place, each block's first rank within its bucket;
    counts [E] = kept rows per expert; offsets [E+1] = exclusive scan of the bucket totals.
    Grid: (1,); it loops over the slot blocks BLOCK_B at a time."""
    bins = tl.arange(0, BLOCK_E)
    bin_mask = bins < E + 1
    carry = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (blocks < num_blocks)[:, None] & bin_mask[None, :]
        ptrs = block_counts_ptr + blocks[:, None] * (E + 1) + bins[None, :]
        block_counts = tl.load(ptrs, mask=mask, other=0).to(tl.int32)  # <= 128 each: a step's sums fit int32
        tl.store(ptrs, carry[None, :] + (tl.cumsum(block_counts, axis=0) - block_counts), mask=mask)
        carry += tl.sum(block_counts, axis=0)
    tl.store(counts_ptr + bins, carry, mask=bins < E)
    tl.store(offsets_ptr + bins, tl.cumsum(carry, axis=0) - carry, mask=bin_mask)


@triton.jit
def routing_scatter_kernel(ids_ptr, block_counts_ptr, counts_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr,
                           num_slots, num_blocks, E, SLOTS: tl.constexpr, BLOCK_S: tl.constexpr,
                           BLOCK_E: tl.constexpr, SCAN: tl.constexpr, BLOCK_NB: tl.constexpr):
    """row(slot) = offsets[bucket] + rank of the block within the bucket + rank within the block
    (slots of the same bucket earlier in the block): a stable sort. Blocks as routing_histogram_kernel's.
    The rank within the block: a cumulative sum over the lanes x buckets one-hot when there are fewer buckets
    (BLOCK_E) than lanes, else a lanes x lanes comparison, whichever tile is smaller.
    block_counts: routing_scan_kernel's block ranks and offsets [E+1] its scan; with SCAN, the histogram itself:
    every program sums the whole [num_blocks, E+1] histogram, BLOCK_NB blocks a step, for the bucket totals and its
    own block's start (no scan launch; the host picks SCAN when the blocks are few), and program 0 writes counts [E]
    and offsets [E+1].
    Writes slot_rows [R] and its inverse sorted_slots [R]. Grid: (num_blocks,)."""
    block = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_S)
    slots = block * SLOTS + lanes
    slot_mask = (lanes < SLOTS) & (slots < num_slots)
    buckets = _buckets(ids_ptr, slots, slot_mask, E)
    if BLOCK_E < BLOCK_S:
        bins = tl.arange(0, BLOCK_E)
        one_hot = ((buckets[:, None] == bins[None, :]) & slot_mask[:, None]).to(tl.int32)
        rank = tl.sum(tl.where(one_hot > 0, tl.cumsum(one_hot, axis=0) - one_hot, 0), axis=1).to(tl.int64)
    else:
        earlier_same = ((buckets[:, None] == buckets[None, :]) & (lanes[None, :] < lanes[:, None])
                        & slot_mask[None, :])
        rank = tl.sum(earlier_same.to(tl.int64), axis=1)
    if SCAN:
        bins = tl.arange(0, BLOCK_E)
        bin_mask = bins < E + 1
        totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
        earlier = tl.zeros((BLOCK_E,), dtype=tl.int32)  # the earlier blocks' slots per bucket
        for first in range(0, num_blocks, BLOCK_NB):
            blocks = first + tl.arange(0, BLOCK_NB)
            counts = tl.load(block_counts_ptr + blocks[:, None] * (E + 1) + bins[None, :],
                             mask=(blocks < num_blocks)[:, None] & bin_mask[None, :], other=0).to(tl.int32)
            totals += tl.sum(counts, axis=0)
            earlier += tl.sum(tl.where(blocks[:, None] < block, counts, 0), axis=0)
        offsets = tl.cumsum(totals, axis=0) - totals
        tl.store(counts_ptr + bins, totals.to(tl.int64), mask=(bins < E) & (block == 0))
        tl.store(offsets_ptr + bins, offsets.to(tl.int64), mask=bin_mask & (block == 0))
        starts = offsets + earlier
        base = tl.sum(tl.where(buckets[:, None] == bins[None, :], starts[None, :], 0), axis=1).to(tl.int64)
    else:
        base = tl.load(offsets_ptr + buckets, mask=slot_mask, other=0)
        base += tl.load(block_counts_ptr + block * (E + 1) + buckets, mask=slot_mask, other=0)
    rows = base + rank
    tl.store(slot_rows_ptr + slots, rows, mask=slot_mask)
    tl.store(sorted_slots_ptr + rows, slots, mask=slot_mask)


# ----------------------------------------------------------------------------------------------
# The router's GEMM with the gating (and, in one program for decode and small batches, the routing plan)


@triton.jit
def _router_logits(x_ptr, router_ptr, tokens, token_mask, experts, expert_mask, D, stride_xt, stride_xd, stride_re,
                   stride_rd, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """The router's GEMM for a block of tokens: x[tokens] @ router^T, [BLOCK_T, BLOCK_E], accumulated in fp32 and
    rounded to x's dtype as the GEMM's output would be. tl.dot when BLOCK_T >= 16, else a broadcast product
    (tl.dot needs 16 rows); BLOCK_E >= 16."""
    ds = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ds[None, :] * stride_xd
    r_ptrs = router_ptr + experts[None, :] * stride_re + ds[:, None] * stride_rd
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, tl.cdiv(D, BLOCK_D)):
        d_mask = ds < D - d0 * BLOCK_D
        a = tl.load(x_ptrs, mask=token_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(r_ptrs, mask=d_mask[:, None] & expert_mask[None, :], other=0.0)
        if BLOCK_T >= 16:
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        x_ptrs += BLOCK_D * stride_xd
        r_ptrs += BLOCK_D * stride_rd
    return acc.to(x_ptr.dtype.element_ty)


@triton.jit
def route_blocks_kernel(
    x_ptr, router_ptr, logits_ptr, weights_ptr, ids_ptr, block_counts_ptr, T, D, E,
    stride_xt, stride_xd, stride_re, stride_rd,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, STORE_LOGITS: tl.constexpr, HISTOGRAM: tl.constexpr,
    ROUTE_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """The router's GEMM and topk_gating_kernel (with its histogram where the plan has several blocks), BLOCK_T
    tokens per program, a whole number of routing blocks of ROUTE_T tokens (at least 16 tokens, for tl.dot): what
    F.linear and ``gate_and_plan``'s gating launch compute, up to the GEMM's summation order
    (route_one_block_kernel below also builds the plan, for few tokens and no logits).

    Reads x [T, D], router [E, D]; writes, with STORE_LOGITS, logits [T, E] (contiguous, x's dtype), and weights
    [T, K] fp32, ids [T, K] int64, with HISTOGRAM block_counts [cdiv(T, ROUTE_T), E+1] int64.
    Grid: (cdiv(T, BLOCK_T),).
    """
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    logits = _router_logits(x_ptr, router_ptr, tokens, token_mask, experts, expert_mask, D, stride_xt, stride_xd,
                            stride_re, stride_rd, BLOCK_T, BLOCK_D, BLOCK_E, DOT_PRECISION, DOT_FP32)
    if STORE_LOGITS:
        tl.store(logits_ptr + tokens[:, None] * E + experts[None, :], logits,
                 mask=token_mask[:, None] & expert_mask[None, :])
    probs = _softmax(logits.to(tl.float32), expert_mask)
    top_w, top_i = _top_k(probs, experts, expert_mask, TOP_K, NORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K)
    _store_gating(weights_ptr, ids_ptr, block_counts_ptr, top_w, top_i, block, tokens, token_mask, T, E, TOP_K,
                  BLOCK_T, BLOCK_K, HISTOGRAM, ROUTE_T, BLOCK_B)


@triton.jit
def route_one_block_kernel(
    x_ptr, router_ptr, weights_ptr, ids_ptr, counts_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr,
    T, D, E, stride_xt, stride_xd, stride_re, stride_rd,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """What the router's GEMM, topk_gating_kernel and routing_one_block_kernel do, in one program, when the
    T tokens' T*K slots fit one block: logits = x @ router^T (fp32 accumulation, rounded to x's dtype as the
    GEMM's output would be), their softmax, top-k and renormalisation, and the routing plan of the ids.

    Reads x [T, D], router [E, D]; writes weights [T, K] fp32, ids [T, K] int64, counts [E], offsets [E+1],
    slot_rows [R], sorted_slots [R]. Grid: (1,). BLOCK_T >= T, BLOCK_K >= K, BLOCK_B > E; tl.dot when
    BLOCK_T >= 16, else a broadcast product (tl.dot needs 16 rows).
    """
    tokens = tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    logits = _router_logits(x_ptr, router_ptr, tokens, token_mask, experts, expert_mask, D, stride_xt, stride_xd,
                            stride_re, stride_rd, BLOCK_T, BLOCK_D, BLOCK_E, DOT_PRECISION, DOT_FP32)
    probs = _softmax(logits.to(tl.float32), expert_mask)
    top_w, top_i = _top_k(probs, experts, expert_mask, TOP_K, NORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    lane_mask = token_mask[:, None] & (ks[None, :] < TOP_K)
    slots = tokens[:, None].to(tl.int64) * TOP_K + ks[None, :]
    tl.store(weights_ptr + slots, top_w, mask=lane_mask)
    tl.store(ids_ptr + slots, top_i, mask=lane_mask)
    # Lanes run token-major, k-minor: slot order, so the plan is the stable sort of the separate kernels.
    _plan_one_block(tl.reshape(top_i, (BLOCK_T * BLOCK_K,)), tl.reshape(slots, (BLOCK_T * BLOCK_K,)),
                    tl.reshape(lane_mask, (BLOCK_T * BLOCK_K,)), counts_ptr, offsets_ptr, sorted_slots_ptr,
                    slot_rows_ptr, E, BLOCK_B)


# ----------------------------------------------------------------------------------------------
# Capacity


@triton.jit
def capacity_kernel(ids_ptr, slot_rows_ptr, offsets_ptr, kept_ptr, num_slots, T, E, capacity,
                    TOP_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """GShard's capacity drop from the routing plan of the ids in priority order (position p = k * T + t: every
    token's first choice, then every second choice): an assignment keeps its id while its row within its expert,
    counted in that order, is below ``capacity``; otherwise, and for ids outside [0, E), it becomes E (dropped).

    Reads ids [R] int64 (priority order), slot_rows [R], offsets [E+1]; writes kept [T, K] int64.
    Grid: (cdiv(R, BLOCK_S),)."""
    positions = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = positions < num_slots
    ids = tl.load(ids_ptr + positions, mask=mask, other=-1)
    valid = (ids >= 0) & (ids < E)
    rows = tl.load(slot_rows_ptr + positions, mask=mask, other=0)
    starts = tl.load(offsets_ptr + tl.where(valid, ids, 0), mask=mask, other=0)
    kept = tl.where(valid & (rows - starts < capacity), ids, E)
    tokens = positions % T
    tl.store(kept_ptr + tokens * TOP_K + positions // T, kept, mask=mask)
