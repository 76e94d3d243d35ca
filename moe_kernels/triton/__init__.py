"""Triton backend (GPU, or CPU tensors under TRITON_INTERPRET=1).

The backend contract of moe_kernels.ops: ``unavailable_reason``, ``topk_gating``, ``router_losses``,
``expert_load``, ``expert_mlp``, and ``moe_mlp`` (``ops.moe_mlp`` as one launch sequence, routed once); plus
``routing_plan`` (the RoutingPlan built on device) and ``LAUNCHES`` (kernel launch counts, reset with
``reset_launch_counts``). Importing this package never requires Triton:
without it, ``unavailable_reason`` says why and every op raises.
"""

from __future__ import annotations

from collections import Counter

import torch

try:
    from moe_kernels.triton.experts import expert_mlp
    from moe_kernels.triton.gating import topk_gating
    from moe_kernels.triton.moe import moe_mlp
    from moe_kernels.triton.routing import expert_load, routing_plan
    from moe_kernels.triton.runtime import LAUNCHES
    from moe_kernels.triton.runtime import SUPPORTED_DTYPES as DTYPES
    from moe_kernels.triton.runtime import unavailable_reason as _unavailable_reason
    from moe_kernels.triton.losses import router_losses

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton missing or broken
    _IMPORT_ERROR = f"cannot import triton: {exc}"
    LAUNCHES = Counter()

    def _unavailable(*args, **kwargs):
        from moe_kernels.ops import BackendUnavailableError

        raise BackendUnavailableError(f"backend 'triton' cannot run: {_IMPORT_ERROR}")

    expert_load = expert_mlp = moe_mlp = router_losses = routing_plan = topk_gating = _unavailable


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton kernels can run on tensors of ``device``, else a sentence saying why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    return _unavailable_reason(torch.device(device))


def reset_launch_counts() -> None:
    LAUNCHES.clear()


__all__ = ["DTYPES", "LAUNCHES", "expert_load", "expert_mlp", "moe_mlp", "reset_launch_counts", "router_losses",
           "routing_plan", "topk_gating", "unavailable_reason"]
