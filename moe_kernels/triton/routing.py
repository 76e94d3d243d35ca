"""Triton routing: the routing plan (a stable counting sort of the T*K assignments by expert) and the
expert load (its histogram alone), on device.

T tokens, K top_k, E experts, R = T*K slots. Kernels in routing_kernels.py; no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_kernels.contract import check_expert_load_args
from moe_kernels.routing import RoutingPlan
from moe_kernels.triton import runtime
from moe_kernels.triton.runtime import cdiv, check_device, device_guard, eager, next_power_of_2

# Routing metadata: a histogram/scatter program holds ROUTING_TILE (slot, bucket) pairs, at most
# ROUTING_MAX_SLOTS slots; the scan walks ROUTING_TILE (block, bucket) counts per step.
ROUTING_TILE = 8192
ROUTING_MAX_SLOTS = 128


def routing_plan(top_k_idx: Tensor, num_experts: int) -> RoutingPlan:
    """Stable counting sort of the T*K assignments by expert, on device (no sync; one launch when the
    slots fit one block, else three).

    top_k_idx: [T, K] int (ids outside [0, E) dropped) -> RoutingPlan with int64 tensors, equal to
    moe_kernels.routing.build_routing_plan's.
    """
    interpret = check_device(top_k_idx)
    if top_k_idx.dim() != 2:
        raise ValueError(f"top_k_idx must be [T, K], got shape {tuple(top_k_idx.shape)}")
    with device_guard(top_k_idx):
        return routing_plan_from_ids(top_k_idx.reshape(-1).to(torch.int64).contiguous(), num_experts,
                             top_k_idx.shape[1], interpret)


def routing_blocks(num_slots: int, num_experts: int) -> tuple[int, int, int]:
    """(slots per block, bucket tile, number of blocks) of the routing kernels."""
    block_e = next_power_of_2(num_experts + 1)
    block_s = max(16, min(ROUTING_MAX_SLOTS, ROUTING_TILE // block_e))
    return block_s, block_e, cdiv(num_slots, block_s)


@runtime.shape_cache
def _histogram_launch(num_slots: int, num_experts: int) -> runtime.Launch:
    """Per slot-block counts over the E experts and a dropped bucket: [blocks, E + 1]."""
    block_s, block_e, num_blocks = routing_blocks(num_slots, num_experts)
    return runtime.Launch("routing_histogram_kernel", (num_blocks,), (num_slots, num_experts),
                          dict(BLOCK_S=block_s, BLOCK_E=block_e))


@runtime.shape_cache
def _routing_launches(num_slots: int, num_experts: int) -> tuple[runtime.Launch, ...]:
    """One launch when the slots fit one block (decode, small batch), else histogram, scan, scatter."""
    block_s, block_e, num_blocks = routing_blocks(num_slots, num_experts)
    if num_blocks == 1:
        return (runtime.Launch("routing_one_block_kernel", (1,), (num_slots, num_experts),
                               dict(BLOCK_S=block_s, BLOCK_E=block_e)),)
    return (_histogram_launch(num_slots, num_experts),
            runtime.Launch("routing_scan_kernel", (1,), (num_blocks, num_experts),
                           dict(BLOCK_B=max(1, ROUTING_TILE // block_e), BLOCK_E=block_e)),
            runtime.Launch("routing_scatter_kernel", (num_blocks,), (num_slots, num_experts), dict(BLOCK_S=block_s)))


def routing_plan_from_ids(ids: Tensor, num_experts: int, top_k: int, interpret: bool) -> RoutingPlan:
    num_slots = ids.numel()
    device = ids.device
    sorted_slots = torch.empty(num_slots, dtype=torch.int64, device=device)
    slot_rows = torch.empty(num_slots, dtype=torch.int64, device=device)
    if num_slots == 0:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)  # the scan writes both
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    launches = _routing_launches(num_slots, num_experts)
    if len(launches) == 1:
        runtime.launch(launches[0], interpret, ids, counts, offsets, sorted_slots, slot_rows)
        return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)
    histogram, scan, scatter = launches
    # one row of per-expert counts per histogram program
    block_counts = torch.empty(histogram.grid[0], num_experts + 1, dtype=torch.int64, device=device)
    runtime.launch(histogram, interpret, ids, block_counts)
    runtime.launch(scan, interpret, block_counts, counts, offsets)
    runtime.launch(scatter, interpret, ids, block_counts, offsets, sorted_slots, slot_rows)
    return RoutingPlan(counts, offsets, sorted_slots, slot_rows, top_k)


def _expert_load(top_k_idx: Tensor, num_experts: int) -> Tensor:
    """The launcher of ``expert_load``, arguments already checked: the routing's histogram kernel (ids
    outside [0, E) land in the dropped bucket), then the sum over slot blocks when there are several."""
    interpret = check_device(top_k_idx)
    ids = top_k_idx.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() == 0:
        return torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    launch = _histogram_launch(ids.numel(), num_experts)
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
