"""Triton kernels of the routing plan: a stable counting sort of the T*K slots by expert (one block
when they fit, else histogram, scan and scatter). Launched by moe_kernels/triton/routing.py.

A *slot* is ``t * K + k``; a *row* is a position in expert-sorted order (see moe_kernels.routing):
expert e owns rows ``[offsets[e], offsets[e+1])``, dropped slots (ids outside [0, E)) sit in
``[offsets[E], R)``.
"""

import triton
import triton.language as tl


@triton.jit
def _buckets(ids_ptr, slots, slot_mask, E):
    """Bucket of each slot: its expert, or E for a dropped slot (id outside [0, E))."""
    ids = tl.load(ids_ptr + slots, mask=slot_mask, other=-1)
    return tl.where((ids >= 0) & (ids < E), ids, E)


@triton.jit
def routing_one_block_kernel(ids_ptr, counts_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr, num_slots, E,
                             BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """The whole routing plan in one program when every slot fits one block (decode, small batch):
    the histogram, scan and scatter of the three kernels below without their global round trips.

    Reads ids [R] int64; writes counts [E], offsets [E+1], slot_rows [R], sorted_slots [R]. Grid: (1,).
    """
    lanes = tl.arange(0, BLOCK_S)
    slot_mask = lanes < num_slots
    buckets = _buckets(ids_ptr, lanes, slot_mask, E)
    bins = tl.arange(0, BLOCK_E)
    one_hot = (buckets[:, None] == bins[None, :]) & slot_mask[:, None]
    counts = tl.sum(one_hot.to(tl.int64), axis=0)
    offsets = tl.cumsum(counts, axis=0) - counts
    tl.store(counts_ptr + bins, counts, mask=bins < E)
    tl.store(offsets_ptr + bins, offsets, mask=bins < E + 1)
    # Stable: a slot's rank in its bucket counts the earlier slots of the same bucket.
    earlier_same = (buckets[:, None] == buckets[None, :]) & (lanes[None, :] < lanes[:, None])
    rows = tl.sum(tl.where(one_hot, offsets[None, :], 0), axis=1) + tl.sum(earlier_same.to(tl.int64), axis=1)
    tl.store(slot_rows_ptr + lanes, rows, mask=slot_mask)
    tl.store(sorted_slots_ptr + rows, lanes.to(tl.int64), mask=slot_mask)


@triton.jit
def routing_histogram_kernel(ids_ptr, block_counts_ptr, num_slots, E,
                             BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per slot-block histogram over the E+1 buckets.

    Reads ids [R] int64; writes block_counts [num_blocks, E+1] int64. Grid: (num_blocks,).
    """
    block = tl.program_id(0).to(tl.int64)
    slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_mask = slots < num_slots
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
        block_counts = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, carry[None, :] + tl.cumsum(block_counts, axis=0) - block_counts, mask=mask)
        carry += tl.sum(block_counts, axis=0)
    tl.store(counts_ptr + bins, carry, mask=bins < E)
    tl.store(offsets_ptr + bins, tl.cumsum(carry, axis=0) - carry, mask=bin_mask)


@triton.jit
def routing_scatter_kernel(ids_ptr, block_bases_ptr, offsets_ptr, sorted_slots_ptr, slot_rows_ptr,
                           num_slots, E, BLOCK_S: tl.constexpr):
    """row(slot) = offsets[bucket] + rank of the block within the bucket + rank within the block
    (slots of the same bucket earlier in the block): a stable sort. Writes slot_rows [R] and its
    inverse sorted_slots [R]. Grid: (num_blocks,)."""
    block = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_S)
    slots = block * BLOCK_S + lanes
    slot_mask = slots < num_slots
    buckets = _buckets(ids_ptr, slots, slot_mask, E)
    earlier_same = (buckets[:, None] == buckets[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier_same.to(tl.int64), axis=1)
    base = tl.load(offsets_ptr + buckets, mask=slot_mask, other=0)
    base += tl.load(block_bases_ptr + block * (E + 1) + buckets, mask=slot_mask, other=0)
    rows = base + rank
    tl.store(slot_rows_ptr + slots, rows, mask=slot_mask)
    tl.store(sorted_slots_ptr + rows, slots, mask=slot_mask)
