"""What ``make gpu-check`` times on the GPU (``benchmarks.gpu_check`` runs these phases, bounded, in order), and
how: device time by CUDA events, host time per call with no sync, CUDA-graph replay time. The whole layer at
decode; every regime against the dense-equivalent MLP, plain ``torch._grouped_mm`` and transformers' experts;
the whole layer's training step; the GPU time per kernel of a training step and each grouped kernel alone beside
a cuBLAS GEMM of its FLOPs; a cProfile of the host path and a timeline of training steps. Each phase takes the
run's log (a callable printing and recording a line) and returns what goes into gpu_check.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

Log = Callable[..., None]
TIMED_PEERS = ["dense-equiv", "cumo-triton", "cumo-cuda", "torch-grouped_mm", "hf-grouped_mm"]
TIMING_ITERS = 20


def time_device(step, iters: int) -> float:
    """Median device milliseconds per call from CUDA events, after a warm-up."""
    import torch

    step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def time_host(step, iters: int, rounds: int = 5) -> float:
    """Microseconds of host time per call: calls issued back to back, synchronised only at the end of a round
    (few enough that the launch queue never fills), so it is the Python + launch cost. The fastest of ``rounds``
    rounds: the work is the same every call, so a slower round is the host's noise (run 5 read T=16 at 177 us in
    one round of 20 calls, where the decode path, one launch and one allocation shorter, read 90)."""
    import torch

    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        best = min(best, time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e6 * best / iters


def time_graph(step, iters: int) -> tuple[float | None, str | None]:
    """(median milliseconds of one CUDA-graph replay of an inference step, None) or (None, why capture failed)."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # reported in the log and the JSON, never hidden
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return time_device(graph.replay, iters), None


