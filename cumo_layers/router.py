"""TopKRouter: softmax-then-top-k gating with load-balancing and z auxiliary losses."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_kernels import ops
from moe_kernels.reference import expert_load  # noqa: F401  (public here: the layer's load and losses use it)

DEFAULT_BALANCE_LOSS_COEF = 0.01
DEFAULT_Z_LOSS_COEF = 0.001
# "switch": Switch/GShard over all T*K assignments of the batch; "cumo": CuMo's per-sample top-1 variant.
BALANCE_LOSSES = ("switch", "cumo")


class RouterOutput(NamedTuple):
    """top_k_weights: [T, K] float32; top_k_idx: [T, K] int64; logits: [T, E] in x's dtype (every
    softmax and loss on them runs in float32);
    expert_load: [E] int64 assignments per expert, or None in an inference forward that did not ask
    for it (the routing's one histogram: the balance loss, the layer's capacity and its load report
    all read it; an inference forward skips it unless asked, to keep the hot path short).

    Weights and logits are float64 when the input is float64 (exact gradient checks).
    """

    top_k_weights: Tensor
    top_k_idx: Tensor
    logits: Tensor
    expert_load: Tensor


# Both balance losses are linear in the router probabilities: sum_t sum_e probs[t, e] * w[sample(t), e] with
# weights w that get no gradient. The functions below build those weights once, for the reference losses here
# and for ops.router_losses, which the router runs in training (one kernel pass on the triton backend).


def switch_balance_weights(load: Tensor, num_tokens: int, top_k: int, num_experts: int,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """[1, E]: Switch/GShard's ``E * sum_e f_e * P_e`` as ``sum_t sum_e p_te * w_e``, with f_e = load_e / (T*K)
    and P_e = mean_t p_te, so w_e = load_e * ``switch_balance_scale``. load: [E] assignments per expert
    (``expert_load``). ``ops.router_losses`` takes the load and the scale as they are (no cast or scale kernel)."""
    return (load.to(dtype) * switch_balance_scale(num_tokens, top_k, num_experts)).unsqueeze(0)


def switch_balance_scale(num_tokens: int, top_k: int, num_experts: int) -> float:
    """E / (T*K*T): Switch's balance weight of one assignment (``switch_balance_weights``)."""
    return num_experts / max(num_tokens * top_k * num_tokens, 1)


