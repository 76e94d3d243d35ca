"""cumo-moe layers: SparseMoEMLP, TopKRouter, co-upcycling of dense MLPs, aux losses."""

from cumo_layers.load_report import ExpertLoadReport, record_expert_load
from cumo_layers.moe import SparseMoEMLP, aux_loss
from cumo_layers.parallel import expert_parallel
from cumo_layers.router import RouterOutput, TopKRouter, balance_loss, cumo_balance_loss, expert_load, z_loss
from cumo_layers.serialization import load_upcycled, save_upcycled
from cumo_layers.transformers import register_transformers
from cumo_layers.upcycle import upcycle, upcycle_model

__all__ = [
    "ExpertLoadReport",
    "RouterOutput",
    "SparseMoEMLP",
    "TopKRouter",
    "aux_loss",
    "balance_loss",
    "cumo_balance_loss",
    "expert_load",
    "expert_parallel",
    "load_upcycled",
    "record_expert_load",
    "register_transformers",
    "save_upcycled",
    "upcycle",
    "upcycle_model",
    "z_loss",
]
