"""Worker processes for tests/cumo_layers/test_parallel.py: a local gloo world on 127.0.0.1.

``launch(suite, world_size, ...)`` (run by pytest) hosts the rendezvous store on a port the OS picks (no
race for a free port), starts ``world_size`` copies of this module, kills them all if the time runs out,
and returns each rank's results. A worker (``python -m tests.cumo_layers.expert_parallel_worker``) joins
the group, runs every case of its suite, records per-case errors (relative, against one process holding
all experts and all tokens) or the traceback, and destroys its process group however it exits.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
COLLECTIVE_TIMEOUT_S = 45

# One correctness case per edge; tokens[W] is the tokens each rank holds (W = 2 or 4). Backend "torch" (the
# reference ops) unless a case names "auto" (the compiled CPU kernels where built), in the layer and its reference.
CORRECTNESS_CASES: dict[str, dict[str, Any]] = {
    # uneven token counts per rank, gelu, biases, the compiled kernels
    "uneven_tokens": dict(experts=8, top_k=2, tokens={2: [13, 6], 4: [9, 2, 14, 5]}, backend="auto"),
    # a rank with 0 tokens (sends nothing, still receives and computes), GLU, no biases, the compiled kernels
    "rank_without_tokens": dict(experts=8, top_k=2, tokens={2: [0, 11], 4: [7, 0, 12, 3]},
                                glu=True, bias=False, activation="silu", backend="auto"),
    # experts with 0 tokens: all of rank 1's experts and one more are never chosen
    "experts_without_tokens": dict(experts=8, top_k=2, tokens={2: [10, 9], 4: [6, 8, 5, 7]},
                                   routing="dead_experts"),
    # all tokens on one expert (the last rank's last expert), top-1
    "all_tokens_one_expert": dict(experts=8, top_k=1, tokens={2: [7, 12], 4: [5, 9, 0, 6]},
                                  routing="one_expert"),
    # top_k == num_experts: every expert sees every token
    "top_k_equals_experts": dict(experts=4, top_k=4, tokens={2: [6, 9], 4: [4, 7, 1, 5]}),
    # capacity dropping with a skewed router (every first choice on one expert), a rank with 0 tokens
    "capacity_drops_skewed": dict(experts=8, top_k=2, tokens={2: [14, 0], 4: [5, 0, 17, 8]},
                                  routing="one_expert", capacity_factor=1.0),
    # capacity dropping with a random router
    "capacity_drops_random": dict(experts=8, top_k=2, tokens={2: [21, 10], 4: [11, 3, 9, 14]},
                                  capacity_factor=0.5, activation="quick_gelu"),
    # CuMo's per-sample balance loss: [B, N, D] inputs, `tokens` counts samples of 5 tokens; a rank without any
    "cumo_balance_per_sample": dict(experts=8, top_k=2, tokens={2: [3, 1], 4: [2, 0, 3, 1]}, sample_tokens=5,
                                    balance_loss="cumo"),
}
IN_FEATURES, HIDDEN, OUT_FEATURES = 12, 10, 7


def build_moe(case: dict[str, Any], seed: int):
    """The single-process layer of a case: fp64, distinct random experts, the router skewed as asked."""
    from cumo_layers import SparseMoEMLP

    torch.manual_seed(seed)
    moe = SparseMoEMLP(
        IN_FEATURES, HIDDEN, OUT_FEATURES, num_experts=case["experts"], top_k=case["top_k"],
        activation=case.get("activation", "gelu"), glu=case.get("glu", False), bias=case.get("bias", True),
        capacity_factor=case.get("capacity_factor"), balance_loss_coef=0.3, z_loss_coef=0.05, dtype=torch.float64,
        balance_loss=case.get("balance_loss", "switch"),
        backend=case.get("backend", "torch"),
    )
    with torch.no_grad():  # feature 0 of every input is a constant 3.0 that steers these experts
        if case.get("routing") == "dead_experts":
            moe.router.weight[[2, 3, 6][: max(0, case["experts"] - case["top_k"])], 0] = -50.0
        if case.get("routing") == "one_expert":
            moe.router.weight[case["experts"] - 1, 0] = 2.0
    return moe


def global_inputs(case: dict[str, Any], world_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(x [T_global, in] (or [B_global, N, in]), output weights [..., out], rank offsets [W+1] along dim 0),
    identical on every rank."""
    counts = case["tokens"][world_size]
    generator = torch.Generator().manual_seed(seed)
    total = sum(counts)
    leading = (total, case["sample_tokens"]) if "sample_tokens" in case else (total,)
    x = torch.randn(*leading, IN_FEATURES, dtype=torch.float64, generator=generator)
    x[..., 0] = 3.0
    probe = torch.randn(*leading, OUT_FEATURES, dtype=torch.float64, generator=generator)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return x, probe, offsets


