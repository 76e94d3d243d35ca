"""CuMo's three-stage recipe from the command line (on the generated shapes task, tiny towers).

    python -m cumo_layers.models.train --out build/cumo-run             # stages 1, 2, 3
    python -m cumo_layers.models.train --out build/cumo-run --ablation  # + the ablation table
    python -m cumo_layers.models.train --steps stage3=500 --lr stage3=3e-4 --config recipe.json

Every stage writes ``<out>/<stage>/`` (checkpoint + history) and the next one starts from it; a rerun
skips the stages already there and continues an interrupted one from its last mid-stage checkpoint
(``--checkpoint-every`` steps; ``--fresh`` starts over). The settings a run used are kept in
``<out>/recipe.json``; resuming with other settings is refused. Prints per-stage loss, held-out accuracy and time, the final expert load of every MoE
layer, and writes a plot (loss per stage, expert load per MoE layer over steps) to ``<out>/recipe.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from cumo_layers.models import recipe
from cumo_layers.models.plot import plot_run
from cumo_layers.models.resume import partial_directory

CONFIG_NAME = "recipe.json"


def stage_values(kind: type, text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or name not in {s.name for s in recipe.STAGES}:
        raise argparse.ArgumentTypeError(f"expected STAGE=VALUE with STAGE one of stage1, stage2, stage3; got {text!r}")
    try:
        return name, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid {kind.__name__}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cumo_layers.models.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    defaults = recipe.RecipeConfig()
    p.add_argument("--out", help=f"run directory (default {defaults.out})")
    p.add_argument("--config", type=Path, help="JSON file of recipe settings (RecipeConfig fields); flags override it")
    p.add_argument("--steps", type=lambda t: stage_values(int, t), action="append", default=[], metavar="STAGE=N",
                   help=f"training steps of a stage, repeatable (default {defaults.steps}; ablation runs use stage3's)")
    p.add_argument("--lr", type=lambda t: stage_values(float, t), action="append", default=[], metavar="STAGE=LR",
                   help=f"peak learning rate of a stage, repeatable (default {defaults.learning_rates})")
    p.add_argument("--seed", type=int, help=f"seed of data, init and batches (default {defaults.seed})")
    p.add_argument("--batch-size", type=int, help=f"samples per step (default {defaults.batch_size})")
    p.add_argument("--train-size", type=int, help=f"generated training samples (default {defaults.train_size})")
    p.add_argument("--heldout-size", type=int, help=f"generated held-out samples (default {defaults.heldout_size})")
    p.add_argument("--shapes-per-image", type=int, choices=[1, 2, 3],
                   help=f"shapes in each generated image (default {defaults.shapes_per_image}; 2 needs binding)")
    p.add_argument("--language-model", choices=["llama", "mistral", "qwen2"], help="tiny LM family (default llama)")
    p.add_argument("--backend", help="SparseMoEMLP backend of the MoE blocks (default auto)")
    p.add_argument("--checkpoint-every", type=int,
                   help=f"steps between mid-stage checkpoints, 0 for none (default {defaults.checkpoint_every})")
    p.add_argument("--ablation", action="store_true",
                   help="also train the dense and MLP-MoE third stages from the stage-2 checkpoint and print the table")
    p.add_argument("--fresh", action="store_true", help="delete this run's stages first and start over")
    p.add_argument("--plot", type=Path, help="where to write the figure (default <out>/recipe.png)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> recipe.RecipeConfig:
    values: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    if not isinstance(values, dict):
        raise SystemExit(f"{args.config} must hold a JSON object of recipe settings")
    defaults = recipe.RecipeConfig()
    values["steps"] = {**values.get("steps", defaults.steps), **dict(args.steps)}
    values["learning_rates"] = {**values.get("learning_rates", defaults.learning_rates), **dict(args.lr)}
    for flag in ("out", "seed", "batch_size", "train_size", "heldout_size", "shapes_per_image", "language_model",
                 "backend", "checkpoint_every"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    try:
        return recipe.RecipeConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"bad recipe settings: {exc}") from None


def claim_run_directory(config: recipe.RecipeConfig, fresh: bool) -> None:
    """Start over (fresh), or check that the stages already in ``out`` were trained with these settings."""
    out = Path(config.out)
    stage_dirs = [out / s.name for s in recipe.STAGES] + [out / s.name for _, s in recipe.ABLATION]
    stage_dirs += [partial_directory(d) for d in stage_dirs]
    settings = dataclasses.asdict(config)
    if fresh:
        for directory in stage_dirs:
            shutil.rmtree(directory, ignore_errors=True)
    elif any(d.is_dir() for d in stage_dirs) and (out / CONFIG_NAME).is_file():
        before = json.loads((out / CONFIG_NAME).read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k] and k not in ("out", "checkpoint_every"))
        if changed:
            raise SystemExit(f"{out} holds stages trained with other settings ({changed}); "
                             "use another --out, or --fresh to start over")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def describe(history: dict[str, Any], skipped: bool) -> str:
    """One line per stage: CE over its first and last 10 steps, the weighted aux loss at the end, held-out results."""
    ce, total = history["ce_loss"], history["loss"]
    aux = f" + aux {mean(total[-10:]) - mean(ce[-10:]):.3f}" if history["aux_losses"] else ""
    held = history["heldout"]
    when = "skipped, read from its checkpoint; took" if skipped else "took"
    return (f"{history['stage']:<17} lr {history['lr']:<7g} steps {history['steps']:<4d} "
            f"CE {mean(ce[:10]):.3f} -> {mean(ce[-10:]):.3f}{aux}  held-out accuracy {held['accuracy']:.3f} "
            f"loss {held['loss']:.3f}  ({when} {history['seconds']:.1f} s)")


def ablation_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| model (same stage-2 start, steps, seed) | MoE blocks | held-out accuracy ± s.e. | held-out loss "
             "| train CE (last 10) | s |",
             "|---|---|---|---|---|---|"]
    for label, history in rows:
        moe = history["moe"]
        blocks = "none" if moe is None else " + ".join(p for p in ("vision", "connector") if moe[p])
        accuracy, count = history["heldout"]["accuracy"], history["heldout"]["samples"]
        error = math.sqrt(accuracy * (1 - accuracy) / count)
        lines.append(f"| {label} | {blocks} | {accuracy:.3f} ± {error:.3f} | {history['heldout']['loss']:.3f} "
                     f"| {mean(history['ce_loss'][-10:]):.3f} | {history['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns {stage name: history} of every stage run or read."""
    args = parser().parse_args(argv)
    config = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    claim_run_directory(config, args.fresh)
    splits = recipe.make_splits(config)
    print(f"CuMo recipe on the shapes task ({config.shapes_per_image} shape(s) per image): {config.train_size} "
          f"training / {config.heldout_size} held-out samples, batch {config.batch_size}, seed {config.seed}, "
          f"run directory {config.out}")
    histories: dict[str, Any] = {}
    stages = list(recipe.STAGES) + ([s for _, s in recipe.ABLATION if s not in recipe.STAGES] if args.ablation else [])
    for stage in stages:
        history, skipped = recipe.run_stage(stage, config, splits, progress=not args.no_progress)
        histories[stage.name] = history
        print(describe(history, skipped), flush=True)
    print("expert load at the end (share of each expert in its layer's assignments, mean of the last 20 steps):")
    for name, history in histories.items():
        for layer, shares in recipe.final_expert_load(history).items():
            print(f"  {name:<17} {layer:<34} " + " ".join(f"{s:.2f}" for s in shares))
    if args.ablation:
        print("ablation (third stage variants; the paper's Table 3 shape, on the toy task):")
        print(ablation_table([(label, histories[stage.name]) for label, stage in recipe.ABLATION]))
    plot = plot_run(histories, args.plot or Path(config.out) / "recipe.png")
    print(f"plot: {plot}")
    return histories


if __name__ == "__main__":
    main(sys.argv[1:])
