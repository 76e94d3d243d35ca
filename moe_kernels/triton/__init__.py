"""Triton backend (GPU, or CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the Triton kernels are not implemented yet"
