"""Triton routing: the routing plan (a stable counting sort of the T*K assignments by expert), the
expert load (its histogram alone), the router's GEMM and gating in one launch that also counts the routing blocks
for the plan (``route_blocks``), and, for decode and small batches, the router's GEMM, gating and plan in one
launch (``route_one_block``); all on device.

T tokens, D features, K top_k, E experts, R = T*K slots. Kernels in router_kernels.py; no host sync.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from moe_kernels.contract import check_expert_load_args
from moe_kernels.routing import RoutingPlan
from moe_kernels.triton import runtime
from moe_kernels.triton.gating import _topk_gating
from moe_kernels.triton.runtime import cdiv, check_device, device_guard, dot_options, eager, next_power_of_2

# Routing metadata: a histogram/scatter program holds ROUTING_TILE (slot, bucket) pairs, at most
# ROUTING_MAX_SLOTS slots; the scan walks SCAN_TILE (block, bucket) counts per step (over 8 warps: 16 a thread, no
# spills on sm_90, where 8192 int64 counts over 4 warps spilled 7 KB).
ROUTING_TILE = 8192
SCAN_TILE = 4096
ROUTING_MAX_SLOTS = 128
# A whole plan in one program (routing_one_block_kernel, route_one_block_kernel): at most ROUTING_MAX_SLOTS padded
# slot lanes, times the E + 1 buckets (padded) at most ROUTE_TILE (T = 16, K = 8, E = 64 fits: the small batch).
ROUTE_TILE = 16384
# The scatter scans the per-block counts itself (no scan launch) while the [blocks, E + 1] histogram (buckets padded)
# holds at most this many counts: each of its programs sums all of it, SCAN_TILE counts a step, as many dependent
# steps as the scan kernel takes (8 at the limit), from L2.
SCAN_IN_SCATTER_TILE = 32768


def fits_one_program(lanes: int, buckets: int) -> bool:
    """Whether a plan of ``lanes`` padded slots over ``buckets`` padded buckets is built by one program."""
    return lanes <= ROUTING_MAX_SLOTS and lanes * buckets <= ROUTE_TILE


def routing_plan(top_k_idx: Tensor, num_experts: int) -> RoutingPlan:
    """Stable counting sort of the T*K assignments by expert, on device (no sync; one launch when the
    slots fit one block, else two or three).

    top_k_idx: [T, K] int (ids outside [0, E) dropped) -> RoutingPlan with int64 tensors, equal to
    moe_kernels.routing.build_routing_plan's.
    """
    interpret = check_device(top_k_idx)
    if top_k_idx.dim() != 2:
        raise ValueError(f"top_k_idx must be [T, K], got shape {tuple(top_k_idx.shape)}")
    with device_guard(top_k_idx):
        return routing_plan_from_ids(runtime.flat(top_k_idx, torch.int64), num_experts, top_k_idx.shape[1], interpret)


class RoutingBlocks(NamedTuple):
    """How the routing kernels split the R = T*K slots: blocks of whole tokens (so that the gating kernel's
    programs can count their own block), ``tokens`` a power of two; ``lanes`` = tokens * next_pow2(K) >= slots."""

    tokens: int
    slots: int
    lanes: int
    buckets: int  # the E + 1 buckets, rounded up to a power of two
    count: int


def routing_blocks(num_slots: int, num_experts: int, top_k: int) -> RoutingBlocks:
    block_e = next_power_of_2(num_experts + 1)
    block_s = max(16, min(ROUTING_MAX_SLOTS, ROUTING_TILE // block_e))
    tokens = max(1, block_s // next_power_of_2(top_k))
    return RoutingBlocks(tokens, tokens * top_k, tokens * next_power_of_2(top_k), block_e,
                         cdiv(num_slots, tokens * top_k))


@runtime.shape_cache
def _histogram_launch(num_slots: int, num_experts: int, top_k: int) -> runtime.Launch:
    """Per slot-block counts over the E experts and a dropped bucket: [blocks, E + 1]."""
    blocks = routing_blocks(num_slots, num_experts, top_k)
    return runtime.Launch("routing_histogram_kernel", (blocks.count,), (num_slots, num_experts),
                          dict(SLOTS=blocks.slots, BLOCK_S=blocks.lanes, BLOCK_E=blocks.buckets))


class RoutingLaunches(NamedTuple):
    """How a plan is built: ``one_block`` alone, or ``histogram`` (unless the gating kernel counted the blocks),
    ``scan`` (None where the scatter scans the block counts itself) and ``scatter``."""

    one_block: runtime.Launch | None
    histogram: runtime.Launch | None = None
    scan: runtime.Launch | None = None
    scatter: runtime.Launch | None = None


@runtime.shape_cache
def _routing_launches(num_slots: int, num_experts: int, top_k: int) -> RoutingLaunches:
    """One launch when the slots fit one program (decode, small batch: the one-block plan holds slots x buckets
    as route_one_block_kernel does, e.g. 16 tokens x 8 slots over 64 experts); else histogram and scatter, which
    scans the [blocks, E + 1] counts itself where they fit SCAN_IN_SCATTER_TILE (at top-8 of 64 experts up to 2048
    tokens, at CuMo's top-2 of 4 up to 262144), with a scan kernel between them past that."""
    blocks = routing_blocks(num_slots, num_experts, top_k)
    one_block = max(16, next_power_of_2(num_slots))
    if fits_one_program(one_block, blocks.buckets):
        return RoutingLaunches(runtime.Launch("routing_one_block_kernel", (1,), (num_slots, num_experts),
                                              dict(BLOCK_S=one_block, BLOCK_E=blocks.buckets,
                                                   num_warps=8 if one_block * blocks.buckets > 4096 else 4)))
    scan = blocks.count * blocks.buckets > SCAN_IN_SCATTER_TILE
    scatter = dict(SLOTS=blocks.slots, BLOCK_S=blocks.lanes, BLOCK_E=blocks.buckets, SCAN=not scan,
                   BLOCK_NB=1 if scan else min(max(1, SCAN_TILE // blocks.buckets), next_power_of_2(blocks.count)),
                   num_warps=4 if scan or blocks.lanes * blocks.buckets <= 2048 else 8)  # 8: a [lanes, E+1] gather
    return RoutingLaunches(
        None, _histogram_launch(num_slots, num_experts, top_k),
        runtime.Launch("routing_scan_kernel", (1,), (blocks.count, num_experts),
                       dict(BLOCK_B=max(1, SCAN_TILE // blocks.buckets), BLOCK_E=blocks.buckets, num_warps=8))
        if scan else None,
        runtime.Launch("routing_scatter_kernel", (blocks.count,), (num_slots, blocks.count, num_experts), scatter))


@contextmanager
def scan_in_scatter_tile(tile: int) -> Iterator[None]:
    """Within the block, SCAN_IN_SCATTER_TILE is ``tile`` (0: every plan past one block takes the scan kernel, as
    past 2048 tokens at top-8 of 64 experts; for tests and the compile check); launches built under either value
    are dropped on the way in and out."""
    global SCAN_IN_SCATTER_TILE
    saved, SCAN_IN_SCATTER_TILE = SCAN_IN_SCATTER_TILE, tile
    runtime.clear_shape_caches()
    try:
        yield
    finally:
        SCAN_IN_SCATTER_TILE = saved
        runtime.clear_shape_caches()


def routing_plan_from_ids(ids: Tensor, num_experts: int, top_k: int, interpret: bool,
                          block_counts: Tensor | None = None) -> RoutingPlan:
    """The plan of flat ids [R] int64; ``block_counts``: the routing blocks' histogram when the gating kernel
    counted it already (``gate_and_plan``), else counted here."""
    num_slots = ids.numel()
    device = ids.device
    sorted_slots = torch.empty(num_slots, dtype=torch.int64, device=device)
    slot_rows = torch.empty(num_slots, dtype=torch.int64, device=device)
    if num_slots == 0:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)  # the scan (or scatter) writes both
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    launches = _routing_launches(num_slots, num_experts, top_k)
    if launches.one_block is not None:
        runtime.launch(launches.one_block, interpret, ids, counts, offsets, sorted_slots, slot_rows)
        return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)
    if block_counts is None:  # one row of per-expert counts per histogram program
        block_counts = torch.empty(launches.histogram.grid[0], num_experts + 1, dtype=torch.int64, device=device)
        runtime.launch(launches.histogram, interpret, ids, block_counts)
    if launches.scan is not None:
        runtime.launch(launches.scan, interpret, block_counts, counts, offsets)
    runtime.launch(launches.scatter, interpret, ids, block_counts, counts, offsets, sorted_slots, slot_rows)
    return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)


# The router's GEMM runs inside the gating kernel (route_blocks) while the programs' re-reads of the router weight
# (one per 16 tokens or routing block, whichever is more) sum to at most ROUTER_REREAD_BYTES: up to 4096 tokens at
# D = 1024 and 64 experts (256 programs, 32 MB) and any CuMo batch; past that (T = 16384 at D = 2048 over 128
# experts: 512 MB of re-reads) cuBLAS computes the logits.
ROUTER_REREAD_BYTES = 32 << 20


@runtime.shape_cache
def _route_blocks_launch(num_tokens: int, d_in: int, num_experts: int, strides: tuple, top_k: int, normalize: bool,
                         store_logits: bool, dtype: torch.dtype, interpret: bool,
                         allow_tf32: bool) -> runtime.Launch | None:
    """route_blocks_kernel's launch: a whole number of routing blocks, at least 16 tokens (tl.dot's rows), per
    program; None past ROUTER_REREAD_BYTES or where the program's histogram would hold more than ROUTE_TILE
    counts."""
    blocks = routing_blocks(num_tokens * top_k, num_experts, top_k)
    block_t = max(16, blocks.tokens)
    programs = cdiv(num_tokens, block_t)
    # The histogram's one-hot: the program's routing blocks x their lanes x the buckets (E = 1000 at top-2: 2 x 16
    # x 1024, past ROUTE_TILE: cuBLAS and topk_gating_kernel, whose programs hold one block).
    one_hot = block_t // blocks.tokens * blocks.lanes * blocks.buckets
    if one_hot > ROUTE_TILE or programs * num_experts * d_in * dtype.itemsize > ROUTER_REREAD_BYTES:
        return None
    histogram = _routing_launches(num_tokens * top_k, num_experts, top_k).one_block is None
    meta = dict(TOP_K=top_k, NORMALIZE=normalize, STORE_LOGITS=store_logits, HISTOGRAM=histogram,
                ROUTE_T=blocks.tokens, BLOCK_T=block_t, BLOCK_K=next_power_of_2(top_k), BLOCK_B=blocks.buckets,
                **_router_gemm_tiles(block_t, num_experts, interpret), **dot_options(dtype, interpret, allow_tf32))
    if not interpret:
        meta["num_warps"] = 8
    return runtime.Launch("route_blocks_kernel", (programs,), (num_tokens, d_in, num_experts, *strides), meta)


def route_blocks(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool, keep_logits: bool,
                 interpret: bool) -> tuple[Tensor | None, Tensor, Tensor, RoutingPlan] | None:
    """The router's GEMM, the gating and its block counts in one launch, then the routing plan: (logits [T, E] in
    x's dtype when ``keep_logits`` else None, top_k_weights [T, K] float32, top_k_idx [T, K] int64, RoutingPlan),
    what F.linear and ``gate_and_plan`` give (up to the GEMM's summation order); None when there are no tokens or
    the GEMM is past the limits above (then F.linear and ``gate_and_plan``). No autograd, arguments checked."""
    num_tokens, d_in = x.shape
    num_experts = router_weight.shape[0]
    if num_tokens == 0:
        return None
    spec = _route_blocks_launch(num_tokens, d_in, num_experts, (*x.stride(), *router_weight.stride()), top_k,
                                normalize, keep_logits, x.dtype, interpret, runtime.allow_tf32())
    if spec is None:
        return None
    device = x.device
    logits = torch.empty(num_tokens, num_experts, dtype=x.dtype, device=device) if keep_logits else None
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    block_counts = (torch.empty(cdiv(num_tokens, spec.constexprs["ROUTE_T"]), num_experts + 1, dtype=torch.int64,
                                device=device) if spec.constexprs["HISTOGRAM"] else None)
    with device_guard(x):
        runtime.launch(spec, interpret, x, router_weight, logits if keep_logits else weights, weights, ids,
                       block_counts if block_counts is not None else ids)
        plan = routing_plan_from_ids(ids.view(-1), num_experts, top_k, interpret, block_counts)
    return logits, weights, ids, plan


def gate_and_plan(logits: Tensor, top_k: int, normalize: bool,
                  interpret: bool) -> tuple[Tensor, Tensor, RoutingPlan]:
    """The gating launcher and the routing plan of its ids: (weights, ids, plan), no autograd (``moe._EagerMoE``
    differentiates the whole MoE MLP). Past one routing block the gating kernel counts each block's ids as it
    writes them, so the plan needs no histogram kernel. Eager calls, arguments already checked."""
    num_tokens, num_experts = logits.shape
    num_slots = num_tokens * top_k
    block_counts, blocks = None, routing_blocks(num_slots, num_experts, top_k)
    if num_slots and _routing_launches(num_slots, num_experts, top_k).one_block is None:
        block_counts = torch.empty(blocks.count, num_experts + 1, dtype=torch.int64, device=logits.device)
    weights, ids = _topk_gating(logits, top_k, normalize, block_counts, blocks.tokens)
    with device_guard(logits):
        plan = routing_plan_from_ids(ids.view(-1), num_experts, top_k, interpret, block_counts)
    return weights, ids, plan


def _router_gemm_tiles(block_t: int, num_experts: int, interpret: bool) -> dict | None:
    """BLOCK_D and BLOCK_E of the router's GEMM in route_one_block_kernel and route_blocks_kernel, a router tile
    of at most ROUTE_TILE weights; None where the broadcast product (under 16 tokens) would hold more than
    ROUTE_TILE values at the smallest BLOCK_D (e.g. 8 tokens over 256 experts): the caller routes another way."""
    block_e = max(16, next_power_of_2(num_experts))  # tl.dot's smallest N
    if block_t < 16 and block_t * 16 * block_e > ROUTE_TILE:
        return None
    if interpret:
        block_d = 16  # small, so that tests cross tile edges
    elif block_t >= 16:
        block_d = max(16, min(128, ROUTE_TILE // block_e))
    else:  # the broadcast product holds BLOCK_T x BLOCK_D x BLOCK_E values: 64 a thread, many loads in flight
        block_d = max(16, min(512, ROUTE_TILE // (block_t * block_e)))
    return dict(BLOCK_D=block_d, BLOCK_E=block_e)


@runtime.shape_cache
def _route_launch(num_tokens: int, d_in: int, num_experts: int, strides: tuple, top_k: int, normalize: bool,
                  dtype: torch.dtype, interpret: bool, allow_tf32: bool) -> runtime.Launch | None:
    """route_one_block_kernel's launch, or None when the slots do not fit one program."""
    block_t, block_k, block_b = next_power_of_2(num_tokens), next_power_of_2(top_k), next_power_of_2(num_experts + 1)
    tiles = _router_gemm_tiles(block_t, num_experts, interpret)
    if not fits_one_program(block_t * block_k, block_b) or tiles is None:
        return None
    meta = dict(TOP_K=top_k, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_B=block_b, **tiles,
                **dot_options(dtype, interpret, allow_tf32))
    if not interpret:
        meta["num_warps"] = 8
    return runtime.Launch("route_one_block_kernel", (1,), (num_tokens, d_in, num_experts, *strides), meta)


def route_one_block(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool,
                    interpret: bool) -> tuple[Tensor, Tensor, RoutingPlan] | None:
    """The router's GEMM (logits = x @ router_weight^T, rounded to x's dtype), topk_gating and the routing plan
    in one launch: (top_k_weights [T, K] float32, top_k_idx [T, K] int64, RoutingPlan), what F.linear,
    ``topk_gating`` and ``routing_plan`` give (up to the GEMM's summation order); None when there are no tokens,
    their T*K slots do not fit one program or the GEMM's tiles would not (then those three run apart). Arguments
    already checked (``ops.moe_mlp``)."""
    num_tokens, d_in = x.shape
    num_experts = router_weight.shape[0]
    if num_tokens == 0:
        return None
    spec = _route_launch(num_tokens, d_in, num_experts, (*x.stride(), *router_weight.stride()), top_k, normalize,
                         x.dtype, interpret, runtime.allow_tf32())
    if spec is None:
        return None
    device, num_slots = x.device, num_tokens * top_k
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)  # the kernel writes all four
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    sorted_slots = torch.empty(num_slots, dtype=torch.int64, device=device)
    slot_rows = torch.empty(num_slots, dtype=torch.int64, device=device)
    runtime.launch(spec, interpret, x, router_weight, weights, ids, counts, offsets, sorted_slots, slot_rows)
    return weights, ids, RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)


@runtime.shape_cache
def _capacity_launch(num_tokens: int, top_k: int, num_experts: int, capacity: int) -> runtime.Launch:
    num_slots = num_tokens * top_k
    block_s = min(1024, next_power_of_2(num_slots))
    return runtime.Launch("capacity_kernel", (cdiv(num_slots, block_s),),
                          (num_slots, num_tokens, num_experts, capacity), dict(TOP_K=top_k, BLOCK_S=block_s))


def capacity_drop(top_k_idx: Tensor, num_experts: int, capacity: int, interpret: bool) -> tuple[Tensor, Tensor]:
    """``moe_kernels.routing.apply_capacity`` on device, and the routing's expert load before the drops:
    (kept [T, K] int64, ids past their expert's capacity set to E; load [E] int64). One routing plan of the ids in
    priority order (k-major: a copy, then one to three kernels) and one kernel; its counts are the load."""
    num_tokens, top_k = top_k_idx.shape
    priority = top_k_idx.t().reshape(-1).to(torch.int64).contiguous()
    kept = torch.empty(num_tokens, top_k, dtype=torch.int64, device=top_k_idx.device)
    with device_guard(top_k_idx):
        plan = routing_plan_from_ids(priority, num_experts, 1, interpret)
        if priority.numel() > 0:
            runtime.launch(_capacity_launch(num_tokens, top_k, num_experts, capacity), interpret, priority,
                           plan.slot_rows, plan.expert_offsets, kept)
    return kept, plan.expert_counts


def _expert_load(top_k_idx: Tensor, num_experts: int) -> Tensor:
    """The launcher of ``expert_load``, arguments already checked: the routing's histogram kernel (ids
    outside [0, E) land in the dropped bucket), then the sum over slot blocks when there are several."""
    interpret = check_device(top_k_idx)
    ids = runtime.flat(top_k_idx, torch.int64)
    if ids.numel() == 0:
        return torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    launch = _histogram_launch(ids.numel(), num_experts, top_k_idx.shape[1])
    block_counts = torch.empty(launch.grid[0], num_experts + 1, dtype=torch.int64, device=ids.device)
    with device_guard(ids):
        runtime.launch(launch, interpret, ids, block_counts)
    if launch.grid[0] == 1:
        return block_counts[0, :num_experts]
    return block_counts[:, :num_experts].sum(dim=0)


@torch.library.custom_op("cumo_triton::expert_load", mutates_args=())
def _expert_load_op(top_k_idx: Tensor, num_experts: int) -> Tensor:
    check_expert_load_args(top_k_idx, num_experts)
    return _expert_load(top_k_idx, num_experts)


@_expert_load_op.register_fake
def _(top_k_idx, num_experts):
    return top_k_idx.new_empty(num_experts, dtype=torch.int64)


def expert_load(top_k_idx: Tensor, num_experts: int) -> Tensor:
    """[E] int64 assignments per expert (contract: ``moe_kernels.ops.expert_load``, checked there); no host
    sync; integer counts, so the same whatever order the blocks are summed in."""
    if eager(top_k_idx):
        return _expert_load(top_k_idx, num_experts)
    return _expert_load_op(top_k_idx, num_experts)
