"""``make gpu-check`` (``python3 -m benchmarks.gpu_check``): everything one scarce GPU run must tell.

On a bare GPU machine with a preinstalled torch and no internet, in this order, each phase bounded:
  1. build the CUDA extension for the local architecture only (the CPU extension is skipped), and
     probe a raw op's error path (a bad argument must raise, not crash the process);
  2. the host time of the whole ``SparseMoEMLP`` layer at decode (router included), and every regime
     timed against the dense-equivalent MLP, plain ``torch._grouped_mm`` and transformers' experts:
     device time (CUDA events), host time per call (calls issued without a sync, so a host-bound
     path shows its Python cost), and CUDA-graph replay time (inference); the GPU time per kernel of
     a training step, each grouped kernel alone against a cuBLAS GEMM of its FLOPs, a cProfile of the
     host path and a timeline of training steps;
  3. the GPU tests (``pytest -m gpu -n 4``, fixed tile tables, no autotuning), each result in the log;
  4. every backend validated against the reference (``benchmarks.gpu --validate-only``).
Writes ``gpu_check.log`` (everything printed), ``gpu_check.json``, ``host_profile.txt`` and
``trace_fine_grained_train.json`` to ``$OUT`` if set, else ``benchmarks/out/``. Exit status 1 if a
build, test or validation failed.

``--quick`` (under 3 minutes, for a check in the middle of a change): no CUDA build, so no ``cuda``
backend; the timings and the GPU tests of everything else; no validation phase. ``--tune-s 150``
first tunes the tile tables for this GPU (``benchmarks.tune_tiles``) and measures with them; the table
comes back as ``tuned_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Seconds per phase (the whole run must stay under 8 minutes).
BUILD_S, TESTS_S, VALIDATE_S, TIMING_S = 90, 150, 70, 120
QUICK_TIMING_S, QUICK_TESTS_S = 60, 100
TIMED_PEERS = ["dense-equiv", "cumo-triton", "cumo-cuda", "torch-grouped_mm", "hf-grouped_mm"]
TIMING_ITERS = 20


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "w", buffering=1)

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")


def run_phase(log: Log, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one phase as a subprocess, its output streamed into the log; a phase past its time is killed."""
    log(f"\n=== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # Fires even if the phase hangs without printing; kills the phase's whole process group.
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines: list[str] = []
    for line in proc.stdout:  # streamed, so a killed phase still leaves what it printed
        lines.append(line.rstrip())
        log.file.write(line)
    proc.wait()
    timed_out = not watchdog.is_alive() and proc.returncode != 0
    watchdog.cancel()
    seconds = time.perf_counter() - start
    tail = [text for text in lines if "FAIL" in text or "Error" in text or " passed" in text or " failed" in text][-40:]
    for line in tail:
        print(line)
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    log(f"=== {name}: {status} in {seconds:.0f} s")
    return {"status": status, "seconds": round(seconds, 1), "summary": tail[-15:]}


# A bad argument to a raw CUDA op must raise a Python error, never kill the process (the 2026-11-26
# H200 runs: TORCH_CHECK in the extension ended in a segfault there, not here).
ERROR_PATH_PROBE = (
    "import torch, moe_kernels.cuda\n"
    "idx = torch.zeros(3, 2, dtype=torch.long, device='cuda')\n"
    "try:\n"
    "    torch.ops.cumo_cuda.routing_plan(idx, 0)\n"
    "except RuntimeError as exc:\n"
    "    print('raised:', str(exc).splitlines()[0])\n"
)
TOOLCHAIN_PROBE = ("import torch, sysconfig; print('torch cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI); "
                   "print('CXX', sysconfig.get_config_var('CXX'), '| LDSHARED', sysconfig.get_config_var('LDSHARED'))")


def error_path(log: Log, python: str, build_env: dict) -> dict:
    """Probe the raw op's error path; if it crashes, report the toolchain and retry with the system g++."""
    result = {"default": run_phase(log, "error path", [python, "-X", "faulthandler", "-c", ERROR_PATH_PROBE], 60)}
    if result["default"]["status"] == "ok":
        return result
    toolchain = f"which -a g++ c++; g++ --version | head -1; {python} -c \"{TOOLCHAIN_PROBE}\""
    run_phase(log, "toolchain", ["bash", "-c", toolchain], 30)
    if Path("/usr/bin/g++").exists():
        env = {**build_env, "CXX": "/usr/bin/g++", "CC": "/usr/bin/gcc"}
        result["rebuild"] = run_phase(log, "rebuild with /usr/bin/g++",
                                      [python, "setup.py", "build_ext", "--inplace", "--force"], BUILD_S, env=env)
        result["system_gxx"] = run_phase(log, "error path (system g++)",
                                         [python, "-X", "faulthandler", "-c", ERROR_PATH_PROBE], 60)
    return result


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


def tune_tiles(log: Log, python: str, out: Path, budget_s: float) -> dict:
    """benchmarks.tune_tiles as a phase, its table installed in this checkout's moe_kernels/triton/tuned/
    so that every later phase launches with it (the file in $OUT is the one to commit)."""
    import torch

    from moe_kernels.triton import tiles

    result = run_phase(log, "tune tiles", [python, "-m", "benchmarks.tune_tiles", "--budget-s", str(budget_s)],
                       budget_s + 120, env={"OUT": str(out)})
    name = tiles.tuned_name(torch.cuda.get_device_name())
    table = out / f"tuned_{name}.json"
    if result["status"] == "ok" and table.exists():
        tiles.load_tables(table)  # refuses a malformed table before anything launches with it
        tiles.TUNED_DIR.mkdir(exist_ok=True)
        (tiles.TUNED_DIR / f"{name}.json").write_text(table.read_text())
        tiles.reload_tables()
        log(f"tuned table installed: {tiles.TUNED_DIR / (name + '.json')}")
    return result


def save(out: Path, report: dict) -> None:
    """After every phase: a run cut short still leaves what it measured."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no CUDA build and no validation (about 3 minutes)")
    parser.add_argument("--tune-s", type=float, default=0.0,
                        help="first tune the tile tables for this GPU for up to this many seconds "
                             "(benchmarks.tune_tiles) and measure with them; the table comes back beside the log")
    args = parser.parse_args(argv)
    quick = args.quick
    out = out_dir()
    log = Log(out / "gpu_check.log")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick}
    import torch

    if not torch.cuda.is_available():
        log("gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return 2
    major, minor = torch.cuda.get_device_capability()
    import triton

    report["device"] = torch.cuda.get_device_name()
    report["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    log(f"gpu-check on {report['device']} (sm_{major}{minor}); {report['versions']}")
    python = sys.executable
    phases = ["tests"] if quick else ["build", "tests", "validate"]
    if not quick:
        build_env = {"CUMO_SKIP_CPU": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
                     "MAX_JOBS": str(os.cpu_count() or 8)}
        report["build"] = run_phase(log, "build", [python, "setup.py", "build_ext", "--inplace"], BUILD_S,
                                    env=build_env)
        report["error_path"] = error_path(log, python, build_env)
        save(out, report)
    if args.tune_s > 0:
        report["tune"] = tune_tiles(log, python, out, args.tune_s)
        save(out, report)
    log("\n=== timing")
    start = time.perf_counter()
    try:
        report["layer_decode"] = layer_host_time(log, ("triton",) if quick else ("triton", "cuda"))
        report["layer_training"] = layer_training_time(log)
        peers = [p for p in TIMED_PEERS if not (quick and p == "cumo-cuda")]
        report["timings"] = timings(log, start + (QUICK_TIMING_S if quick else TIMING_S), peers=peers)
        report["kernels"] = kernel_breakdown(log)
        report["gemms"] = gemm_breakdown(log)
    except Exception as exc:
        log(f"timing failed: {type(exc).__name__}: {exc}")
        report["timing_error"] = str(exc)
    try:
        report["host_profiles"] = host_profiles(log, out)
    except Exception as exc:  # reported, never hidden; the tests still run
        log(f"host profiles failed: {type(exc).__name__}: {exc}")
        report["host_profiles"] = {"failed": str(exc)}
    log(f"=== timing: {time.perf_counter() - start:.0f} s")
    save(out, report)
    # xdist replaces a crashed worker and goes on, so one fatal test cannot hide the rest.
    report["tests"] = run_phase(
        log, "gpu tests", [python, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfE", "-n", "4",
                           "--continue-on-collection-errors", *(["-k", "not cuda"] if quick else []), "tests"],
        QUICK_TESTS_S if quick else TESTS_S)
    save(out, report)
    if not quick:
        report["validate"] = run_phase(log, "validate", [python, "-m", "benchmarks.gpu", "--validate-only"],
                                       VALIDATE_S)
        save(out, report)
    failed = [phase for phase in phases if report[phase]["status"] != "ok"]
    log(f"\ngpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all phases passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
