"""Mid-stage checkpoints: a stage interrupted after step n resumes at step n with the same batches.

``<out>/<stage>.partial/`` (written atomically, replaced every ``checkpoint_every`` steps, removed
when the stage finishes) holds the model (``model/``) and the training state (``state/``: the AdamW
moments as safetensors; the step, the schedule, the batch generator's state and the history so far
as JSON). Restoring all of it makes the resumed run take exactly the steps the uninterrupted run
would have taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cumo_layers.checkpoint import CheckpointError, atomic_directory, read_config, read_tensors, write_checkpoint
from cumo_layers.models.model import CuMoModel

PARTIAL_SUFFIX = ".partial"


def partial_directory(stage_directory: Path) -> Path:
    return stage_directory.with_name(stage_directory.name + PARTIAL_SUFFIX)


def save_partial(directory: Path, model: CuMoModel, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, batches: torch.Generator, step: int,
                 history: dict[str, Any]) -> None:
    """Write the state after ``step`` completed steps to ``directory`` (replacing an older one)."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, slots in state["state"].items() for name, value in slots.items()}
    tensors["batch_generator"] = batches.get_state()
    config = {"step": step, "param_groups": state["param_groups"], "schedule": schedule.state_dict(),
              "history": history}
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging / "model")
        write_checkpoint(staging / "state", tensors, config)


def load_partial_model(directory: Path) -> CuMoModel:
    return CuMoModel.from_pretrained(directory / "model")


def restore_partial(directory: Path, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler, batches: torch.Generator) -> tuple[int, dict]:
    """Load the optimizer, schedule and batch generator in place; returns (steps done, history so far)."""
    config = read_config(directory / "state")
    tensors = read_tensors(directory / "state")
    try:
        batches.set_state(tensors.pop("batch_generator"))
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": config["param_groups"]})
        schedule.load_state_dict(config["schedule"])
        return int(config["step"]), config["history"]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory} is not a training state this stage can resume from: {exc!r}") from None
