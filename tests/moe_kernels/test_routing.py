"""Routing plan invariants and capacity dropping (moe_kernels/routing.py)."""

import math

import pytest
import torch

from moe_kernels.routing import apply_capacity, build_routing_plan, expert_capacity
from tests.helpers import routing_indices

PLAN_CASES = [
    (0, 4, 2),  # 0 tokens: empty plan, offsets all zero
    (1, 4, 2),  # 1 token: two experts used, two empty
    (37, 8, 3),  # odd T
    (16, 4, 4),  # top_k == num_experts
    (50, 64, 1),  # many experts, most empty
]


@pytest.mark.parametrize("tokens,experts,top_k", PLAN_CASES)
@pytest.mark.parametrize("routing", ["random", "one_expert", "skip_experts"])
def test_plan_invariants(tokens, experts, top_k, routing):
    idx = routing_indices(tokens, experts, top_k, routing)
    plan = build_routing_plan(idx, experts)
    flat = idx.reshape(-1)
    assert plan.expert_offsets[0] == 0 and plan.expert_offsets[-1] == tokens * top_k
    assert torch.equal(plan.expert_counts, torch.bincount(flat, minlength=experts))
    assert torch.equal(plan.expert_offsets[1:] - plan.expert_offsets[:-1], plan.expert_counts)
    # The inverse order undoes the permutation, both ways.
    assert torch.equal(plan.sorted_slots[plan.slot_rows], torch.arange(tokens * top_k))
    assert torch.equal(plan.slot_rows[plan.sorted_slots], torch.arange(tokens * top_k))
    # Rows are expert-contiguous, and slot order is kept inside each expert (stable).
    sorted_experts = flat[plan.sorted_slots]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    for e in range(experts):
        segment = plan.sorted_slots[plan.expert_offsets[e] : plan.expert_offsets[e + 1]]
        assert torch.all(flat[segment] == e)
        assert torch.all(segment[1:] > segment[:-1])
    assert torch.equal(plan.sorted_tokens, plan.sorted_slots // top_k)


def test_dropped_slots_sort_last():
    experts = 4
    idx = torch.tensor([[0, 4], [3, -1], [4, 0], [2, 1]])  # 4 and -1 are dropped
    plan = build_routing_plan(idx, experts)
    assert plan.expert_counts.tolist() == [2, 1, 1, 1]
    kept = int(plan.expert_offsets[-1])
    assert kept == 5
    assert sorted(plan.sorted_slots[kept:].tolist()) == [1, 3, 4]
    assert plan.sorted_slots[:kept].tolist() == [0, 5, 7, 6, 2]


def test_plan_rejects_non_2d():
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        build_routing_plan(torch.zeros(3, dtype=torch.int64), 4)


@pytest.mark.parametrize("factor,tokens,top_k,experts,expected", [(1.0, 10, 2, 4, 5), (1.25, 7, 2, 4, 5), (0.1, 3, 1, 8, 1)])
def test_expert_capacity_formula(factor, tokens, top_k, experts, expected):
    assert expert_capacity(factor, tokens, top_k, experts) == expected == math.ceil(factor * tokens * top_k / experts)


def test_capacity_gshard_priority():
    # Expert 0 is every token's choice; capacity 2: the two first-choice assignments of tokens 0, 1
    # are kept; token 2's first choice is dropped; second choices fill other experts.
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    dropped = apply_capacity(idx, num_experts=4, capacity=2)
    assert dropped.tolist() == [[0, 1], [0, 2], [4, 3], [1, 4]]


@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
def test_capacity_bounds_load(capacity):
    idx = routing_indices(40, 6, 2, "one_expert")
    out = apply_capacity(idx, 6, capacity)
    counts = torch.bincount(out.reshape(-1), minlength=7)[:6]
    assert int(counts.max()) <= capacity
    # Only overflow is dropped: each expert keeps min(capacity, demand).
    demand = torch.bincount(idx.reshape(-1), minlength=6)
    assert torch.equal(counts, demand.clamp(max=capacity))
    kept = out < 6
    assert torch.equal(out[kept], idx[kept])


@pytest.mark.parametrize("tokens,experts,top_k", [(0, 4, 2), (1, 4, 2), (37, 8, 3), (16, 4, 4), (300, 64, 8)])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
@pytest.mark.parametrize("capacity", [0, 1, 5, 1000])
def test_triton_capacity_drop_equals_apply_capacity(tokens, experts, top_k, routing, capacity, monkeypatch):
    """The Triton capacity drop (a plan of the ids in priority order, then capacity_kernel) against the reference,
    with ids already dropped in the input (expert-parallel sentinels), strided ids, one routing block and several;
    the load it returns is the routing's before the drops."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moe_kernels.triton import LAUNCHES, reset_launch_counts
    from moe_kernels.triton.routing import capacity_drop

    idx = routing_indices(tokens, experts, top_k, routing)
    idx[::3, -1] = experts  # dropped before (an expert-parallel sentinel): stays dropped, takes no capacity
    idx = idx.t().contiguous().t()  # column-major: strided ids
    reset_launch_counts()
    kept, load = capacity_drop(idx, experts, capacity, interpret=True)
    assert torch.equal(kept, apply_capacity(idx, experts, capacity))
    assert load.tolist() == torch.bincount(idx[idx < experts], minlength=experts).tolist()
    assert LAUNCHES["capacity_kernel"] == (1 if tokens else 0)
