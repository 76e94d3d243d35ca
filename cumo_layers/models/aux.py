"""CuMo's auxiliary losses per tower ("bzloss"): each tower's router losses averaged over its blocks.

Every MoE block's router leaves its unweighted balance and z losses of the last training forward in
``router.last_balance_loss`` / ``router.last_z_loss`` (the balance variant is the layer's option,
``balance_loss="cumo"`` in CuMo's third stage). A tower averages them over its blocks and over the
times it ran in one forward (the S2 scales), and the model adds
``balance_coef * balance + z_coef * z`` per tower (CuMo's scripts: 0.1 and 0.01).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cumo_layers.moe import SparseMoEMLP

DEFAULT_BALANCE_COEF = 0.1
DEFAULT_Z_COEF = 0.01
TOWERS = ("vision", "connector", "language")


class TowerLosses:
    """Collects the router losses of one tower's MoE blocks after each of its forwards."""

    def __init__(self, tower: nn.Module) -> None:
        self.blocks = [m for m in tower.modules() if isinstance(m, SparseMoEMLP)]
        self.balance: list[Tensor] = []
        self.z: list[Tensor] = []

    def collect(self) -> None:
        """Call right after the tower ran (its routers hold that run's losses)."""
        for block in self.blocks:
            if block.router.last_balance_loss is not None:
                self.balance.append(block.router.last_balance_loss)
                self.z.append(block.router.last_z_loss)

    def averages(self) -> tuple[Tensor, Tensor] | None:
        """(mean balance, mean z) over blocks and runs as fp32 scalars; None if nothing was collected."""
        if not self.balance:
            return None
        return torch.stack(self.balance).float().mean(), torch.stack(self.z).float().mean()


def weighted_aux_loss(parts: dict[str, Tensor], balance_coef: float, z_coef: float) -> Tensor | None:
    """``balance_coef * sum(*_balance) + z_coef * sum(*_z)`` over the reported parts; None if none."""
    if not parts:
        return None
    total = sum(balance_coef * v for k, v in parts.items() if k.endswith("_balance"))
    return total + sum(z_coef * v for k, v in parts.items() if k.endswith("_z"))
