"""Checkpoint directories on disk: safetensors weights + a JSON config, written atomically.

The one place that writes and reads checkpoint files (the CuMo model, upcycled models, expert-parallel
slices and the ``cumo-upcycle`` CLI all go through it). A checkpoint is a directory holding
``model.safetensors`` and ``config.json``, possibly beside other files (a tokenizer, notes), which a save
keeps: ``write_checkpoint`` writes each of its two files under a temporary name in the directory and renames
it over the old one when complete, so a crash mid-write leaves the previous checkpoint (or nothing) intact.
``atomic_directory`` replaces a whole directory in one rename, for directories this package owns (a
recipe stage, a training state). Loading never unpickles; a missing, truncated or corrupt file raises
``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt, or does not match what loads it."""


@contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``destination``; on success it replaces
    ``destination`` in one rename (the old one is removed only after the new one is in place).

    On an exception the temporary directory is removed and ``destination`` is untouched.
    With ``overwrite=False`` an existing ``destination`` raises FileExistsError before anything is written.
    """
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True (or --force) to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        for path in staging.rglob("*"):  # make the bytes durable before the rename publishes them
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, retired / "old")
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_checkpoint(
    directory: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any], overwrite: bool = True
) -> Path:
    """Write ``tensors`` (safetensors) and ``config`` (JSON) into ``directory`` (created if needed), keeping every
    other file there; returns its path. Each file is written under a temporary name in the directory, flushed to
    disk, then renamed over the old one: the weights, then the config. A failure or crash while writing leaves
    the previous checkpoint as it was and no temporary file behind (the one window is between the two renames).
    With ``overwrite=False`` a directory that holds a checkpoint file already raises FileExistsError before
    anything is written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if not overwrite and any((directory / name).exists() for name in (WEIGHTS_NAME, CONFIG_NAME)):
        raise FileExistsError(f"{directory} holds a checkpoint; pass overwrite=True (or --force) to replace it")
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # before any file: a config JSON refuses fails here
    directory.mkdir(parents=True, exist_ok=True)
    staged = {name: directory / f".{name}.tmp-{uuid.uuid4().hex}" for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        save_file(contiguous, str(staged[WEIGHTS_NAME]), metadata={"format": "pt"})
        staged[CONFIG_NAME].write_text(text)
        for path in staged.values():  # the bytes durable before a rename publishes them
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for name, path in staged.items():
            os.replace(path, directory / name)
    except BaseException:
        for path in staged.values():
            path.unlink(missing_ok=True)
        raise
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a checkpoint directory; CheckpointError if it is missing or not JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_tensors(directory: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The safetensors weights of a checkpoint directory (never unpickles); CheckpointError if the file
    is missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {WEIGHTS_NAME} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None


def check_tensors_match(loaded: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    """Raise CheckpointError unless ``loaded`` has exactly the names, shapes and dtypes of ``expected``."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, tensor in expected.items():
        got = loaded[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise CheckpointError(
                f"{where}: {name} is {tuple(got.shape)} {got.dtype}, expected {tuple(tensor.shape)} {tensor.dtype}"
            )
