"""Save and load an upcycled model: safetensors weights + a JSON manifest of its SparseMoEMLP modules.

A saved directory (``cumo_layers.checkpoint`` format, written atomically) holds every tensor of the
model's ``state_dict`` and a manifest: which modules are SparseMoEMLP and their settings, tied tensors
(stored once), and optionally how to rebuild the base model (``base``: a transformers architecture and
config, which the ``cumo-upcycle`` CLI records). Loading puts SparseMoEMLP modules where the manifest
says into a base model built the same way as before upcycling, then loads every tensor. Everything is
read and checked (names, shapes, dtypes) before the model is touched: a missing, truncated or corrupt
file, or a base model that does not fit, raises ``CheckpointError`` and leaves the model as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cumo_layers.checkpoint import CheckpointError, check_tensors_match, read_config, read_tensors, write_checkpoint
from cumo_layers.moe import SparseMoEMLP

FORMAT = "cumo-upcycled"
FORMAT_VERSION = 1


def moe_settings(moe: SparseMoEMLP) -> dict[str, Any]:
    """The SparseMoEMLP constructor arguments that rebuild ``moe`` (without device and dtype)."""
    router = moe.router
    return {
        "in_features": moe.in_features, "hidden_features": moe.hidden_features, "out_features": moe.out_features,
        "num_experts": moe.num_experts, "top_k": moe.top_k, "activation": moe.activation, "glu": moe.glu,
        "bias": moe.b1 is not None, "router_jitter": router.jitter, "normalize_top_k": router.normalize_top_k,
        "balance_loss_coef": router.balance_loss_coef, "z_loss_coef": router.z_loss_coef,
        "balance_loss": router.balance_loss, "capacity_factor": moe.capacity_factor, "backend": moe.backend,
    }


def _untied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with each shared storage kept once (safetensors refuses shared tensors), and alias -> kept name."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        if tensor.numel() and key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            kept[name] = tensor
    return kept, aliases


def save_upcycled(
    model: nn.Module, directory: str | os.PathLike, overwrite: bool = True, base: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (any module holding SparseMoEMLPs) into ``directory``; returns its path. Its two files are
    each written atomically and other files there are kept (``checkpoint.write_checkpoint``).

    base: optional JSON-able description of how to rebuild the base model, e.g.
    ``{"architecture": "CLIPVisionModel", "config": config.to_dict()}`` (transformers), which lets
    ``load_upcycled(directory)`` run without a base model; by default a transformers model's own (its class, when
    transformers exports it, and its config), so a model loaded that way saves the same way again. Raises
    FileExistsError if ``directory`` holds a checkpoint and ``overwrite`` is False, ValueError if ``model`` holds
    no SparseMoEMLP.
    """
    modules = {name: moe_settings(m) for name, m in model.named_modules() if isinstance(m, SparseMoEMLP)}
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no SparseMoEMLP; nothing upcycled to save")
    tensors, aliases = _untied(model.state_dict())
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "moe_modules": modules, "aliases": aliases,
                "base": base if base is not None else transformers_base(model)}
    return write_checkpoint(directory, tensors, manifest, overwrite=overwrite)


def transformers_base(model: nn.Module) -> dict[str, Any] | None:
    """``{"architecture": class name, "config": config.to_dict()}`` for a transformers model whose class transformers
    exports (what ``load_upcycled`` rebuilds the base from), else None."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        return None
    try:
        import transformers
    except ImportError:
        return None
    if getattr(transformers, type(model).__name__, None) is not type(model):
        return None
    return {"architecture": type(model).__name__, "config": config.to_dict()}


def _base_from_manifest(base: dict[str, Any] | None, directory: str | os.PathLike) -> nn.Module:
    if not base or "architecture" not in base:
        raise CheckpointError(f"{directory}: the manifest does not say how to build the base model; "
                              "pass base_model_or_loader")
    import transformers

    architecture = getattr(transformers, base["architecture"], None)
    if architecture is None:
        raise CheckpointError(f"{directory}: transformers has no architecture {base['architecture']!r}")
    config = transformers.AutoConfig.for_model(**base["config"])
    return architecture(config)


def _parent(model: nn.Module, name: str, directory) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if parent is None or child not in parent._modules:
        raise CheckpointError(f"{directory}: the base model {type(model).__name__} has no module {name!r}")
    return parent, child


def load_upcycled(
    directory: str | os.PathLike,
    base_model_or_loader: nn.Module | Callable[[], nn.Module] | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a directory written by ``save_upcycled`` into a base model; returns the model.

    base_model_or_loader: the dense model as it was before upcycling (modified in place), a callable
    returning it, or None to build it from the manifest's ``base`` (transformers models). The
    manifest's modules become SparseMoEMLPs on the device and dtype of the modules they replace,
    then every tensor is loaded. Raises CheckpointError (the model untouched) for a missing,
    truncated or corrupt file, a different format, or names, shapes or dtypes that do not fit.
    """
    manifest = read_config(directory)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a {FORMAT} checkpoint (format {manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: format version {manifest.get('version')}, this code reads {FORMAT_VERSION}")
    modules, aliases = manifest.get("moe_modules"), manifest.get("aliases", {})
    if not isinstance(modules, dict) or not all(isinstance(settings, dict) for settings in modules.values()):
        raise CheckpointError(f"{directory}: the manifest's 'moe_modules' must map module names to SparseMoEMLP "
                              f"settings, got {type(modules).__name__}")
    if not isinstance(aliases, dict) or not all(isinstance(name, str) for name in aliases.values()):
        raise CheckpointError(f"{directory}: the manifest's 'aliases' must map tensor names to tensor names, "
                              f"got {type(aliases).__name__}")
    tensors = read_tensors(directory, device=device)
    for alias, name in aliases.items():
        if name not in tensors:
            raise CheckpointError(f"{directory}: tied tensor {alias!r} refers to missing {name!r}")
        tensors[alias] = tensors[name]
    if isinstance(base_model_or_loader, nn.Module):
        model = base_model_or_loader
    elif base_model_or_loader is None:
        model = _base_from_manifest(manifest.get("base"), directory)
    else:
        model = base_model_or_loader()

    replacements = []
    for name, settings in modules.items():
        parent, child = _parent(model, name, directory)
        reference = next(parent._modules[child].parameters(), None)
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        try:
            moe = SparseMoEMLP(**settings, **factory)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory}: settings of {name!r} do not build a SparseMoEMLP ({exc})") from None
        replacements.append((parent, child, name, moe))

    replaced = {name for *_, name, _ in replacements}
    expected = {
        key: value for key, value in model.state_dict().items()
        if not any(key.startswith(prefix + ".") for prefix in replaced)
    }
    for *_, name, moe in replacements:
        expected.update({f"{name}.{key}": value for key, value in moe.state_dict().items()})
    check_tensors_match(tensors, expected, str(directory))

    for parent, child, _, moe in replacements:
        moe.train(parent._modules[child].training)
        setattr(parent, child, moe)
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)
    return model
