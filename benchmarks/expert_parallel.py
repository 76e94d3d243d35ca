"""``python -m benchmarks.expert_parallel``: expert parallelism measured on this machine, and modelled on GPUs.

Measured: the fine-grained regime of benchmarks.common (E=64, k=8, SwiGLU) with a fixed global batch split
evenly over 1, 2 and 4 processes (``torchrun --standalone``, gloo on the loopback), the expert-parallel layer
(``cumo_layers.parallel``) in each. Reported: global tokens/s of the forward (inference) and of forward +
backward, and where the forward's time goes (gating incl. the count exchange, all-to-all incl. waiting for
the slowest rank, experts, combine), mean over ranks of the per-phase host seconds, median over iterations,
and the CPU seconds of a forward summed over ranks (the number that a shared, loaded machine distorts least).
One thread per rank: on a shared, loaded machine a second OpenMP thread mostly waits for a core (the plain
layer's forward took 1.5 s with 2 threads and 0.92 s with 1, load average 7-10 on 2 cores, 2026-11-26); so a
world of 1 uses one core, 2 use two, 4 oversubscribe them.

Modelled (no measurement): per GPU and per layer, all-to-all time (bytes of the dispatched and returned
token rows that leave the GPU, over NVLink inside a node of 8 and InfiniBand across nodes) against the expert
GEMM time (FLOPs at a fraction of the H100's bf16 peak), and the EP traffic against the alternative of
replicating the experts (all-reduce of their gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import REGIMES_BY_NAME, Regime
from benchmarks.roofline import BF16, H100_FLOPS
from cumo_layers.parallel import PHASES

WORLD_SIZES = (1, 2, 4)
WARMUP, ITERATIONS = 1, 3
RUN_TIMEOUT_S = 600

# The GPU model's assumptions (per GPU, one direction): NVLink 4 on H100 SXM is 450 GB/s, an NDR
# InfiniBand NIC 400 Gb/s = 50 GB/s; all-to-all reaches about 70% (NVLink) and 80% (IB) of them; the
# grouped expert GEMMs about 60% of the bf16 dense peak. 8 GPUs per NVLink node.
NVLINK_BYTES_PER_S = 450e9 * 0.7
IB_BYTES_PER_S = 50e9 * 0.8
GEMM_EFFICIENCY = 0.6
GPUS_PER_NODE = 8
TOKENS_PER_GPU = 8192
MODEL_WORLD_SIZES = (8, 16, 32, 64)
# d_model, expert hidden, experts, top_k, GLU: CuMo's CLIP-MoE, Mixtral 8x7B, the fine-grained regime at full
# width (Qwen1.5-MoE-A2.7B-like: 60 experts rounded to 64), DeepSeek-V3-like routed experts.
PAPER_MODELS = {
    "cumo-clip": (1024, 4096, 4, 2, False),
    "mixtral-8x7b": (4096, 14336, 8, 2, True),
    "qwen-moe-like": (2048, 1408, 64, 4, True),
    "deepseek-v3-like": (7168, 2048, 256, 8, True),
}


def time_layer(layer, x: torch.Tensor, phases: tuple[str, ...]) -> dict[str, list[float]]:
    """Seconds per iteration of the forward (no grad), of forward + backward, and of each forward phase."""
    import torch.distributed as dist

    samples: dict[str, list[float]] = {"forward": [], "forward_cpu": [], "train_step": [], **{p: [] for p in phases}}
    for step in range(WARMUP + ITERATIONS):
        if phases:
            layer.phase_times = dict.fromkeys(phases, 0.0)
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            layer(x)
        forward, forward_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        phase_times: dict[str, float] = {}
        if phases:
            phase_times, layer.phase_times = layer.phase_times, None
        dist.barrier()
        start = time.perf_counter()
        (layer(x.clone().requires_grad_()).square().mean() + layer.last_aux_loss).backward()
        train_step = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            samples["forward"].append(forward)
            samples["forward_cpu"].append(forward_cpu)
            samples["train_step"].append(train_step)
            for name in phases:
                samples[name].append(phase_times[name])
    return samples


def worker(regime: Regime, backend: str) -> None:
    """One rank under torchrun: time the layer, rank 0 prints one JSON line of every rank's samples.
    A world of 1 also times the plain SparseMoEMLP on the same tokens: the peer of every row."""
    import torch.distributed as dist

    from cumo_layers import SparseMoEMLP
    from cumo_layers.parallel import expert_parallel

    dist.init_process_group("gloo")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        moe = SparseMoEMLP(regime.d_model, regime.hidden, regime.d_out, num_experts=regime.experts,
                           top_k=regime.top_k, activation=regime.activation, glu=regime.glu, bias=False,
                           backend=backend)
        layer = expert_parallel(moe)
        local_tokens = regime.tokens // world + (rank < regime.tokens % world)
        x = torch.randn(local_tokens, regime.d_model)
        result = {"world_size": world, "ranks": [None] * world}
        if world == 1:
            result["single_process"] = time_layer(moe, x, ())
        del moe
        dist.all_gather_object(result["ranks"], time_layer(layer, x, PHASES))
        if rank == 0:
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def run_world(world_size: int, regime: Regime, backend: str) -> dict:
    """Launch one torchrun world of this script's worker and return its parsed result."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "-m", "benchmarks.expert_parallel", "--worker", "--regime", regime.name, "--backend", backend]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    raise RuntimeError(f"world of {world_size} failed ({done.returncode}):\n{output}")


