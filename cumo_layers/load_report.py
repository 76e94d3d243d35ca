"""Expert load of a whole model: how many token assignments each expert of each MoE layer received.

    with record_expert_load(model) as report:
        for batch in batches:
            model(batch)
    print(report.table())
    report.heatmap("expert_load.png")

Every module with a ``last_expert_load`` ([E] assignment counts of its last forward: SparseMoEMLP and
the expert-parallel layers) is hooked; the counts are summed over the forwards run inside the block.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn


class ExpertLoadReport:
    """Per-layer expert assignment counts, summed over the recorded forwards.

    counts: layer name -> [E] int64 (CPU). A layer that never ran has no entry.
    """

    def __init__(self) -> None:
        self.counts: dict[str, Tensor] = {}
        self.forwards: dict[str, int] = {}

    def add(self, name: str, load: Tensor) -> None:
        load = load.detach().to("cpu", torch.int64)
        self.counts[name] = self.counts[name] + load if name in self.counts else load.clone()
        self.forwards[name] = self.forwards.get(name, 0) + 1

    def shares(self) -> dict[str, Tensor]:
        """layer -> [E] float64 share of the layer's assignments each expert got (sums to 1; zeros if none)."""
        return {name: c.double() / max(int(c.sum()), 1) for name, c in self.counts.items()}

    def imbalance(self) -> dict[str, float]:
        """layer -> max / mean expert load (1.0: perfectly balanced; E: one expert takes everything)."""
        return {name: float(c.max() / c.double().mean()) if c.sum() > 0 else float("nan")
                for name, c in self.counts.items()}

    def table(self) -> str:
        """One line per layer: its counts, shares and imbalance."""
        imbalance = self.imbalance()
        lines = [f"{'layer':<40} {'assignments':>11} {'max/mean':>8}  shares per expert"]
        for name, share in self.shares().items():
            shares = " ".join(f"{s:.2f}" for s in share.tolist())
            lines.append(f"{name:<40} {int(self.counts[name].sum()):>11} {imbalance[name]:>8.2f}  {shares}")
        return "\n".join(lines)

    def heatmap(self, path: str | os.PathLike, title: str = "expert load (share of each layer's assignments)") -> Path:
        """Write a layers x experts heatmap of the shares to ``path`` (format from its suffix); returns it.
        Layers with fewer experts than the widest leave blank cells."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if not self.counts:
            raise ValueError("no expert load recorded: run the model inside record_expert_load(model)")
        shares = self.shares()
        width = max(len(s) for s in shares.values())
        grid = torch.full((len(shares), width), float("nan"), dtype=torch.float64)
        for row, share in enumerate(shares.values()):
            grid[row, : len(share)] = share
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * width + 3), max(2.5, 0.35 * len(shares) + 1.5)))
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(shares)), list(shares), fontsize=7)
        ax.set_xticks(range(width))
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label="share")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that reports its expert load (has ``last_expert_load``), by name."""
    return {name or "<root>": m for name, m in model.named_modules() if hasattr(m, "last_expert_load")}


@contextmanager
def record_expert_load(model: nn.Module) -> Iterator[ExpertLoadReport]:
    """Sum the expert load of every MoE layer of ``model`` over the forwards run inside the block.

    Raises ValueError if ``model`` has no MoE layer. The hooks are removed on exit, even on an error.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer (no module with last_expert_load)")
    report = ExpertLoadReport()

    def hook(name: str):
        def after_forward(module: nn.Module, args, output) -> None:
            if module.last_expert_load is not None:
                report.add(name, module.last_expert_load)
        return after_forward

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        yield report
    finally:
        for handle in handles:
            handle.remove()