def cumo_balance_weights(top_k_idx: Tensor, num_experts: int, num_samples: int = 1,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """[S, E]: CuMo's per-sample ``E * sum_e f_e * P_e`` averaged over S samples of N tokens, with f_e the share
    of the sample's tokens whose top-1 expert is e and P_e its mean probability of e: w_se = E * top1_se / (N^2 S).
    top_k_idx: [T, K] int64, T = S * N tokens in sample order."""
    num_tokens = top_k_idx.shape[0]
    if num_samples < 1 or num_tokens % num_samples:
        raise ValueError(f"num_samples must be >= 1 and divide the {num_tokens} tokens, got {num_samples}")
    per_sample = num_tokens // num_samples
    first = top_k_idx[:, 0].reshape(num_samples, per_sample)
    top1 = torch.zeros(num_samples, num_experts, dtype=dtype, device=top_k_idx.device)
    top1.scatter_add_(1, first, torch.ones_like(first, dtype=dtype))
    return top1 * (num_experts / max(per_sample * per_sample * num_samples, 1))


def balance_loss(probs: Tensor, top_k_idx: Tensor, num_experts: int, load: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    probs: [T, E] float32 router probabilities; top_k_idx: [T, K] int64; load: [E] int64, the
    routing's ``expert_load`` when the caller has it (else counted here) -> scalar float32.
    f_e is the share of the T*K assignments that went to expert e (no gradient), P_e the mean
    probability of e. It is 1.0 for a perfectly uniform router and grows with imbalance.
    """
    counts = expert_load(top_k_idx, num_experts) if load is None else load
    weights = switch_balance_weights(counts, probs.shape[0], top_k_idx.shape[1], num_experts, probs.dtype)
    return torch.dot(weights[0], probs.sum(dim=0))


def cumo_balance_loss(probs: Tensor, top_k_idx: Tensor, num_experts: int, num_samples: int = 1) -> Tensor:
    """CuMo's balance loss: per sample ``E * sum_e f_e * P_e``, averaged over the samples.

    probs: [T, E] float32; top_k_idx: [T, K] int64, T = num_samples * N tokens in sample order
    -> scalar float32. f_e is the share of a sample's N tokens whose *top-1* expert is e (no
    gradient), P_e the sample's mean probability of e (CuMo's ``E^2 * mean_{sample,e}(P_e * f_e)``).
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    weights = cumo_balance_weights(top_k_idx, num_experts, num_samples, probs.dtype)
    return (probs.reshape(num_samples, -1, num_experts) * weights.unsqueeze(1)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``mean_t(logsumexp(logits_t)^2)`` (ST-MoE): keeps logits small.

    logits: [T, E] float -> scalar float32 (float64 for float64 logits).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Linear router (no bias) -> fp32 softmax over E -> top-k -> optional renormalisation.

    CuMo/Mixtral behaviour with ``normalize_top_k=True``: the k weights sum to 1, which is what
    makes co-upcycling exact. ``jitter`` multiplies the router's input by U(1-j, 1+j) in training
    (Switch Transformer). ``balance_loss`` picks the load-balancing loss: ``"switch"`` (all T*K
    assignments of the batch) or ``"cumo"`` (CuMo's per-sample top-1 shares; see
    ``cumo_balance_loss``). In a training forward, ``last_balance_loss`` and ``last_z_loss`` hold
    the unweighted losses and ``last_aux_loss`` their weighted sum; all three are None in eval.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        normalize_top_k: bool = True,
        jitter: float = 0.0,
        balance_loss_coef: float = DEFAULT_BALANCE_LOSS_COEF,
        z_loss_coef: float = DEFAULT_Z_LOSS_COEF,
        balance_loss: str = "switch",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_routing_args(in_features, num_experts, top_k)
        check_real("router jitter", jitter, low=0.0, high=1.0)
        check_real("balance_loss_coef", balance_loss_coef, low=0.0)
        check_real("z_loss_coef", z_loss_coef, low=0.0)
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {list(BALANCE_LOSSES)}, got {balance_loss!r}")
        ops.preload(backend)  # checks the name; imports now what torch.compile must not trace
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.jitter = jitter
        self.balance_loss_coef = balance_loss_coef
        self.z_loss_coef = z_loss_coef
        self.balance_loss = balance_loss
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self.last_balance_loss: Tensor | None = None
        self.last_z_loss: Tensor | None = None
        self.last_aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's nn.Linear default (what CuMo's router gets): U(-1/sqrt(in), 1/sqrt(in))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor, num_samples: int = 1, count_load: bool = False) -> RouterOutput:
        """x: [T, in_features] float, T = num_samples * tokens per sample in sample order (only the
        ``"cumo"`` balance loss reads the samples) -> RouterOutput. The expert load is counted in
        training, or when ``count_load``."""
        route = self.gate(x)
        if self.training or count_load:
            route = route._replace(expert_load=ops.expert_load(route.top_k_idx, self.num_experts, backend=self.backend))
        self.record_losses(route.logits, route.top_k_idx, route.expert_load, num_samples)
        return route

    def gate(self, x: Tensor) -> RouterOutput:
        """The routing alone: the logits (of x jittered, in training with jitter), their top-k weights and ids; no
        expert load (None) and no loss recorded, for a caller that counts and weighs the routing itself (the
        expert-parallel layer counts over every rank)."""
        if not x.is_floating_point():
            raise TypeError(f"TopKRouter expects a floating point input, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"TopKRouter expects input [T, {self.in_features}], got shape {tuple(x.shape)}")
        jittered = self.jittered(x)
        # The gating op reads low-precision logits and computes in fp32: no cast kernel on the hot path.
        logits = F.linear(x if jittered is None else jittered, self.weight.to(x.dtype))
        weights, idx = ops.topk_gating(logits, self.top_k, self.normalize_top_k, backend=self.backend)
        return RouterOutput(weights, idx, logits, None)

    def jittered(self, x: Tensor) -> Tensor | None:
        """The router's input in a training forward with jitter: x * U(1 - jitter, 1 + jitter); else None."""
        if not (self.training and self.jitter > 0):
            return None
        return x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)

    def record_losses(self, logits: Tensor | None, idx: Tensor | None, load: Tensor | None,
                      num_samples: int = 1) -> None:
        """What a forward leaves in ``last_*_loss``: in training the losses of this routing (logits [T, E], idx
        [T, K], load [E] from ``expert_load``); in eval None (the arguments are not read)."""
        if self.training:
            self._record_aux_losses(logits, idx, load, num_samples)
        else:
            self.clear_losses()

    def clear_losses(self) -> None:
        """``last_*_loss`` back to None (what an eval forward leaves)."""
        if self.last_aux_loss is not None:  # (a module attribute store costs microseconds: only when needed)
            self.last_balance_loss = self.last_z_loss = self.last_aux_loss = None

    def _record_aux_losses(self, logits: Tensor, idx: Tensor, load: Tensor, num_samples: int) -> None:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        num_tokens = logits.shape[0]
        if self.balance_loss == "cumo":
            weights, scale = cumo_balance_weights(idx, self.num_experts, num_samples, dtype), 1.0
        elif torch.compiler.is_compiling():  # T may be symbolic (no float argument): a tensor op, which gets fused
            weights, scale = switch_balance_weights(load, num_tokens, self.top_k, self.num_experts, dtype), 1.0
        else:  # the load as it is: the loss kernel reads the counts and scales them
            weights, scale = load.unsqueeze(0), switch_balance_scale(num_tokens, self.top_k, self.num_experts)
        losses = ops.router_losses(logits, weights, 1.0, self.balance_loss_coef, self.z_loss_coef,
                                   backend=self.backend, balance_scale=scale)
        store(self, **dict(zip(("last_balance_loss", "last_z_loss", "last_aux_loss"), losses)))

    def __getstate__(self) -> dict:
        # The last losses are graph outputs (non-leaf tensors) that copy.deepcopy and pickle refuse;
        # a copy (EMA model, snapshot) starts without them, as after an eval forward.
        state = super().__getstate__()
        state.update(last_balance_loss=None, last_z_loss=None, last_aux_loss=None)
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize_top_k={self.normalize_top_k}, jitter={self.jitter}, balance_loss={self.balance_loss!r}"
        )


def store(module: nn.Module, **values: object) -> None:
    """Set plain attributes of ``module`` (never parameters, buffers or modules: what a forward leaves, e.g. its
    losses) straight into its ``__dict__``, without nn.Module.__setattr__'s checks (microseconds a forward); under
    dynamo as module attributes, which it traces (torch 2.11's cannot trace a ``__dict__`` update); not at all under
    torch.export, whose program has no module to leave them on (it would warn that they are not buffers)."""
    if torch.compiler.is_exporting():
        return
    if torch.compiler.is_compiling():
        for name, value in values.items():
            setattr(module, name, value)
    else:
        module.__dict__.update(values)


def check_real(name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    """Raise unless ``value`` is a finite real number in [low, high) (TypeError for a non-number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value >= high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value}")


def check_routing_args(in_features: int, num_experts: int, top_k: int) -> None:
    """Raise ValueError naming the bad argument and what is expected."""
    for name, value in (("in_features", in_features), ("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
