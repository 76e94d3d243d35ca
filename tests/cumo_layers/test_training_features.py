"""What users of layers expect from an upcycled model: autocast, activation checkpointing, DDP and FSDP2."""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from cumo_layers import aux_loss
from tests.cumo_layers.test_serialization import IDS, Tower, upcycled_tower
from tests.helpers import cpu_backends

FP32_RTOL = 1e-5
DDP_TIMEOUT_S = 90


def relative_error(actual, expected) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_autocast_bf16_forward_and_backward():
    """Under CPU autocast the upcycled model is as close to the fp32 dense model as the dense model
    under the same autocast is (flash-attention's low-precision rule), and backward reaches every expert."""
    torch.manual_seed(0)
    dense = Tower().eval()
    from cumo_layers import upcycle_model
    import copy

    moe = upcycle_model(copy.deepcopy(dense), num_experts=4, top_k=2).eval()
    with torch.no_grad():
        expected = dense(IDS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense_low = dense(IDS)
            moe_low = moe(IDS)
    assert moe_low.dtype == torch.bfloat16
    assert relative_error(moe_low, expected) <= 2 * relative_error(dense_low, expected) + 1e-3
    moe.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(IDS).float().pow(2).mean().backward()
    w1 = moe.blocks[0]["mlp"].w1
    assert w1.grad is not None and w1.grad.dtype == torch.float32 and w1.grad.abs().sum() > 0


class CheckpointedTower(torch.nn.Module):
    """The same model, each block's MLP recomputed in backward (torch.utils.checkpoint, non-reentrant)."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, ids):
        x = self.tower.embed(ids)
        for block in self.tower.blocks:
            x = x + checkpoint(lambda h, b=block: b["mlp"](b["norm"](h)), x, use_reentrant=False)
        return self.tower.head(x)


def test_activation_checkpointing_gives_the_same_gradients():
    model = upcycled_tower().train()
    model(IDS).pow(2).mean().backward()
    expected_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    CheckpointedTower(model)(IDS).pow(2).mean().backward()
    actual = grads_of(model)
    assert actual.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert relative_error(actual[name], grad) <= FP32_RTOL, name


def wrapped(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    """The model under DDP, or under FSDP2 with each MoE layer (its stacked [E, ...] experts) a unit of its own."""
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    from cumo_layers import SparseMoEMLP

    for module in model.modules():
        if isinstance(module, SparseMoEMLP):
            fully_shard(module)
    return fully_shard(model)


def full_grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole (FSDP2 leaves each rank its shard, a DTensor)."""
    grads = grads_of(model)
    return {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}


def data_parallel_worker(rank: int, world: int, port: int, out_dir: str, wrapper: str) -> None:
    """One rank: the same upcycled model, its own half of the batch, the router losses in the loss; saves its
    gradients."""
    try:
        timeout = datetime.timedelta(seconds=DDP_TIMEOUT_S // 2)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        torch.set_num_threads(1)
        model = wrapped(upcycled_tower().train(), wrapper)
        ids = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(7))
        (model(ids[rank * 2:(rank + 1) * 2]).pow(2).mean() + aux_loss(model)).backward()
        torch.save(full_grads_of(model.module if wrapper == "ddp" else model), os.path.join(out_dir, f"grads{rank}.pt"))
        # Tear down while the interpreter is whole. DDP sits in a reference cycle that holds the process group;
        # left to the collector of interpreter finalization, gloo's worker threads outlived
        # destroy_process_group and freed their last work item then, which aborts ("terminate called
        # without an active exception", about 1 run in 40).
        dist.barrier()
        del model
        gc.collect()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_data_parallel_processes_average_the_gradients(wrapper, tmp_path):
    """DDP and FSDP2 (fully_shard) on two gloo processes give each parameter the mean over ranks of its gradient,
    router losses included, as one process computes it."""
    # The store lives in this process, as in expert_parallel_worker.launch, so neither rank's exit closes it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=data_parallel_worker, args=(rank, 2, store.port, str(tmp_path), wrapper))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(DDP_TIMEOUT_S)
    finally:
        hung = [w for w in workers if w.is_alive()]
        for worker in hung:
            worker.kill()
            worker.join(5)
    errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
    assert not hung, f"{wrapper} workers did not finish in {DDP_TIMEOUT_S}s"
    assert not errors and all(w.exitcode == 0 for w in workers), (errors, [w.exitcode for w in workers])
    grads = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    model = upcycled_tower().train()
    ids = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(7))
    for half in range(2):  # the mean over ranks of each rank's loss gradient
        ((model(ids[half * 2:(half + 1) * 2]).pow(2).mean() + aux_loss(model)) / 2).backward()
    expected = grads_of(model)
    for name, grad in expected.items():
        assert torch.equal(grads[0][name], grads[1][name]), name
        assert relative_error(grads[0][name], grad) <= FP32_RTOL, name


def deterministic_training_step(backend: str, device: str, dtype: torch.dtype, tokens: int) -> None:
    """Under torch.use_deterministic_algorithms(True) the layer's training step (capacity drops, router losses)
    runs (no op of it raises for want of a deterministic kernel) and repeats bit for bit."""
    from cumo_layers import SparseMoEMLP

    moe = SparseMoEMLP(64, 96, num_experts=8, top_k=2, glu=True, activation="silu", capacity_factor=1.5,
                       backend=backend).to(device, dtype)
    x = torch.randn(tokens, 64, device=device, dtype=dtype, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = moe(x)
            grads = torch.autograd.grad(out.float().pow(2).mean() + moe.last_aux_loss, [x, *moe.parameters()])
            runs.append((out, *grads))
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", cpu_backends())
def test_training_step_under_deterministic_algorithms(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    deterministic_training_step(backend, "cpu", torch.float32, tokens=100)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_training_step_under_deterministic_algorithms_gpu(backend, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic algorithms
    deterministic_training_step(backend, "cuda", torch.bfloat16, tokens=3000)