def summarise(result: dict, regime: Regime, phases: bool = True) -> dict[str, float]:
    """Median over iterations of the slowest rank's forward and train step; phases as the mean over ranks."""
    ranks = result["ranks"]
    summary = {}
    for key in ("forward", "train_step"):
        per_iteration = [max(r[key][i] for r in ranks) for i in range(ITERATIONS)]
        summary[key] = statistics.median(per_iteration)
    for key in PHASES if phases else ():
        summary[key] = statistics.median([statistics.mean(r[key][i] for r in ranks) for i in range(ITERATIONS)])
    summary["forward_cpu"] = statistics.median([sum(r["forward_cpu"][i] for r in ranks) for i in range(ITERATIONS)])
    summary["forward_tokens_per_s"] = regime.tokens / summary["forward"]
    summary["train_tokens_per_s"] = regime.tokens / summary["train_step"]
    return summary


def measured_table(regime: Regime, backend: str) -> str:
    rows = [
        "| processes | forward tokens/s | fwd+bwd tokens/s | forward ms | forward CPU s (all ranks) "
        "| gating | all-to-all | experts | combine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for world_size in WORLD_SIZES:
        result = run_world(world_size, regime, backend)
        if "single_process" in result:
            peer = summarise({"ranks": [result["single_process"]]}, regime, phases=False)
            rows.append(f"| 1, plain SparseMoEMLP (peer) | {peer['forward_tokens_per_s']:.0f} | "
                        f"{peer['train_tokens_per_s']:.0f} | {1e3 * peer['forward']:.1f} | {peer['forward_cpu']:.2f} "
                        "| | | | |")
            print(rows[-1], flush=True)
        s = summarise(result, regime)
        split = sum(s[k] for k in PHASES)
        shares = " | ".join(f"{1e3 * s[k]:.1f} ms ({100 * s[k] / split:.0f}%)" for k in PHASES)
        rows.append(f"| {world_size} | {s['forward_tokens_per_s']:.0f} | {s['train_tokens_per_s']:.0f} | "
                    f"{1e3 * s['forward']:.1f} | {s['forward_cpu']:.2f} | {shares} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def paper_model(d_model: int, hidden: int, experts: int, top_k: int, glu: bool, world_size: int) -> dict[str, float]:
    """Per GPU, one layer, forward (the backward doubles both sides, so the ratios hold for training).

    Each GPU holds TOKENS_PER_GPU tokens; routing is uniform, so a row stays on its GPU with probability 1/W,
    stays in the node with (min(W, 8) - 1)/W and crosses InfiniBand with (W - 8)/W. Dispatch and return
    move the same bytes; NVLink and IB transfers overlap each other.
    """
    rows = TOKENS_PER_GPU * top_k
    row_bytes = 2 * d_model * BF16  # dispatched and returned
    in_node = (min(world_size, GPUS_PER_NODE) - 1) / world_size
    cross_node = max(0, world_size - GPUS_PER_NODE) / world_size
    comm_s = max(rows * row_bytes * in_node / NVLINK_BYTES_PER_S, rows * row_bytes * cross_node / IB_BYTES_PER_S)
    fc1_rows = 2 * hidden if glu else hidden
    expert_flops = 2 * rows * (d_model * fc1_rows + hidden * d_model)
    expert_s = expert_flops / (H100_FLOPS * GEMM_EFFICIENCY)
    # Replicated experts instead: a ring all-reduce of the expert gradients (bf16) per step moves
    # 2 (W-1)/W of them; EP moves its rows in forward (dispatch + return) and backward (twice that).
    expert_param_bytes = experts * (d_model * fc1_rows + hidden * d_model) * BF16
    allreduce_bytes = 2 * (world_size - 1) / world_size * expert_param_bytes
    ep_step_bytes = 2 * rows * row_bytes * (1 - 1 / world_size)
    return {"a2a_ms": 1e3 * comm_s, "expert_ms": 1e3 * expert_s, "ratio": comm_s / expert_s,
            "ep_step_mb": ep_step_bytes / 1e6, "allreduce_mb": allreduce_bytes / 1e6}


def paper_table() -> str:
    rows = [
        "| model (D, H, E, k) | GPUs | all-to-all ms | expert GEMM ms | a2a / GEMM | EP MB/step "
        "| replicated-expert all-reduce MB/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (d, h, e, k, glu) in PAPER_MODELS.items():
        label = f"{name} ({d}, {h}, {e}, {k})"
        too_many = [w for w in MODEL_WORLD_SIZES if e % w]
        if too_many:
            rows.append(f"| {label} | {', '.join(map(str, too_many))} | E={e}: an EP group spans at most {e} GPUs, "
                        "data parallelism over the rest | | | | |")
        for world_size in (w for w in MODEL_WORLD_SIZES if w not in too_many):
            m = paper_model(d, h, e, k, glu, world_size)
            rows.append(f"| {label} | {world_size} | {m['a2a_ms']:.2f} | {m['expert_ms']:.2f} | {m['ratio']:.2f} | "
                        f"{m['ep_step_mb']:.0f} | {m['allreduce_mb']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="fine-grained", choices=sorted(REGIMES_BY_NAME))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-only", action="store_true", help="print only the GPU model")
    args = parser.parse_args()
    regime = REGIMES_BY_NAME[args.regime]
    if args.worker:
        worker(regime, args.backend)
        return
    if not args.model_only:
        print(f"measured: {regime.name} (T={regime.tokens} global, D={regime.d_model}, H={regime.hidden}, "
              f"E={regime.experts}, k={regime.top_k}), fp32, backend {args.backend}, {os.cpu_count()} cores\n")
        measured_table(regime, args.backend)
    print(f"\nmodel: H100 SXM, {TOKENS_PER_GPU} tokens per GPU, bf16, per layer\n")
    print(paper_table())


if __name__ == "__main__":
    main()
