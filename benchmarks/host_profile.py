"""``python -m benchmarks.host_profile``: where the host time of the Triton path goes, function by function.

cProfile over repeated calls of the whole ``SparseMoEMLP`` (router included, backend ``triton``, bf16):
an inference forward at decode and at a small batch, and a training step (forward + backward) at the fine-grained shape,
then the functions with the most time of their own. On a GPU it profiles the real path; without one
it runs on the CPU with the launchers stubbed (``benchmarks.host_overhead.dry_run``), which shows our
Python but not the cost of the CUDA calls. Profiling slows every Python call alike; read the ranking,
not the absolute times (``benchmarks.host_overhead`` and ``make gpu-check`` time it unprofiled).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from contextlib import nullcontext

import torch

CASES = {
    # name: (tokens, d_model, hidden, experts, top_k, training, calls)
    "decode inference (T=1 D=2048 H=1024 E=64 k=8)": (1, 2048, 1024, 64, 8, False, 300),
    "small-batch inference (T=16 D=1024 H=512 E=64 k=8)": (16, 1024, 512, 64, 8, False, 300),
    "fine-grained training step (T=2048 D=1024 H=512 E=64 k=8)": (2048, 1024, 512, 64, 8, True, 30),
}


def profile_case(tokens: int, d_model: int, hidden: int, experts: int, top_k: int, training: bool, calls: int,
                 device: str, top: int) -> str:
    from cumo_layers import SparseMoEMLP

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = SparseMoEMLP(d_model, hidden, num_experts=experts, top_k=top_k, activation="silu", glu=True,
                         bias=False, backend="triton", device=device, dtype=dtype).train(training)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=training)

    def call():
        if training:
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)

    for _ in range(3):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile()
    # The backward of CUDA tensors runs on autograd's device thread, which cProfile does not see.
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"{calls} calls; per call: {1e6 * stats.total_tt / calls:.0f} us under the profiler\n")
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=30, help="functions listed per case")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(1)
        from benchmarks.host_overhead import dry_run
    for name, case in CASES.items():
        with nullcontext() if on_gpu else dry_run():
            report = profile_case(*case, device="cuda" if on_gpu else "cpu", top=args.top)
        print(f"\n=== {name}, {'GPU' if on_gpu else 'CPU, launchers stubbed'}\n{report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
