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
The log ends with ``benchmarks.gpu_summary``'s table and issue 16's targets, each MET or NOT MET.
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

from benchmarks.gpu_timing import (
    TIMED_PEERS,
    gemm_breakdown,
    host_profiles,
    kernel_breakdown,
    layer_host_time,
    layer_training_time,
    timings,
)

ROOT = Path(__file__).resolve().parent.parent
# Seconds per phase (the whole run must stay under 8 minutes).
BUILD_S, TESTS_S, VALIDATE_S, TIMING_S = 90, 150, 70, 120
QUICK_TIMING_S, QUICK_TESTS_S = 60, 100


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
    try:
        from benchmarks.gpu_summary import summary

        log(f"\n=== summary\n{summary(report)}")
    except Exception as exc:  # the log and the JSON hold every number the summary would
        log(f"summary failed: {type(exc).__name__}: {exc}")
    failed = [phase for phase in phases if report[phase]["status"] != "ok"]
    log(f"\ngpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all phases passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