def timings(log: Log, deadline: float, device: str = "cuda", peers: list[str] = TIMED_PEERS) -> list[dict]:
    import torch

    from benchmarks.common import GPU_REGIMES, MODES_BY_NAME, PEERS_BY_NAME, PeerSkipped, make_problem, make_step

    rows = []
    for mode_name in ("infer-bf16", "train-bf16"):
        mode = MODES_BY_NAME[mode_name]
        for regime in GPU_REGIMES:
            if mode.training and not regime.train:
                continue
            if time.perf_counter() > deadline:
                log(f"timing: out of time before {regime.name}/{mode_name}")
                return rows
            problem = make_problem(regime, mode, torch.device(device))
            log(f"\n{regime.name} / {mode_name}: T={regime.tokens} D={regime.d_model} H={regime.hidden} "
                f"E={regime.experts} k={regime.top_k}")
            log(f"  {'peer':18s} {'device ms':>10s} {'x dense':>8s} {'host us':>9s} {'graph ms':>9s}")
            dense_ms = None
            for name in peers:
                row = {"regime": regime.name, "mode": mode_name, "peer": name}
                try:
                    step = make_step(PEERS_BY_NAME[name].build(problem), problem)
                    row["device_ms"] = time_device(step, TIMING_ITERS)
                    row["host_us"] = time_host(step, TIMING_ITERS)
                    if not mode.training:
                        row["graph_ms"], row["graph_failed"] = time_graph(step, TIMING_ITERS)
                except PeerSkipped as exc:
                    row["skipped"] = str(exc)
                except Exception as exc:  # a failing peer is reported, the run goes on
                    row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                if name == "dense-equiv":
                    dense_ms = row.get("device_ms")
                if "device_ms" in row and dense_ms:
                    row["x_dense"] = row["device_ms"] / dense_ms
                rows.append(row)
                if "device_ms" in row:
                    graph = f"{row['graph_ms']:9.3f}" if row.get("graph_ms") is not None else f"{'-':>9s}"
                    log(f"  {name:18s} {row['device_ms']:10.3f} {row.get('x_dense', 0):8.2f} "
                        f"{row['host_us']:9.0f} {graph}"
                        + (f"  (graph capture failed: {row['graph_failed']})" if row.get("graph_failed") else ""))
                else:
                    log(f"  {name:18s} {row.get('skipped') or row.get('failed')}")
            del problem
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def layer_host_time(log: Log, backends: tuple[str, ...] = ("triton", "cuda")) -> dict:
    """The whole SparseMoEMLP forward at decode (router, gating, routing, experts), bf16, eval: for
    triton with its kernels bound (``runtime.BoundKernels``) and launched through Triton's own path,
    its parts (router alone, ``ops.expert_mlp`` alone), the same through the ops one by one (without the
    one-block router kernel), the cuda backend, and an ``nn.Linear`` of the same width as the unit of host cost."""
    import torch

    from cumo_layers import SparseMoEMLP
    from moe_kernels import ops
    from moe_kernels.triton import runtime

    result = {}
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    linear = torch.nn.Linear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    layers = {backend: SparseMoEMLP(2048, 1024, num_experts=64, top_k=8, activation="silu", glu=True, bias=False,
                                    backend=backend, device="cuda", dtype=torch.bfloat16).eval()
              for backend in backends}
    triton_layer = layers["triton"]
    with torch.no_grad():
        weights, idx = triton_layer.router(x)[:2]
    cases = {
        "nn.Linear(2048, 2048)": (lambda: linear(x), True),
        "triton": (lambda: triton_layer(x), True),
        "triton, launched through Triton (CUMO_TRITON_BIND=0)": (lambda: triton_layer(x), False),
        "triton router alone": (lambda: triton_layer.router(x), True),
        "triton expert_mlp alone": (lambda: ops.expert_mlp(x, weights, idx, triton_layer.w1, None, triton_layer.w2,
                                                           None, "silu", True, backend="triton"), True),
        # The same function through the ops one by one (router GEMM, gating kernel, routing kernel, experts):
        # what the one-block router kernel replaced; its graph_ms against the layer's is that kernel's device cost.
        "triton ops one by one": (lambda: ops.expert_mlp(x, *triton_layer.router(x)[:2], triton_layer.w1, None,
                                                         triton_layer.w2, None, "silu", True, backend="triton"), True),
    }
    if "cuda" in layers:
        cases["cuda"] = (lambda: layers["cuda"](x), True)
    for name, (call, bind) in cases.items():
        def step():
            with torch.no_grad():
                return call()

        runtime.BOUND_KERNELS.enabled = bind
        try:
            graph_ms, graph_failed = time_graph(step, TIMING_ITERS)
            result[name] = {"device_ms": time_device(step, TIMING_ITERS), "host_us": time_host(step, 50),
                            "graph_ms": graph_ms, **({"graph_failed": graph_failed} if graph_failed else {})}
        except Exception as exc:
            result[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        finally:
            runtime.BOUND_KERNELS.enabled = True
        log(f"layer decode {name}: {result[name]}")
    return result


def layer_training_time(log: Log, regimes: tuple[str, ...] = ("cumo-clip", "fine-grained"), device: str = "cuda",
                        backend: str = "triton") -> dict:
    """A training step of the whole SparseMoEMLP (router, its balance and z losses, experts; the gradients of
    the input and every parameter), bf16, triton: what a training loop pays per MoE layer. The peers' timing
    (``timings``) leaves the router's losses out, as the peers have none; the dense rows there are the unit."""
    import torch

    from benchmarks.common import REGIMES_BY_NAME
    from cumo_layers import SparseMoEMLP

    def measure(regime) -> dict:
        layer = SparseMoEMLP(regime.d_model, regime.hidden, regime.d_out, num_experts=regime.experts,
                             top_k=regime.top_k, activation=regime.activation, glu=regime.glu, bias=False,
                             backend=backend, device=device, dtype=torch.bfloat16).train()
        x = torch.randn(regime.tokens, regime.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad_out = torch.randn(regime.tokens, regime.d_out, device=device, dtype=torch.bfloat16)
        leaves = [x, *layer.parameters()]

        def step():
            out = layer(x)
            torch.autograd.grad([out, layer.last_aux_loss], leaves, [grad_out, torch.ones_like(layer.last_aux_loss)])

        return {"device_ms": time_device(step, TIMING_ITERS), "host_us": time_host(step, TIMING_ITERS)}

    result = {}
    for name in regimes:
        try:
            result[name] = measure(REGIMES_BY_NAME[name])
        except Exception as exc:  # reported, the run goes on
            result[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        log(f"layer training step {name}: {result[name]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def gemm_breakdown(log: Log, device: str = "cuda", dtype=None, interpret: bool = False) -> dict:
    """Each grouped kernel of a training step alone (``tune_tiles.case_kernels``: fc1, fc2, the d pre-activation
    and input-gradient GEMMs, the two weight gradients), bf16, at the training regimes' sizes: its time (CUDA events),
    its TFLOP/s, and a cuBLAS GEMM of the same FLOPs ([m, k] x [k, n], ``torch.mm``) beside it. Says which of our
    kernels is short of what the GPU does at that size, by how much."""
    import torch

    from benchmarks.common import REGIMES_BY_NAME
    from benchmarks.tune_tiles import GEMMS, WEIGHT_GRADS, case_kernels

    dtype = dtype or torch.bfloat16
    result = {}
    for name in ("cumo-clip", "cumo-connector", "fine-grained", "large"):
        r = REGIMES_BY_NAME[name]
        kernels = case_kernels(r.tokens, r.d_model, r.hidden, r.d_out, r.experts, r.top_k, r.glu, device=device,
                               dtype=dtype, interpret=interpret)
        log(f"\n{name}: each grouped kernel of a training step alone, against torch.mm of the same FLOPs")
        log(f"  {'kernel':8s} {'m x k x n':>20s} {'us':>8s} {'TFLOP/s':>8s} {'mm us':>8s} {'x mm':>6s}")
        rows = {}
        for kernel in (*GEMMS, *WEIGHT_GRADS):
            launch, (m, k, n) = kernels[kernel]
            a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
            ours_ms, mm_ms = time_device(launch, TIMING_ITERS), time_device(lambda: torch.mm(a, b), TIMING_ITERS)
            tflops = 2 * m * k * n / ours_ms / 1e9
            rows[kernel] = {"mkn": [m, k, n], "us": round(1e3 * ours_ms, 1), "tflops": round(tflops, 1),
                            "mm_us": round(1e3 * mm_ms, 1), "x_mm": round(ours_ms / mm_ms, 2)}
            log(f"  {kernel:8s} {f'{m} x {k} x {n}':>20s} {1e3 * ours_ms:8.1f} {tflops:8.1f} {1e3 * mm_ms:8.1f} "
                f"{ours_ms / mm_ms:6.2f}")
        result[name] = rows
        del kernels
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def kernel_breakdown(log: Log) -> dict:
    """GPU time per kernel of one training step (forward + backward, bf16, triton) from torch.profiler:
    says whether a step is bound by its kernels or by the host, and by which kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import MODES_BY_NAME, PEERS_BY_NAME, REGIMES, make_problem, make_step

    result = {}
    for regime in (r for r in REGIMES if r.name in ("cumo-clip", "fine-grained")):
        problem = make_problem(regime, MODES_BY_NAME["train-bf16"], torch.device("cuda"))
        step = make_step(PEERS_BY_NAME["cumo-triton"].build(problem), problem)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        kernels = {}  # each event's own GPU time: kernels (and memsets/copies), never the CPU ops around them
        for event in prof.key_averages():
            device_us = getattr(event, "self_device_time_total", 0)
            if device_us > 0:
                kernels[event.key[:90]] = round(device_us / 5, 1)
        top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:14])
        result[regime.name] = {"kernel_us_per_step": top, "total_us_per_step": round(sum(kernels.values()), 1)}
        total = result[regime.name]["total_us_per_step"]
        log(f"\nkernels of one {regime.name} train-bf16 step (triton), us: total {total}")
        for name, us in top.items():
            log(f"  {us:9.1f}  {name}")
        del problem
    return result


def host_profiles(log: Log, out: Path) -> dict:
    """For the next change of the host path, written beside the log: cProfile of the Triton host path
    (``benchmarks.host_profile``: decode and small-batch forwards and a fine-grained training step) and a
    torch.profiler timeline (CPU ops, CUDA runtime calls, kernels) of five fine-grained training steps of the layer."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.host_profile import CASES, profile_case
    from cumo_layers import SparseMoEMLP

    text = [f"=== {name}\n{profile_case(*case, device='cuda', top=40)}" for name, case in CASES.items()]
    (out / "host_profile.txt").write_text("\n".join(text))
    layer = SparseMoEMLP(1024, 512, num_experts=64, top_k=8, activation="silu", glu=True, bias=False,
                         backend="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        (layer(x).float().pow(2).mean() + layer.last_aux_loss).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace_fine_grained_train.json"))
    log("host profiles: host_profile.txt, trace_fine_grained_train.json")
    return {"files": ["host_profile.txt", "trace_fine_grained_train.json"]}
