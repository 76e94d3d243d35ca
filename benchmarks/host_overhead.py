"""``python -m benchmarks.host_overhead``: the host (Python) cost of the Triton launch path, on any machine.

Below a few thousand tokens a GPU MoE layer is bound by host time, not by its kernels (the H200 run of
2026-11-26: 0.5-0.8 ms of Python per forward for ~60 us of GPU work). This measures that host path on
the CPU: the Triton backend runs with every kernel launch stubbed out (its ``launch`` only counts),
so what is timed is argument checking, custom-op dispatch, allocation and launch bookkeeping
(Triton's own launcher, ~20-40 us per launch in Python, is not in it: the GPU run measures it). Beside
it, in the same run, a plain ``torch.add`` of two small tensors: the unit of host cost any PyTorch op
pays. Reported: microseconds per call and that cost in ``torch.add`` units, for the whole SparseMoEMLP
layer (router included) and for ``moe_kernels.expert_mlp`` alone, at decode and small-batch shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

REPEATS = 200
ROUNDS = 7


def per_call_us(fn, repeats: int = REPEATS, rounds: int = ROUNDS) -> float:
    """Median over rounds of the mean microseconds per call."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append(1e6 * (time.perf_counter() - start) / repeats)
    return statistics.median(samples)


def measure(tokens: int, d_model: int, hidden: int, experts: int, top_k: int) -> dict[str, float]:
    os.environ["TRITON_INTERPRET"] = "1"  # lets the backend accept CPU tensors; no kernel runs anyway
    from cumo_layers import SparseMoEMLP
    from moe_kernels import ops
    from moe_kernels.triton import runtime

    real_launch = runtime.launch
    runtime.launch = lambda name, interpret, grid, *args, **kwargs: runtime.LAUNCHES.update([name])
    try:
        layer = SparseMoEMLP(d_model, hidden, num_experts=experts, top_k=top_k, activation="silu", glu=True,
                             bias=False, backend="triton").eval()
        x = torch.randn(tokens, d_model)
        weights, idx = layer.router(x)[:2]
        a, b = torch.randn(4), torch.randn(4)
        with torch.no_grad():
            results = {
                "torch.add": per_call_us(lambda: torch.add(a, b)),
                "layer": per_call_us(lambda: layer(x)),
                "expert_mlp": per_call_us(lambda: ops.expert_mlp(x, weights, idx, layer.w1, None, layer.w2, None,
                                                                 "silu", True, backend="triton")),
                "topk_gating": per_call_us(lambda: ops.topk_gating(x @ layer.router.weight.t(), top_k,
                                                                   backend="triton")),
            }
    finally:
        runtime.launch = real_launch
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.set_num_threads(1)
    shapes = {"decode (T=1, D=2048, H=1024, E=64, k=8)": (1, 2048, 1024, 64, 8),
              "small batch (T=16, D=1024, H=512, E=64, k=8)": (16, 1024, 512, 64, 8)}
    for name, shape in shapes.items():
        result = measure(*shape)
        unit = result["torch.add"]
        print(f"\n{name}; kernels stubbed, host time only")
        for key, value in result.items():
            print(f"  {key:12s} {value:8.1f} us  = {value / unit:6.1f} x torch.add")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
