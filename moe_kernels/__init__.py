"""cumo-moe kernels: reference ops, routing plans and backend dispatch (no nn.Module here)."""

from moe_kernels.ops import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    expert_load,
    expert_mlp,
    MoEOutput,
    moe_mlp,
    resolve_backend,
    router_losses,
    topk_gating,
)
from moe_kernels.routing import RoutingPlan, apply_capacity, build_routing_plan, expert_capacity

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "RoutingPlan",
    "apply_capacity",
    "available_backends",
    "build_routing_plan",
    "expert_capacity",
    "expert_load",
    "expert_mlp",
    "MoEOutput",
    "moe_mlp",
    "resolve_backend",
    "router_losses",
    "topk_gating",
]
