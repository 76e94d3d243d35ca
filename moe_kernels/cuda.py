"""CUDA backend: loader of the compiled extension moe_kernels._cuda (csrc/cuda)."""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the CUDA kernels are not implemented yet"