def check_against_single_process(case: dict[str, Any], group=None) -> dict[str, float]:
    """Forward, aux losses and every gradient of the expert-parallel layer against the single-process one."""
    from cumo_layers.parallel import expert_parallel, sum_replicated_gradients
    from tests.helpers import rel_err

    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    moe = build_moe(case, seed=1234)
    x, probe, offsets = global_inputs(case, world_size, seed=99)
    reference = copy.deepcopy(moe)
    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref)
    ((y_ref * probe).sum() + reference.last_aux_loss).backward()

    layer = expert_parallel(moe, group)
    mine = slice(offsets[rank], offsets[rank + 1])
    x_local = x[mine].clone().requires_grad_()
    y_local = layer(x_local)
    ((y_local * probe[mine]).sum() + layer.last_aux_loss).backward()
    sum_replicated_gradients(layer, group)

    experts = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
    errors = {"output": rel_err(y_local, y_ref[mine]), "grad_x": rel_err(x_local.grad, x_ref.grad[mine]),
              "grad_router": rel_err(layer.router.weight.grad, reference.router.weight.grad)}
    for name in ("w1", "b1", "w2", "b2"):
        if getattr(reference, name) is not None:
            errors[f"grad_{name}"] = rel_err(getattr(layer, name).grad, getattr(reference, name).grad[experts])
    router, ref_router = layer.router, reference.router
    for name in ("last_balance_loss", "last_z_loss", "last_aux_loss"):
        share = getattr(router, name).detach().clone()
        dist.all_reduce(share, group=group)
        errors[name] = rel_err(share, getattr(ref_router, name))
    errors["expert_load"] = float((layer.last_expert_load - reference.last_expert_load).abs().max())
    errors["dropped_assignments"] = float(x[..., 0].numel() * moe.top_k - reference.last_expert_load.sum())
    errors["experts_without_tokens"] = float((reference.last_expert_load == 0).sum())
    layer.eval()  # an eval forward: same output, no aux losses
    errors["eval_output"] = rel_err(layer(x[mine]), y_ref[mine])
    errors["eval_aux_is_none"] = float(layer.last_aux_loss is None)
    return errors


def suite_correctness() -> dict[str, dict[str, float]]:
    """Every correctness case in the world, then E not divisible by the group size."""
    from cumo_layers.parallel import expert_parallel

    results = {name: check_against_single_process(case) for name, case in CORRECTNESS_CASES.items()}
    bad = build_moe(dict(experts=dist.get_world_size() + 1, top_k=1), seed=0)
    try:
        expert_parallel(bad)
        results["indivisible_experts"] = {"raised": 0.0}
    except ValueError as exc:
        results["indivisible_experts"] = {"raised": float("divisible" in str(exc))}
    return results


def subgroups_of_two() -> tuple[list[Any], int]:
    """Split the world into groups of two consecutive ranks (every rank creates every group, in order);
    returns them all and the index of this rank's."""
    groups = [dist.new_group([r, r + 1]) for r in range(0, dist.get_world_size(), 2)]
    return groups, dist.get_rank() // 2


