"""``python -m benchmarks.host_overhead``: the host (Python) cost of the Triton launch path, on any machine.

Below a few thousand tokens a GPU MoE layer is bound by host time, not by its kernels (the H200 run of
2026-11-26: 0.5-0.8 ms of Python per forward for ~60 us of GPU work). This measures that host path on
the CPU: the Triton backend runs with every kernel launch stubbed out at the last step (``dry_run``:
kernels are bound as on a GPU, their launchers do nothing), so what is timed is argument checking,
custom-op dispatch, allocation and the launch bookkeeping of ``runtime.BoundKernels``. Not in it: the
C launcher itself (a few us a launch) and the first launch of each specialization, which goes through
Triton (the GPU run measures both). Beside it, in the same run, a plain ``torch.add`` of two small
tensors: the unit of host cost any PyTorch op pays. Reported: microseconds per call and that cost in
``torch.add`` units, for the whole SparseMoEMLP layer (router included; an inference forward and a
training step), for ``moe_kernels.moe_mlp`` (what its eval forward runs; and its training step without the
router's losses, which ``make gpu-check`` times) and for ``moe_kernels.expert_mlp`` and ``topk_gating`` alone, at
decode and small-batch shapes and past one routing block.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

import torch

REPEATS = 200
ROUNDS = 15
TRAIN_ROUNDS = 25  # a training step allocates weight-sized gradients: noisier on a CPU, so more rounds


def per_call_us(fn, repeats: int = REPEATS, rounds: int = ROUNDS) -> float:
    """The fastest round's mean microseconds per call. The work is the same every call, so a slower round is
    the machine's noise (another process, a frequency change), not the code's: the minimum is what a shared
    2-core machine can compare from one run to the next (the median was, until 2026-11-26)."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append(1e6 * (time.perf_counter() - start) / repeats)
    return min(samples)


class _NoGPU:
    """Stands in for Triton's CUDA driver: device 0, stream 0."""

    @staticmethod
    def get_current_device() -> int:
        return 0

    @staticmethod
    def get_current_stream(device: int) -> int:
        return 0


@contextmanager
def dry_run() -> Iterator[list[str]]:
    """The Triton backend on CPU tensors as if they were on a GPU, up to the launcher: kernels are
    bound once per specialization by ``runtime.BoundKernels`` (the compiled path, not the
    interpreter), and their launchers do nothing. Yields the names of the kernels bound, in order."""
    os.environ["TRITON_INTERPRET"] = "1"  # lets the backend accept CPU tensors; no kernel runs
    from moe_kernels.triton import runtime

    bound: list[str] = []

    class DryRun(runtime.BoundKernels):
        @staticmethod
        def launch_through_triton(spec, tensors):
            bound.append(spec.name)
            return SimpleNamespace(run=lambda *launcher_args: None, function=None, packed_metadata=None)

    real_launch, real_bound = runtime.launch, runtime.BOUND_KERNELS
    runtime.BOUND_KERNELS = DryRun(driver=_NoGPU())
    runtime.launch = lambda spec, interpret, *tensors: real_launch(spec, False, *tensors)
    try:
        yield bound
    finally:
        runtime.launch, runtime.BOUND_KERNELS = real_launch, real_bound


def measure(tokens: int, d_model: int, hidden: int, experts: int, top_k: int) -> dict[str, float]:
    from cumo_layers import SparseMoEMLP
    from moe_kernels import ops

    with dry_run():
        layer = SparseMoEMLP(d_model, hidden, num_experts=experts, top_k=top_k, activation="silu", glu=True,
                             bias=False, backend="triton").eval()
        x = torch.randn(tokens, d_model)
        weights, idx = layer.router(x)[:2]
        a, b = torch.randn(4), torch.randn(4)
        with torch.no_grad():
            results = {
                "torch.add": per_call_us(lambda: torch.add(a, b)),
                "layer": per_call_us(lambda: layer(x)),
                "moe_mlp": per_call_us(lambda: ops.moe_mlp(x, layer.router.weight, layer.w1, None, layer.w2, None,
                                                           top_k, True, "silu", True, backend="triton")),
                "expert_mlp": per_call_us(lambda: ops.expert_mlp(x, weights, idx, layer.w1, None, layer.w2, None,
                                                                 "silu", True, backend="triton")),
                "topk_gating": per_call_us(lambda: ops.topk_gating(x @ layer.router.weight.t(), top_k,
                                                                   backend="triton")),
            }
        # Training: forward + backward of expert_mlp with x and the top-k weights trained (the weight
        # gradients would add CPU work of their size: an allocation and an accumulation), on the
        # eager path and through the torch.library custom op (what torch.compile runs).
        from moe_kernels.reference import glu_code

        xg, wg = x.detach().requires_grad_(), weights.detach().requires_grad_()
        w1, w2 = layer.w1.detach(), layer.w2.detach()
        grad = torch.randn(tokens, d_model)

        def custom_op():
            return torch.ops.cumo_triton.expert_mlp_forward(xg, wg, idx, w1, None, w2, None, "silu",
                                                            *glu_code(True), True, True)[0]

        results["expert_mlp train"] = per_call_us(lambda: ops.expert_mlp(
            xg, wg, idx, w1, None, w2, None, "silu", True, backend="triton").backward(grad))
        results["  custom op"] = per_call_us(lambda: custom_op().backward(grad))
        # The whole layer's training step (router, its losses, experts; the gradients of the input and every
        # parameter), with D = 64 and H = 32: the host path does not depend on them, but on the CPU every
        # weight-sized gradient buffer is a fresh mmap (a GPU's caching allocator reuses its blocks).
        small = SparseMoEMLP(64, 32, num_experts=experts, top_k=top_k, activation="silu", glu=True, bias=False,
                             backend="triton").train()
        x_small = torch.randn(tokens, 64, requires_grad=True)
        leaves = [x_small, *small.parameters()]
        # ops.moe_mlp's training step without the losses: what make gpu-check times as cumo-triton's training.
        results["moe_mlp train"] = per_call_us(lambda: torch.autograd.grad(
            ops.moe_mlp(x_small, small.router.weight, small.w1, None, small.w2, None, top_k, True, "silu", True,
                        backend="triton").out.sum(), leaves), repeats=REPEATS // 4, rounds=TRAIN_ROUNDS)

        def layer_step():
            out = small(x_small)
            torch.autograd.grad(out.sum() + small.last_aux_loss, leaves)

        results["layer train"] = per_call_us(layer_step, repeats=REPEATS // 4, rounds=TRAIN_ROUNDS)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.set_num_threads(1)
    # Past one routing block the host path is the same at any D and H: D=64, H=32 keep a CPU's buffers small.
    shapes = {"decode (T=1, D=2048, H=1024, E=64, k=8)": (1, 2048, 1024, 64, 8),
              "small batch (T=16, D=1024, H=512, E=64, k=8)": (16, 1024, 512, 64, 8),
              "past one routing block (T=1024, D=64, H=32, E=64, k=8)": (1024, 64, 32, 64, 8)}
    for name, shape in shapes.items():
        result = measure(*shape)
        unit = result["torch.add"]
        print(f"\n{name}; kernels stubbed, host time only")
        for key, value in result.items():
            print(f"  {key:16s} {value:8.1f} us  = {value / unit:6.1f} x torch.add")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
