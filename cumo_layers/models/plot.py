"""One figure per run: the training loss of every stage, and each MoE layer's expert load over steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOAD_PANEL_COLUMNS = 4


def plot_run(histories: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "CuMo recipe") -> Path:
    """histories: stage name -> history (recipe.train_stage); writes a PNG to ``path`` and returns it.

    Top row: the CE loss per step (dotted: CE + aux where a stage has MoE blocks), one curve per stage (stages side by side on one step axis for the recipe,
    ablation runs overlaid from the step where stage 3 starts). Below: one panel per MoE layer of every
    stage that has one, each expert's share of the assignments per step (1/E is a balanced router).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [(stage, layer, shares) for stage, h in histories.items() for layer, shares in h["expert_load"].items()]
    rows = 1 + -(-len(loads) // LOAD_PANEL_COLUMNS)
    figure = plt.figure(figsize=(4 * LOAD_PANEL_COLUMNS, 3.2 * rows), layout="constrained")
    grid = figure.add_gridspec(rows, LOAD_PANEL_COLUMNS)
    loss_axes = figure.add_subplot(grid[0, :])
    offset = 0
    for stage, history in histories.items():
        start = offset if stage.startswith("stage") else offsets_of_stage3(histories)
        steps = range(start, start + len(history["loss"]))
        line, = loss_axes.plot(steps, history["ce_loss"], label=f"{stage} (lr {history['lr']:g})", linewidth=1)
        if history["aux_losses"]:
            loss_axes.plot(steps, history["loss"], color=line.get_color(), linestyle=":", linewidth=0.8)
        if stage.startswith("stage"):
            offset += len(history["loss"])
    loss_axes.set(xlabel="step", ylabel="CE loss (dotted: CE + aux)", yscale="log", title=title)
    loss_axes.legend(fontsize=8)
    for i, (stage, layer, shares) in enumerate(loads):
        axes = figure.add_subplot(grid[1 + i // LOAD_PANEL_COLUMNS, i % LOAD_PANEL_COLUMNS])
        per_expert = list(zip(*shares))
        for expert, series in enumerate(per_expert):
            axes.plot(series, linewidth=0.8, label=f"expert {expert}")
        axes.axhline(1 / len(per_expert), color="grey", linestyle=":", linewidth=0.8)
        axes.set(title=f"{stage}: {layer}", xlabel="step", ylabel="share of assignments", ylim=(0, 1))
        axes.title.set_fontsize(8)
        if i == 0:
            axes.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def offsets_of_stage3(histories: dict[str, dict[str, Any]]) -> int:
    """The step where the third stage starts (after stages 1 and 2)."""
    return sum(len(histories[s]["loss"]) for s in ("stage1", "stage2") if s in histories)