def suite_checkpoint(directory: str) -> dict[str, dict[str, float]]:
    """Save slices from 4 ranks and from 2, load each into the other world size, rebuild a single layer."""
    from cumo_layers.checkpoint import CheckpointError
    from cumo_layers.parallel import expert_parallel, load_expert_slice, load_sparse_moe, save_expert_slice

    case = dict(experts=8, top_k=2, glu=True)
    saved = build_moe(case, seed=5)
    pairs, pair_index = subgroups_of_two()
    pair = pairs[pair_index]
    root = Path(directory)
    save_expert_slice(expert_parallel(saved), root / "from4")
    save_expert_slice(expert_parallel(saved, pair), root / f"from2_{pair_index}")
    dist.barrier()

    def loaded_error(layer) -> float:
        experts = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
        pairs = [(getattr(layer, n), getattr(saved, n)[experts]) for n in ("w1", "b1", "w2", "b2")]
        pairs.append((layer.router.weight, saved.router.weight))
        return max(float((a - b).detach().abs().max()) for a, b in pairs)

    results: dict[str, dict[str, float]] = {}
    into_two = expert_parallel(build_moe(case, seed=6), pair)
    before = loaded_error(into_two)
    load_expert_slice(into_two, root / "from4")
    results["four_into_two"] = {"error": loaded_error(into_two), "error_before_load": before}
    into_four = expert_parallel(build_moe(case, seed=7))
    before = loaded_error(into_four)
    load_expert_slice(into_four, root / f"from2_{1 - pair_index}")
    results["two_into_four"] = {"error": loaded_error(into_four), "error_before_load": before}

    rebuilt = load_sparse_moe(root / "from4", backend="torch")
    x = torch.randn(9, IN_FEATURES, dtype=torch.float64)
    results["rebuilt_single_process"] = {
        "params": max(float((p - saved.get_parameter(n)).abs().max()) for n, p in rebuilt.named_parameters()),
        "output": float((rebuilt(x) - saved(x)).abs().max()),
        "same_config": float(rebuilt.extra_repr() == saved.extra_repr()),
    }
    other = expert_parallel(build_moe(dict(case, top_k=3), seed=6))
    gap = root / f"gap_{dist.get_rank()}"
    shutil.copytree(root / "from4", gap)
    shutil.rmtree(gap / "experts-00002-00004")
    differs = dict(case, top_k=2 + dist.get_rank() % 2)  # top-2 on even ranks, top-3 on odd ones
    for name, action in (("different_layer", lambda: load_expert_slice(other, root / "from4")),
                         ("missing_slice", lambda: load_sparse_moe(gap)),
                         ("not_a_group_member", lambda: expert_parallel(saved, pairs[1 - pair_index])),
                         ("settings_differ", lambda: expert_parallel(build_moe(differs, seed=6)))):
        try:
            action()
            results[name] = {"raised": 0.0}
        except (CheckpointError, ValueError):
            results[name] = {"raised": 1.0}
    return results


