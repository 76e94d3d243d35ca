"""``python -m benchmarks.report``: every regime of DESIGN.md against every peer, in one process.

Per (regime, mode) case: fresh weights shared by all peers; one warm-up call per peer whose output
is checked against the reference backend's; then rounds of one call per peer, round-robin, and the
median per peer; then one call per peer under the memory profiler. Prints a table of times, ratios
to the dense-equivalent MLP (and to HF eager, and to the weight-read floor for memory-bound regimes)
and peak memory, checks the targets, and writes PNG bar plots, a ratio-only Markdown table and JSON
under --out. Cases run in priority order inside a time budget; what the budget leaves out is listed.
Exit status 1 when one of our backends fails or disagrees with the reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from benchmarks.common import (
    DENSE_PEER,
    MAX_CALL_S,
    MODES_BY_NAME,
    PEERS_BY_NAME,
    REGIMES,
    REGIMES_BY_NAME,
    Mode,
    REFERENCE_PEER,
    PeerSkipped,
    Regime,
    cumo_backend,
    disagreement,
    interleaved_times,
    make_problem,
    make_step,
    median,
    peak_memory_bytes,
    peers_for,
    read_bandwidth,
    regime_modes,
    weight_floor_bytes,
)

TIME_BUDGET_S = 420.0  # cases start only within it; with the last case's overrun the report stays < 10 min
MIN_ROUNDS, MAX_ROUNDS = 3, 15
HF_EAGER = "hf-eager"
HF_PEERS = ("hf-eager", "hf-grouped_mm", "hf-batched_mm")

# The cases that carry a target run first, so a tight budget drops the others.
PRIORITY = [
    ("fine-grained", "infer-bf16"),
    ("small-batch", "infer-bf16"),
    ("decode", "infer-bf16"),
    ("cumo-clip", "infer-bf16"),
    ("fine-grained", "train-fp32"),
    ("cumo-connector", "infer-bf16"),
]


class Target(NamedTuple):
    regime: str
    mode: str
    metric: str  # "x_dense", "hf_eager_speedup", "x_floor", "x_fastest_hf", "mem_x_dense", "act_mem_x_dense"
    bound: float
    at_least: bool  # True: measured >= bound passes; False: measured <= bound passes


TARGETS = [
    Target("fine-grained", "infer-bf16", "hf_eager_speedup", 2.0, True),
    Target("fine-grained", "infer-bf16", "x_dense", 1.2, False),
    Target("small-batch", "infer-bf16", "hf_eager_speedup", 4.0, True),
    Target("small-batch", "infer-bf16", "x_dense", 2.0, False),
    Target("cumo-clip", "infer-bf16", "x_dense", 1.05, False),
    Target("cumo-clip", "infer-bf16", "x_fastest_hf", 1.0, False),
    Target("cumo-connector", "infer-bf16", "x_dense", 1.05, False),
    Target("decode", "infer-bf16", "x_floor", 1.2, False),
    Target("fine-grained", "train-fp32", "x_dense", 1.3, False),
    Target("fine-grained", "infer-bf16", "mem_x_dense", 1.3, False),
    Target("cumo-clip", "infer-bf16", "mem_x_dense", 1.3, False),
    # Training peak memory without the parameter gradients, which are E/k times the dense's by construction.
    Target("fine-grained", "train-fp32", "act_mem_x_dense", 1.3, False),
]


@dataclass
class PeerResult:
    status: str  # "ok" | "skipped" | "failed" | "too slow" | "wrong"
    reason: str = ""
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    # Bytes of the parameter gradients a training step must leave (its output, not a workspace):
    # the router and all E experts for a MoE, the two weights for the dense equivalent; 0 in inference.
    param_grad_bytes: int = 0
    error: float | None = None

    @property
    def activation_bytes(self) -> int | None:
        """Peak memory less the parameter gradients: activations, workspaces, outputs and x's gradient."""
        return None if self.peak_bytes is None else self.peak_bytes - self.param_grad_bytes

    @property
    def seconds(self) -> float | None:
        return median(self.times) if self.times else None


