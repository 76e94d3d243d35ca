"""Expert parallelism (cumo_layers/parallel.py) against one process holding every expert and every token.

Each launch is a real gloo world on 127.0.0.1 (tests/cumo_layers/expert_parallel_worker.py): one of 2
processes and one of 4, each running many cases, so the file costs two process launches. A launch is
bounded in time (its workers are killed past it) and every worker destroys its process group on exit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from tests.cumo_layers.expert_parallel_worker import CORRECTNESS_CASES, launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

LAUNCH_TIMEOUT_S = 90
FP64_TOLERANCE = 1e-9
SUITES = {2: ["correctness", "data_parallel"], 4: ["correctness", "checkpoint"]}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """world size -> per-rank results, each world launched once, on first use."""
    cache: dict[int, list[dict]] = {}

    def results(world_size: int) -> list[dict]:
        if world_size not in cache:
            out_dir = tmp_path_factory.mktemp(f"world{world_size}")
            cache[world_size] = launch(SUITES[world_size], world_size, out_dir, LAUNCH_TIMEOUT_S)
        return cache[world_size]

    return results


def case_results(worlds, world_size: int, case: str) -> dict[str, float]:
    """The case's metrics, worst over ranks (every rank checks its own tokens and experts)."""
    per_rank = worlds(world_size)
    assert all(case in r for r in per_rank), f"{case} missing: {[sorted(r) for r in per_rank]}"
    return {key: max(r[case][key] for r in per_rank) for key in per_rank[0][case]}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", sorted(CORRECTNESS_CASES))
def test_matches_single_process(worlds, world_size, case):
    got = case_results(worlds, world_size, case)
    compared = [k for k in got if k in ("output", "eval_output") or k.startswith(("grad_", "last_"))]
    assert {"output", "grad_x", "grad_router", "grad_w1", "grad_w2", "last_balance_loss", "last_z_loss"} <= set(
        compared)
    for key in compared:
        assert got[key] <= FP64_TOLERANCE, f"{case} on {world_size} ranks: {key} relative error {got[key]:.3g}"
    assert got["expert_load"] == 0, "the global expert load differs from the single-process one"
    assert got["eval_aux_is_none"] == 1
    # The edges the case claims to cover really happen in the single-process run.
    capacity = CORRECTNESS_CASES[case].get("capacity_factor") is not None
    assert (got["dropped_assignments"] > 0) == capacity
    if case == "experts_without_tokens":
        assert got["experts_without_tokens"] >= 3
    if case == "all_tokens_one_expert":
        assert got["experts_without_tokens"] == CORRECTNESS_CASES[case]["experts"] - 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_indivisible_experts_raise(worlds, world_size):
    assert case_results(worlds, world_size, "indivisible_experts")["raised"] == 1


@pytest.mark.parametrize("case", ["four_into_two", "two_into_four"])
def test_checkpoint_reslices_to_another_world_size(worlds, case):
    got = case_results(worlds, 4, case)
    assert got["error_before_load"] > 0.1  # the loading layer started from other weights
    assert got["error"] == 0


def test_checkpoint_rebuilds_single_process_layer(worlds):
    got = case_results(worlds, 4, "rebuilt_single_process")
    assert got["params"] == 0 and got["output"] == 0 and got["same_config"] == 1


@pytest.mark.parametrize("case", ["different_layer", "missing_slice", "not_a_group_member", "settings_differ"])
def test_mismatch_or_non_member_raises(worlds, case):
    assert case_results(worlds, 4, case)["raised"] == 1


def test_data_parallel_training_matches_single_process(worlds):
    got = case_results(worlds, 2, "training_loop")
    assert got["steps"] == 6 and got["loss_moved"] > 1e-3  # the loop trained
    assert got["loss_curve"] <= FP64_TOLERANCE, f"loss curve relative error {got['loss_curve']:.3g}"
    assert got["params"] <= FP64_TOLERANCE, f"parameters after training: relative error {got['params']:.3g}"


def host_syncs(layer, x) -> int:
    """Synchronising CUDA calls (as torch.cuda's sync debug mode reports them) in one forward of ``layer``."""
    layer(x)  # warm-up: first calls may compile or allocate
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_factor", [None, 0.5])  # dropless; capacity dropping
def test_one_rank_nccl_on_gpu(capacity_factor):
    """In a one-rank NCCL world on a GPU: the plain layer's function and gradients, and exactly one host
    synchronisation more than the plain layer per training forward (the count exchange)."""
    from cumo_layers import SparseMoEMLP
    from cumo_layers.parallel import expert_parallel
    from tests.helpers import assert_close

    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        moe = SparseMoEMLP(64, 48, 40, num_experts=8, top_k=2, glu=True, activation="silu",
                           capacity_factor=capacity_factor, balance_loss_coef=0.3, z_loss_coef=0.05, device="cuda")
        layer = expert_parallel(moe)
        x = torch.randn(3, 37, 64, device="cuda")
        probe = torch.randn(3, 37, 40, device="cuda")
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        ((moe(x_ref) * probe).sum() + moe.last_aux_loss).backward()
        y = layer(x_ep)
        ((y * probe).sum() + layer.last_aux_loss).backward()
        assert_close(y, moe(x), torch.float32, "output")
        assert_close(x_ep.grad, x_ref.grad, torch.float32, "grad x")
        for name, param in layer.named_parameters():
            assert_close(param.grad, moe.get_parameter(name).grad, torch.float32, f"grad {name}")
        assert host_syncs(layer, x) == host_syncs(moe, x) + 1
    finally:
        dist.destroy_process_group()