class TinyModel(nn.Module):
    """proj -> MoE -> head: parameters inside and outside the expert-parallel layer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        from cumo_layers import SparseMoEMLP

        torch.manual_seed(seed)
        self.proj = nn.Linear(IN_FEATURES, IN_FEATURES, dtype=torch.float64)
        self.moe = SparseMoEMLP(IN_FEATURES, HIDDEN, num_experts=4, top_k=2, balance_loss_coef=0.1,
                                z_loss_coef=0.01, dtype=torch.float64, backend="torch")
        self.head = nn.Linear(IN_FEATURES, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.moe(self.proj(x)))).squeeze(-1)


def suite_data_parallel() -> dict[str, dict[str, float]]:
    """A short SGD loop: DDP over the non-expert parameters with expert-parallel MoE against one process."""
    from cumo_layers import aux_loss
    from cumo_layers.parallel import data_parallel, expert_parallel
    from tests.helpers import rel_err

    rank = dist.get_rank()
    reference = TinyModel(seed=3)
    model = TinyModel(seed=3)
    model.moe = expert_parallel(model.moe)
    ddp = data_parallel(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.5)
    split_per_step = [(11, 5), (8, 8), (0, 13), (16, 3), (6, 10), (9, 9)]
    generator = torch.Generator().manual_seed(17)
    ref_curve, curve = [], []
    for counts in split_per_step:
        x = torch.randn(sum(counts), IN_FEATURES, dtype=torch.float64, generator=generator)
        target = torch.randn(sum(counts), dtype=torch.float64, generator=generator)
        # aux_loss() sums in fp32; the curve records the fp64 losses (the gradients are the same either way).
        ref_task = (reference(x) - target).square().mean()
        ref_opt.zero_grad()
        (ref_task + aux_loss(reference)).backward()
        ref_opt.step()
        ref_curve.append(float((ref_task + reference.moe.last_aux_loss).detach()))

        mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        task_share = (ddp(x[mine]) - target[mine]).square().sum() / x.shape[0]
        opt.zero_grad()
        (task_share + aux_loss(model)).backward()
        opt.step()
        total = (task_share + model.moe.last_aux_loss).detach()
        dist.all_reduce(total)
        curve.append(float(total))
    experts = slice(model.moe.first_expert, model.moe.first_expert + model.moe.num_local_experts)
    ref_params = dict(reference.named_parameters())
    param_error = 0.0
    for name, param in model.named_parameters():
        expected = ref_params[name][experts] if name.split(".")[-1] in ("w1", "b1", "w2", "b2") else ref_params[name]
        param_error = max(param_error, rel_err(param, expected))
    curve_error = max(abs(a - b) / abs(b) for a, b in zip(curve, ref_curve))
    return {"training_loop": {"loss_curve": curve_error, "params": param_error,
                              "loss_moved": abs(ref_curve[-1] - ref_curve[0]), "steps": float(len(curve))}}


SUITES: dict[str, Callable[..., dict[str, dict[str, float]]]] = {
    "correctness": suite_correctness,
    "checkpoint": suite_checkpoint,
    "data_parallel": suite_data_parallel,
}


def worker(rank: int, world_size: int, port: int, out_dir: str, suites: list[str]) -> None:
    """One rank: join the group, run the suites, write ``rank<r>.json``; the group is destroyed on any exit."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results: dict[str, Any] = {}
    try:
        for suite in suites:
            try:
                fn = SUITES[suite]
                results.update(fn(out_dir) if suite == "checkpoint" else fn())
            except Exception:
                results[f"{suite}:error"] = traceback.format_exc()
                raise
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def launch(suites: list[str], world_size: int, out_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """Run the suites in a fresh ``world_size``-process gloo world on 127.0.0.1; each rank's results.

    The parent hosts the store on port 0 (the OS picks a free port: no probe-then-bind race). Workers that
    outlive ``timeout_s`` are killed with their process group; a rank that fails raises RuntimeError with
    the tail of its output.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO_ROOT))
    procs = []
    try:
        for rank in range(world_size):
            log = open(out_dir / f"rank{rank}.log", "w")
            command = [sys.executable, "-m", "tests.cumo_layers.expert_parallel_worker",
                       str(rank), str(world_size), str(store.port), str(out_dir), ",".join(suites)]
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            log.close()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {world_size}-process world did not finish in {timeout_s} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        del store
    results = []
    for rank, proc in enumerate(procs):
        path = out_dir / f"rank{rank}.json"
        if proc.returncode != 0 or not path.exists():
            tail = (out_dir / f"rank{rank}.log").read_text()[-3000:]
            raise RuntimeError(f"rank {rank} of {world_size} exited with {proc.returncode}:\n{tail}")
        results.append(json.loads(path.read_text()))
    return results


if __name__ == "__main__":
    rank_arg, world_arg, port_arg, out_arg, suites_arg = sys.argv[1:6]
    worker(int(rank_arg), int(world_arg), int(port_arg), out_arg, suites_arg.split(","))
    # Results are written and the group destroyed: skip the interpreter's teardown, where a C++ thread of
    # torch.distributed once aborted a finished worker ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)
