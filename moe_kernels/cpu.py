"""CPU backend: loader of the compiled extension moe_kernels._C (csrc/cpu)."""

from __future__ import annotations

import torch

try:
    from moe_kernels import _C  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as exc:  # the package works without the extension
    _IMPORT_ERROR = exc


def unavailable_reason(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return f"the C++ extension moe_kernels._C is not built ({_IMPORT_ERROR}); run `make ext`"
    if device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type}"
    return "the CPU expert kernels are not implemented yet"
