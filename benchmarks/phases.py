"""``python -m benchmarks.phases``: where the time of the ``cpu`` backend goes, phase by phase.

Runs one regime and mode of ``benchmarks.common`` (router + gating + expert MLP, the cumo-cpu peer)
under ``torch.profiler`` and sums the named spans the C++ ops record (``cumo::gather_rows``,
``cumo::fc1``, ``cumo::activation``, ``cumo::fc2``, ``cumo::small_expert``, ``cumo::combine``,
``cumo::routing_plan``, and the backward's ``cumo::bwd_*``), plus the router matmul and the gating op.
Expert phases run on every thread at once, so their times are summed over threads: the shares,
not the milliseconds, are the result. The dense-equivalent's time is printed alongside for scale.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    MODES_BY_NAME,
    REGIMES_BY_NAME,
    cumo_backend,
    dense_equivalent,
    interleaved_times,
    make_problem,
    make_step,
    median,
)

# Spans recorded by csrc/cpu/expert_mlp.cpp, and the ATen/cumo ops around them worth a line of their own.
LEAF_SPANS = (
    "cumo::routing_plan", "cumo::gather_rows", "cumo::fc1", "cumo::activation", "cumo::fc2",
    "cumo::small_expert", "cumo::combine", "cumo::bwd_fc2_dgrad", "cumo::bwd_activation", "cumo::bwd_wgrad",
    "cumo::bwd_fc1_dgrad",
)
OPS = ("aten::linear", "cumo::topk_gating", "cumo::expert_mlp_forward", "cumo::expert_mlp_backward")


def phase_times(step, rounds: int) -> dict[str, float]:
    """Milliseconds per call of each span (summed over threads), averaged over ``rounds`` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name in LEAF_SPANS or event.name in OPS:
            totals[event.name] += event.cpu_time_total / 1e3 / rounds
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="fine-grained", choices=sorted(REGIMES_BY_NAME))
    parser.add_argument("--mode", default="infer-bf16", choices=sorted(MODES_BY_NAME))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    regime, mode = REGIMES_BY_NAME[args.regime], MODES_BY_NAME[args.mode]
    if mode.training and not regime.train:
        parser.error(f"regime {regime.name} has no training modes")
    problem = make_problem(regime, mode)
    ours = make_step(cumo_backend("cpu")(problem), problem)
    dense = make_step(dense_equivalent(problem), problem)
    ours(), dense()
    wall = {name: median(times) * 1e3 for name, times in
            interleaved_times({"cumo-cpu": ours, "dense-equiv": dense}, args.rounds, problem.x.device).items()}
    spans = phase_times(ours, args.rounds)
    leaf_total = sum(spans.get(name, 0.0) for name in LEAF_SPANS)
    print(f"{regime.name} / {mode.name}, {torch.get_num_threads()} threads: cumo-cpu {wall['cumo-cpu']:.1f} ms, "
          f"dense-equiv {wall['dense-equiv']:.1f} ms (wall, median of {args.rounds})")
    print("\n| span | ms per call (summed over threads) | share of the spans |\n|---|---|---|")
    for name in LEAF_SPANS:
        if name in spans:
            print(f"| {name} | {spans[name]:.2f} | {100 * spans[name] / leaf_total:.1f}% |")
    print("\n| op (calling thread) | ms per call |\n|---|---|")
    for name in OPS:
        if name in spans:
            print(f"| {name} | {spans[name]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
