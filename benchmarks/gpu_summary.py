"""``python -m benchmarks.gpu_summary gpu_check.json``: a ``make gpu-check`` run as BENCHMARKS.md reports it.

The regime table (dense, cumo-triton with its host time, x dense, CUDA-graph replay, the peers, cumo's speed-up
over each) in markdown, each grouped kernel's TFLOP/s against cuBLAS's at its size, then issue 16's targets,
each MET or NOT MET with the measured value, so that every GPU run is read against the same bar the same way.
``make gpu-check`` appends it to its log.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple

from benchmarks.common import REGIMES_BY_NAME

OURS, DENSE = "cumo-triton", "dense-equiv"
PEERS = ("torch-grouped_mm", "hf-grouped_mm")  # the peers issue 16 asks cumo to beat by 2x


class Target(NamedTuple):
    what: str
    value: float | None  # measured; None when the run did not measure it
    bound: float
    unit: str
    at_least: bool = False  # a floor (speed-ups) instead of a ceiling

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def line(self) -> str:
        status = {True: "MET", False: "NOT MET", None: "not measured"}[self.met]
        value = "-" if self.value is None else f"{self.value:.3g}"
        return f"- {status}: {self.what}: {value} {self.unit} (target {'>=' if self.at_least else '<='} {self.bound:g})"


def _rows(report: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """(regime, mode) -> peer -> its timing row."""
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for row in report.get("timings", []):
        table.setdefault((row["regime"], row["mode"]), {})[row["peer"]] = row
    return table


def _ms(row: dict | None) -> float | None:
    return None if row is None else row.get("device_ms")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def regime_table(report: dict) -> str:
    """The markdown table of every regime and mode the run timed."""
    lines = ["| regime | mode | dense ms | cumo-triton ms (host us) | x dense | graph ms (x dense graph) | "
             + " | ".join(f"{peer} ms" for peer in PEERS) + " | " + " | ".join(f"x {peer}" for peer in PEERS) + " |",
             "|" + "---|" * (6 + 2 * len(PEERS))]
    for (regime, mode), peers in _rows(report).items():
        dense, ours = peers.get(DENSE), peers.get(OURS)
        if ours is None or _ms(ours) is None:
            continue
        graph = ""
        if ours.get("graph_ms") is not None:
            dense_graph = dense.get("graph_ms") if dense else None
            graph = f"{ours['graph_ms']:.3f}" + (f" ({ours['graph_ms'] / dense_graph:.2f}x)" if dense_graph else "")
        peer_ms = [_ms(peers.get(peer)) for peer in PEERS]
        lines.append(f"| {regime} | {mode} | {_fmt(_ms(dense))} | {_ms(ours):.3f} ({ours['host_us']:.0f}) | "
                     f"{_fmt(_ratio(_ms(ours), _ms(dense)), 2)} | {graph} | "
                     + " | ".join(_fmt(ms) for ms in peer_ms) + " | "
                     + " | ".join(_fmt(_ratio(ms, _ms(ours)), 2) for ms in peer_ms) + " |")
    return "\n".join(lines)


def kernel_table(report: dict) -> str:
    """Each grouped kernel of a training step alone against a cuBLAS GEMM of its m x k x n (``gemm_breakdown``):
    TFLOP/s and time as a multiple of cuBLAS's, a row per regime; empty when the run did not time them."""
    gemms = report.get("gemms") or {}
    if not gemms:
        return ""
    kernels = list(next(iter(gemms.values())))
    lines = ["| regime | " + " | ".join(f"{kernel} TFLOP/s (x mm)" for kernel in kernels) + " |",
             "|" + "---|" * (1 + len(kernels))]
    for regime, rows in gemms.items():
        lines.append(f"| {regime} | " + " | ".join(f"{rows[k]['tflops']:.0f} ({rows[k]['x_mm']:.2f})" if k in rows
                                                   else "" for k in kernels) + " |")
    return "\n".join(lines)


def targets(report: dict) -> list[Target]:
    """Issue 16's targets against this run."""
    rows = _rows(report)

    def ours(regime: str, mode: str = "infer-bf16") -> float | None:
        return _ms(rows.get((regime, mode), {}).get(OURS))

    def x_dense(regime: str, mode: str = "infer-bf16") -> float | None:
        return _ratio(ours(regime, mode), _ms(rows.get((regime, mode), {}).get(DENSE)))

    found = [Target("decode forward, eager", ours("decode"), 0.15, "ms"),
             Target("small batch (T=16) forward, eager", ours("small-batch"), 0.15, "ms"),
             Target("layer decode host time", report.get("layer_decode", {}).get("triton", {}).get("host_us"), 100,
                    "us")]
    found += [Target(f"{regime} forward, eager", x_dense(regime), bound, "x dense")
              for regime, bound in (("fine-grained", 1.5), ("cumo-clip", 1.5), ("large", 1.2))]
    found += [Target(f"{regime} training step", x_dense(regime, "train-bf16"), 2.0, "x dense")
              for regime in ("cumo-clip", "cumo-connector", "fine-grained", "large")]
    for (regime, mode), peers in rows.items():
        if regime not in REGIMES_BY_NAME or REGIMES_BY_NAME[regime].tokens > 2304:  # "at every T up to 2304"
            continue
        for peer in PEERS:
            if _ms(peers.get(peer)) is not None:
                found.append(Target(f"{regime} {mode}: speed-up over {peer}",
                                    _ratio(_ms(peers[peer]), ours(regime, mode)), 2.0, "x", at_least=True))
    return found


def summary(report: dict) -> str:
    """The table and the targets, as BENCHMARKS.md records a run."""
    met = [target.met for target in targets(report)]
    kernels = kernel_table(report)
    return "\n".join([f"{report.get('device', '?')}, {report.get('date', '?')}, {report.get('versions', {})}", "",
                      regime_table(report), "", *([kernels, ""] if kernels else []),
                      f"Issue 16's targets: {met.count(True)} met, {met.count(False)} not met, "
                      f"{met.count(None)} not measured",
                      *(target.line() for target in targets(report))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the gpu_check.json of a run")
    args = parser.parse_args(argv)
    print(summary(json.loads(args.report.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