@dataclass
class CaseResult:
    regime: str
    mode: str
    rounds: int
    floor_s: float | None
    peers: dict[str, PeerResult]

    def ratio(self, peer: str, other: str, what: str = "seconds") -> float | None:
        a, b = self.peers.get(peer), self.peers.get(other)
        if a is None or b is None:
            return None
        x, y = {"seconds": (a.seconds, b.seconds), "peak": (a.peak_bytes, b.peak_bytes),
                "activation": (a.activation_bytes, b.activation_bytes)}[what]
        return x / y if x and y else None


def run_case(regime: Regime, mode: Mode, peer_names: list[str], device: torch.device, case_budget_s: float,
             deadline: float, max_call_s: float, bandwidth: float, measure_memory: bool) -> CaseResult:
    """One case. Rounds: as many as ``case_budget_s`` pays for (MIN_ROUNDS to MAX_ROUNDS), fewer (down
    to one) only when MIN_ROUNDS plus the memory pass would run past ``deadline`` (perf_counter)."""
    problem = make_problem(regime, mode, device)
    # The reference backend's output and gradients; its call doubles as cumo-torch's warm-up.
    reference_step = make_step(cumo_backend("torch")(problem), problem)
    start = time.perf_counter()
    reference = reference_step()
    reference_s = time.perf_counter() - start
    reference_grads = {k: None if g is None else g.clone() for k, g in problem.moe_grads().items()}
    results: dict[str, PeerResult] = {}
    steps, warmup_s = {}, {}
    for name in peer_names:
        try:
            if name == REFERENCE_PEER:
                step, out, elapsed = reference_step, reference, reference_s
            else:
                step = make_step(PEERS_BY_NAME[name].build(problem), problem)
                start = time.perf_counter()
                out = step()
                elapsed = time.perf_counter() - start
        except PeerSkipped as exc:
            results[name] = PeerResult("skipped", str(exc))
            continue
        except Exception as exc:  # a peer that crashes is reported, never replaced by another
            results[name] = PeerResult("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        result = results[name] = PeerResult("ok")
        if name != DENSE_PEER:
            grads = reference_grads if name == REFERENCE_PEER else problem.moe_grads()
            result.error, wrong = disagreement(out, grads, reference, reference_grads)
            if wrong:
                result.status, result.reason = "wrong", wrong
                continue
        del out
        if elapsed > max_call_s:
            result.status, result.reason = "too slow", f"one call took {elapsed:.1f} s > {max_call_s:g} s limit"
            continue
        steps[name], warmup_s[name] = step, elapsed
    per_round = max(sum(warmup_s.values()), 1e-9)
    affordable = int((deadline - time.perf_counter()) // per_round) - (1 if measure_memory else 0)
    rounds = max(1, min(MAX_ROUNDS, max(MIN_ROUNDS, int(case_budget_s // per_round)), affordable))
    for name, times in interleaved_times(steps, rounds, device).items():
        results[name].times = times
    if measure_memory:
        for name, step in steps.items():
            problem.clear_grads()
            results[name].peak_bytes = peak_memory_bytes(step, device)
            if mode.training:
                params = problem.dense_params() if name == DENSE_PEER else problem.moe_params()
                results[name].param_grad_bytes = sum(t.numel() * t.element_size() for t in params)
    floor_s = weight_floor_bytes(problem) / bandwidth if regime.memory_bound else None
    return CaseResult(regime.name, mode.name, rounds, floor_s, results)


def case_order(regimes: list[Regime], modes: list[str]) -> list[tuple[Regime, Mode]]:
    cases = [(r, m) for r in regimes for m in regime_modes(r) if m.name in modes]
    rank = {key: i for i, key in enumerate(PRIORITY)}
    return sorted(cases, key=lambda c: rank.get((c[0].name, c[1].name), len(rank)))


def ours(case: CaseResult) -> list[str]:
    """Our backends that this case tried (timed, or failed / wrong / too slow; not skipped as unavailable)."""
    return [n for n, r in case.peers.items() if PEERS_BY_NAME[n].ours and r.status != "skipped"]


def metric(case: CaseResult, peer: str, name: str) -> float | None:
    if name == "x_dense":
        return case.ratio(peer, DENSE_PEER)
    if name == "hf_eager_speedup":
        return case.ratio(HF_EAGER, peer)
    if name == "x_floor":
        t = case.peers[peer].seconds
        return t / case.floor_s if t and case.floor_s else None
    if name == "x_fastest_hf":
        hf = [case.peers[n].seconds for n in HF_PEERS if n in case.peers and case.peers[n].seconds]
        return case.peers[peer].seconds / min(hf) if hf and case.peers[peer].seconds else None
    if name == "mem_x_dense":
        return case.ratio(peer, DENSE_PEER, "peak")
    if name == "act_mem_x_dense":
        return case.ratio(peer, DENSE_PEER, "activation")
    raise ValueError(name)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def case_table(case: CaseResult, with_times: bool) -> list[str]:
    regime = REGIMES_BY_NAME[case.regime]
    head = ["impl"] + (["ms"] if with_times else []) + ["x dense", "HF eager / impl"]
    head += ["x floor"] if regime.memory_bound else []
    training = MODES_BY_NAME[case.mode].training
    head += ["peak MiB", "mem x dense"] + (["act mem x dense"] if training else []) + ["err vs ref", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in case.peers.items():
        row = [name] + ([fmt(r.seconds and 1e3 * r.seconds, ".1f")] if with_times else [])
        row += [fmt(case.ratio(name, DENSE_PEER)), fmt(case.ratio(HF_EAGER, name))]
        if regime.memory_bound:
            row.append(fmt(r.seconds / case.floor_s if r.seconds and case.floor_s else None))
        row += [fmt(r.peak_bytes and r.peak_bytes / 2**20, ".1f"), fmt(case.ratio(name, DENSE_PEER, "peak"))]
        row += [fmt(case.ratio(name, DENSE_PEER, "activation"))] if training else []
        row += [fmt(r.error, ".1e"), "" if r.status == "ok" else f"{r.status}: {r.reason}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def case_title(case: CaseResult, with_times: bool) -> str:
    r = REGIMES_BY_NAME[case.regime]
    shape = f"T={r.tokens} D={r.d_model} H={r.hidden} O={r.d_out} E={r.experts} k={r.top_k} {r.activation}" \
            f"{' GLU' if r.glu else ''}"
    floor = f"; weight-read floor {1e3 * case.floor_s:.2f} ms" if case.floor_s and with_times else ""
    return f"### {case.regime} / {case.mode} ({shape}; median of {case.rounds} rounds{floor})"


def target_lines(cases: dict[tuple[str, str], CaseResult]) -> list[str]:
    lines = ["| target | impl | measured | met |", "|---|---|---|---|"]
    for t in TARGETS:
        label = f"{t.regime} {t.mode}: {t.metric} {'>=' if t.at_least else '<='} {t.bound:g}"
        case = cases.get((t.regime, t.mode))
        if case is None:
            lines.append(f"| {label} | - | not run | - |")
            continue
        for peer in ours(case) or ["(none of ours ran)"]:
            result = case.peers.get(peer)
            value = metric(case, peer, t.metric) if result and result.seconds else None
            if value is None:
                met = "no" if result and result.status in ("failed", "wrong") else "-"
                lines.append(f"| {label} | {peer} | {result.status if result else '-'} | {met} |")
                continue
            met = "yes" if (value >= t.bound if t.at_least else value <= t.bound) else "no"
            lines.append(f"| {label} | {peer} | {fmt(value)} | {met} |")
    return lines


def plot(cases: list[CaseResult], out_dir: str) -> list[str]:
    """One PNG per mode: bars per regime, one colour per implementation, height = time / dense-equivalent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mode in dict.fromkeys(c.mode for c in cases):
        mode_cases = [c for c in cases if c.mode == mode]
        names = [n for n in PEERS_BY_NAME if any(c.peers.get(n) and c.peers[n].seconds for c in mode_cases)]
        fig, ax = plt.subplots(figsize=(4.5 + 1.6 * len(mode_cases), 4.2))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, c in enumerate(mode_cases):
                value = c.ratio(name, DENSE_PEER)
                if value is not None:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=name, color=PEERS_BY_NAME[name].color)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(mode_cases)), [c.regime for c in mode_cases])
        ax.set_ylabel("time / dense-equivalent (lower is better)")
        ax.set_title(f"{mode}: median time / dense-equivalent MLP")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = os.path.join(out_dir, f"{mode}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine_line(bandwidth: float) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s; load average at start {load:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(r.name for r in REGIMES))
    parser.add_argument("--modes", default=",".join(MODES_BY_NAME))
    parser.add_argument("--peers", default=None, help="comma-separated; default: every peer for the device")
    parser.add_argument("--budget", type=float, default=TIME_BUDGET_S, help="seconds for the timing runs")
    parser.add_argument("--max-call", type=float, default=MAX_CALL_S, help="seconds one warm-up call may take")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    regimes = [REGIMES_BY_NAME[n] for n in args.regimes.split(",")]
    peer_names = args.peers.split(",") if args.peers else [p.name for p in peers_for(device.type)]
    if DENSE_PEER not in peer_names:
        peer_names.insert(0, DENSE_PEER)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    bandwidth = read_bandwidth(device)
    machine = machine_line(bandwidth)
    print(f"# cumo-moe benchmark report, {datetime.date.today()}\n\n{machine}\n")

    cases = case_order(regimes, args.modes.split(","))
    done: list[CaseResult] = []
    not_run: list[str] = []
    for i, (regime, mode) in enumerate(cases):
        left = args.budget - (time.perf_counter() - started)
        if left <= 0:
            not_run.append(f"{regime.name}/{mode.name}")
            continue
        case = run_case(regime, mode, peer_names, device, left / (len(cases) - i), started + args.budget,
                        args.max_call, bandwidth, not args.no_memory)
        done.append(case)
        print("\n".join([case_title(case, True), "", *case_table(case, True), ""]), flush=True)

    print("### targets\n\n" + "\n".join(target_lines({(c.regime, c.mode): c for c in done})) + "\n")
    if not_run:
        print(f"not run (time budget of {args.budget:g} s spent; pass --budget or --regimes/--modes): "
              + ", ".join(not_run))
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(machine + "\n\n")
        for case in done:
            f.write("\n".join([case_title(case, False), "", *case_table(case, False), ""]) + "\n")
        f.write("### targets\n\n" + "\n".join(target_lines({(c.regime, c.mode): c for c in done})) + "\n")
        if not_run:
            f.write(f"\nnot run (time budget): {', '.join(not_run)}\n")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"machine": machine, "bandwidth": bandwidth, "not_run": not_run,
                   "cases": [asdict(c) for c in done]}, f, indent=1)
    for path in plot(done, args.out) if done else []:
        print(f"wrote {path}")
    print(f"wrote {args.out}/report.md, {args.out}/report.json; total {time.perf_counter() - started:.0f} s")

    bad = [f"{c.regime}/{c.mode}/{n}: {r.status}: {r.reason}" for c in done for n, r in c.peers.items()
           if PEERS_BY_NAME[n].ours and r.status in ("failed", "wrong")]
    for line in bad:
        print(f"ERROR {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
