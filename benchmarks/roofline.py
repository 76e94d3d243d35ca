"""``python -m benchmarks.roofline``: FLOPs, bytes moved and the roofline time of each MoE kernel on an
H100 (990 TFLOP/s dense bf16, 3.35 TB/s HBM3) for the regimes of benchmarks.common. A model, not a
measurement: time = max(FLOPs / peak FLOP/s, bytes / bandwidth) per kernel, bf16 activations and
weights, int64 routing ids, each kernel reading its inputs from and writing its outputs to HBM once.
"""

from __future__ import annotations

from typing import NamedTuple

from benchmarks.common import REGIMES, Regime

H100_FLOPS = 990e12
H100_BYTES_PER_S = 3.35e12
BF16, INDEX, FP32 = 2, 8, 4


class Kernel(NamedTuple):
    name: str
    flops: float
    bytes: float

    @property
    def seconds(self) -> float:
        return max(self.flops / H100_FLOPS, self.bytes / H100_BYTES_PER_S)

    @property
    def bound(self) -> str:
        return "compute" if self.flops / H100_FLOPS >= self.bytes / H100_BYTES_PER_S else "memory"


def touched_experts(regime: Regime) -> float:
    """Expected distinct experts hit by T tokens routed uniformly at random to K of E experts."""
    return regime.experts * (1 - (1 - regime.top_k / regime.experts) ** regime.tokens)


def kernels(regime: Regime) -> list[Kernel]:
    t, d, h, o, e, k = regime.tokens, regime.d_model, regime.hidden, regime.d_out, regime.experts, regime.top_k
    h1 = 2 * h if regime.glu else h
    rows = t * k
    w1_bytes = touched_experts(regime) * h1 * d * BF16
    w2_bytes = touched_experts(regime) * o * h * BF16
    return [
        # router GEMM fused with softmax + top-k: logits stay on chip.
        Kernel("router + top-k gating", 2 * t * d * e, t * d * BF16 + e * d * BF16 + rows * (FP32 + INDEX)),
        # histogram + scan + stable counting sort: reads the ids, writes the order and its inverse.
        Kernel("routing plan", 0, rows * INDEX * 3 + (e + 1) * INDEX),
        # gathers each (token, slot) row of x, writes the activated hidden rows in expert order.
        Kernel("fc1 grouped GEMM + gather + act", 2 * rows * d * h1, rows * d * BF16 + w1_bytes + rows * h * BF16),
        # writes expert-sorted output rows, then the deterministic weighted sum over k reads them back.
        Kernel("fc2 grouped GEMM + weighted combine", 2 * rows * h * o + 2 * rows * o,
               rows * h * BF16 + w2_bytes + 2 * rows * o * BF16 + t * o * BF16),
        # dgrad (d hidden = d rows @ W2) and wgrad (dW2 = d rows^T @ hidden); the activation's backward
        # reads the saved pre-activation. Weight gradients are written for the touched experts only.
        Kernel("bwd fc2: dgrad + wgrad", 4 * rows * h * o,
               rows * o * BF16 + rows * h * BF16 + rows * h1 * BF16 + w2_bytes + rows * h1 * BF16 + w2_bytes),
        # dgrad (d x rows = d h1 @ W1, then summed over k) and wgrad (dW1 = d h1^T @ gathered x).
        Kernel("bwd fc1: dgrad + wgrad", 4 * rows * h1 * d,
               2 * rows * h1 * BF16 + rows * d * BF16 + w1_bytes + 2 * rows * d * BF16 + t * d * BF16
               + w1_bytes),
    ]


def dense_equivalent(regime: Regime) -> Kernel:
    t, d, h, o, k = regime.tokens, regime.d_model, regime.hidden, regime.d_out, regime.top_k
    h1 = 2 * h if regime.glu else h
    flops = 2 * t * d * k * h1 + 2 * t * k * h * o
    return Kernel("dense-equivalent forward (2 GEMMs)", flops,
                  t * d * BF16 + k * (h1 * d + o * h) * BF16 + 2 * t * k * h * BF16 + t * o * BF16)


def table() -> str:
    lines = ["| regime | kernel | GFLOP | MB moved | FLOP/byte | roofline us | bound |", "|---|---|---|---|---|---|---|"]
    for regime in REGIMES:
        rows = kernels(regime) if regime.train else kernels(regime)[:4]
        forward = rows[:4]
        summary = [
            Kernel("= MoE forward", sum(r.flops for r in forward), sum(r.bytes for r in forward)),
            Kernel("= MoE training step", sum(r.flops for r in rows), sum(r.bytes for r in rows)),
            dense_equivalent(regime),
        ]
        if not regime.train:
            del summary[1]
        for kernel in rows + summary:
            seconds = sum(r.seconds for r in forward) if kernel.name == "= MoE forward" else (
                sum(r.seconds for r in rows) if kernel.name == "= MoE training step" else kernel.seconds)
            bound = "sum of kernels" if kernel.name.startswith("=") else kernel.bound
            lines.append(f"| {regime.name} | {kernel.name} | {kernel.flops / 1e9:.3f} | {kernel.bytes / 1e6:.2f} | "
                         f"{kernel.flops / kernel.bytes:.1f} | {1e6 * seconds:.1f} | {bound} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
