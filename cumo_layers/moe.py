"""SparseMoEMLP: a drop-in Top-K sparse Mixture-of-Experts replacement for a transformer MLP."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cumo_layers.router import (
    DEFAULT_BALANCE_LOSS_COEF,
    DEFAULT_Z_LOSS_COEF,
    TopKRouter,
    check_real,
    check_routing_args,
    store,
)
from moe_kernels import ops
from moe_kernels.reference import check_activation
from moe_kernels.routing import apply_capacity, expert_capacity


class SparseMoEMLP(nn.Module):
    """Top-K routed experts, each an MLP ``fc2(act(fc1(x)))`` (or ``down(act(gate) * up)`` with GLU).

    x: [..., in_features] float -> [..., out_features] in x.dtype. Each token goes to its top_k
    experts; their outputs are summed with the router's weights (renormalised to sum to 1 by
    default). Dropless by default; ``capacity_factor`` caps each expert at
    ``ceil(capacity_factor * T * top_k / num_experts)`` assignments and drops the rest (GShard
    priority: first choices before second choices, then token order).

    Parameters are stacked nn.Linear weights (``[out, in]`` per expert), the layout of Hugging Face
    transformers v5 expert modules:
      w1: [E, H, in] (GLU: [E, 2H, in], gate rows then up rows); b1: [E, H or 2H] or None
      w2: [E, out, H]; b2: [E, out] or None; router.weight: [E, in]
    After a training forward ``last_aux_loss`` holds ``balance_loss_coef * balance + z_loss_coef * z``
    (None in eval); ``balance_loss`` is ``"switch"`` (default) or CuMo's per-sample top-1 ``"cumo"``
    (samples: the leading dim of a [B, N, D] input). ``last_expert_load`` holds the [E] assignment
    counts of the last forward (after capacity drops).

    A forward runs as one op, ``moe_kernels.ops.moe_mlp`` (router, gating, routing and experts), unless ``router``
    has a hook (forward or backward) or is not a plain ``TopKRouter`` (a subclass with its own forward): then the
    router runs as its own module, so that the hook or the override sees every forward. The routing is counted
    once per forward: its expert load feeds the balance loss and ``last_expert_load`` (on ``triton`` it is the count
    of the routing plan that the experts, or the capacity drops, run on).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        num_experts: int = 4,
        top_k: int = 2,
        activation: str = "gelu",
        glu: bool = False,
        bias: bool = True,
        router_jitter: float = 0.0,
        normalize_top_k: bool = True,
        balance_loss_coef: float = DEFAULT_BALANCE_LOSS_COEF,
        z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
        balance_loss: str = "switch",
        capacity_factor: float | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        check_routing_args(in_features, num_experts, top_k)
        for name, value in (("hidden_features", hidden_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_activation(activation)
        ops.preload(backend)  # checks the name; imports now what torch.compile must not trace
        if capacity_factor is not None:
            check_real("capacity_factor (None = dropless)", capacity_factor, low=0.0)
            if capacity_factor == 0:
                raise ValueError("capacity_factor must be > 0 or None (dropless), got 0")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")

        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.activation = activation
        self.glu = glu
        self.capacity_factor = capacity_factor
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.router = TopKRouter(
            in_features, num_experts, top_k, normalize_top_k=normalize_top_k, jitter=router_jitter,
            balance_loss_coef=balance_loss_coef, z_loss_coef=z_loss_coef, balance_loss=balance_loss,
            backend=backend, **factory,
        )
        fc1_rows = 2 * hidden_features if glu else hidden_features
        self.w1 = nn.Parameter(torch.empty(num_experts, fc1_rows, in_features, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, out_features, hidden_features, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, fc1_rows, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        # [E] int64 assignments per expert in the last forward (after capacity drops), or None before the first.
        self.last_expert_load: Tensor | None = None
        self.reset_parameters()

    @property
    def last_aux_loss(self) -> Tensor | None:
        return self.router.last_aux_loss

    def reset_parameters(self) -> None:
        """Each expert initialised like an independent nn.Linear pair: U(+-1/sqrt(fan_in))."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)
        self.router.reset_parameters()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseMoEMLP expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"SparseMoEMLP expects a floating point input, got dtype {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"SparseMoEMLP expects input [..., {self.in_features}], got a 0-d tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SparseMoEMLP expects input [..., {self.in_features}] (in_features={self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        if x.is_meta:
            raise ValueError("SparseMoEMLP got an input on the meta device, which holds no data")
        if x.dtype != self.w1.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match the expert weights' dtype {self.w1.dtype}; "
                f"cast the module (.to({x.dtype})) or the input, or use torch.autocast"
            )

    def _checked_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
        """x and the expert weights (w1, b1, w2, b2) in the compute dtype: autocast's, when it is on."""
        self._check_input(x)
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if torch.is_autocast_enabled(x.device.type):
            compute_dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(compute_dtype)
            w1, b1, w2, b2 = (None if p is None else p.to(compute_dtype) for p in (w1, b1, w2, b2))
        return x, w1, b1, w2, b2

    def forward(self, x: Tensor) -> Tensor:
        x, w1, b1, w2, b2 = self._checked_inputs(x)
        tokens = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        # A [B, N, D] input has B samples (CuMo's balance loss is per sample); other ranks count as one.
        num_samples = x.shape[0] if x.dim() == 3 and x.shape[0] > 0 else 1
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, tokens.shape[0], self.top_k, self.num_experts)
        router = self.router
        if self._router_runs_as_module():
            out, load = self._forward_through_router(tokens, num_samples, capacity, w1, b1, w2, b2)
        else:
            router_weight = router.weight
            if router_weight.dtype != x.dtype:
                router_weight = router_weight.to(x.dtype)
            routed = ops.moe_mlp(tokens, router_weight, w1, b1, w2, b2, self.top_k, router.normalize_top_k,
                                 self.activation, self.glu, self.backend, router_input=router.jittered(tokens),
                                 capacity=capacity, return_logits=self.training)
            router.record_losses(routed.logits, routed.top_k_idx, routed.expert_load, num_samples)
            out, load = routed.out, routed.expert_load
        # Capacity keeps exactly min(count, capacity) per expert (integer counts: no autograd history).
        store(self, last_expert_load=load if capacity is None else load.clamp(max=capacity))
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def _router_runs_as_module(self) -> bool:
        """A router of another class (a subclass with its own forward) or with a hook runs as its own module, so
        that the override or the hook sees every forward; a plain TopKRouter is read for its weight and settings."""
        router = self.router
        return bool(type(router) is not TopKRouter or router._forward_hooks or router._forward_pre_hooks
                    or router._backward_hooks or router._backward_pre_hooks)

    def _forward_through_router(self, tokens: Tensor, num_samples: int, capacity: int | None, w1: Tensor,
                                b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> tuple[Tensor, Tensor]:
        """What ops.moe_mlp computes, with the router module called as such: (out, load before capacity drops)."""
        route = self.router(tokens, num_samples=num_samples, count_load=True)
        top_k_idx = route.top_k_idx
        if capacity is not None:
            top_k_idx = apply_capacity(top_k_idx, self.num_experts, capacity)
        out = ops.expert_mlp(tokens, route.top_k_weights, top_k_idx, w1, b1, w2, b2, activation=self.activation,
                             glu=self.glu, backend=self.backend)
        return out, route.expert_load

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"activation={self.activation!r}, glu={self.glu}, bias={self.b1 is not None}, "
            f"capacity_factor={self.capacity_factor}, backend={self.backend!r}"
        )


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``last_aux_loss`` over every SparseMoEMLP in ``model`` (a 0.0 tensor if none has one).

    Call after a training forward: ``loss = task_loss + aux_loss(model)``.
    """
    losses = [m.last_aux_loss for m in model.modules() if isinstance(m, SparseMoEMLP) and m.last_aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()
