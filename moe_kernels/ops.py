"""Public ops and the one place where backends are chosen.

Arguments are checked here, once, against one contract (``moe_kernels.contract``) before any
backend runs, so every backend raises the same error for the same bad input. A backend is a module
exposing five functions with the reference's signatures:

    unavailable_reason(device: torch.device) -> str | None   # None: it can run on that device
    topk_gating(logits, top_k, normalize) -> (top_k_weights, top_k_idx)
    router_losses(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale) -> (balance, z, aux)
    expert_load(top_k_idx, num_experts) -> [E] int64
    expert_mlp(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu) -> y

and may expose ``moe_mlp`` (``moe_mlp`` as one launch sequence; it returns None for a call it leaves to the
five one by one, which is how ``moe_mlp`` runs on the others) and ``DTYPES``, the float dtypes its ops compute
on when not all four (``"auto"`` passes over a backend that does not take the input's dtype). Backends are
imported lazily, so a missing extension or Triton never breaks ``import``. An explicitly named backend that
cannot run raises ``BackendUnavailableError``: never a silent fallback. Only ``"auto"`` picks among them.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.contract import (
    check_expert_load_args,
    check_expert_mlp_args,
    check_gating_args,
    check_moe_mlp_args,
    check_router_losses_args,
)
from moe_kernels.reference import GluSpec
from moe_kernels.routing import apply_capacity

BACKEND_MODULES: dict[str, str] = {
    "torch": "moe_kernels.reference",
    "cpu": "moe_kernels.cpu",
    "triton": "moe_kernels.triton",
    "cuda": "moe_kernels.cuda",
}
BACKENDS = ("auto", *BACKEND_MODULES)

# "auto" tries these in order for a device type; "torch" runs everywhere.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run on the given device."""


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")


_LOADED: dict[str, ModuleType | str] = {}


def _load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be imported (cached: torch.compile
    traces the cache lookup and never reaches importlib)."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as exc:
            _LOADED[name] = f"cannot import {BACKEND_MODULES[name]}: {exc}"
    return _LOADED[name]


def preload(backend: str) -> None:
    """Import the module(s) ``backend`` may dispatch to now, not on first use: a first use inside
    torch.compile would have to trace importlib. A named backend loads itself; "auto" loads what it
    may pick on this machine (Triton and CUDA only where CUDA is available). Never raises: a backend
    that cannot load says why when it is used."""
    check_backend_name(backend)
    if backend != "auto":
        _load(backend)
        return
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device_type in device_types:
        for name in AUTO_ORDER[device_type]:
            _load(name)


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    check_backend_name(name)
    if name == "auto":
        return None
    module = _load(name)
    if isinstance(module, str):
        return module
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Every backend name -> None (runs on ``device``) or the reason it does not."""
    return {name: unavailable_reason(name, device) for name in BACKEND_MODULES}


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> ModuleType:
    """The backend module that runs ops for ``name`` on ``device``; raises if it cannot. ``"auto"`` takes the
    first of ``AUTO_ORDER`` that runs there and computes on ``dtype`` (when given: float64 on a GPU goes to
    ``torch``, where Triton and CUDA would refuse it); a backend named explicitly is that backend."""
    check_backend_name(name)
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device) is None and (
                    dtype is None or dtype in getattr(_load(candidate), "DTYPES", (dtype,))):
                return _load(candidate)  # type: ignore[return-value]
        name = "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        summary = ", ".join(f"{n}: {'ok' if r is None else r}" for n, r in available_backends(device).items())
        raise BackendUnavailableError(
            f"backend {name!r} cannot run on {device.type}: {reason}. Backends here: {summary}"
        )
    return _load(name)  # type: ignore[return-value]


def topk_gating(logits: Tensor, top_k: int, normalize: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax over the E experts (fp32), top-k (ties to the lower id), optional renormalisation.

    logits: [T, E] float -> (top_k_weights [T, K] float32 (float64 for float64 logits),
    top_k_idx [T, K] int64). A token whose logits hold NaN gets NaN weights and ids in [0, E);
    no other token changes. Differentiable in the logits. ``triton`` takes float32, float16 and bfloat16 (a
    TypeError for float64, as for its other ops).
    """
    check_gating_args(logits, top_k, normalize)
    return resolve_backend(backend, logits.device, logits.dtype).topk_gating(logits, top_k, normalize)


def expert_load(top_k_idx: Tensor, num_experts: int, backend: str = "auto") -> Tensor:
    """The assignments per expert of a routing: top_k_idx [T, K] integer -> [E] int64. Ids outside [0, E)
    (capacity drops, expert-parallel sentinels) are not counted. No host sync. The balance loss, the
    capacity and ``SparseMoEMLP.last_expert_load`` read it; ``triton`` counts in one kernel (plus a sum over
    slot blocks for large batches) where PyTorch's scatter is five.
    """
    check_expert_load_args(top_k_idx, num_experts)
    return resolve_backend(backend, top_k_idx.device).expert_load(top_k_idx, num_experts)


def router_losses(logits: Tensor, balance_weights: Tensor, z_scale: float, balance_coef: float, z_coef: float,
                  backend: str = "auto", *, balance_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The router's balance, z and weighted auxiliary loss from its logits (the math:
    ``moe_kernels.reference.router_losses``): (balance, z, aux), three scalars, float32 (float64 for
    float64 logits). Differentiable in the logits. The balance weights may be integer counts, scaled by
    ``balance_scale`` (Switch's loss is the expert load times one number: no cast or scale kernel before it).
    The ``triton`` backend runs it as two small kernels forward and one backward, where PyTorch's softmax,
    logsumexp and the loss arithmetic are about twenty kernels forward and ten backward, each a launch on the
    host's critical path.
    """
    check_router_losses_args(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)
    module = resolve_backend(backend, logits.device, logits.dtype)
    return module.router_losses(logits, balance_weights, z_scale, balance_coef, z_coef, balance_scale)


def expert_mlp(
    x: Tensor,
    top_k_weights: Tensor,
    top_k_idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str = "gelu",
    glu: bool | GluSpec = False,
    backend: str = "auto",
) -> Tensor:
    """Sparse expert MLP for a given routing: y[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]).

    x: [T, D] float; top_k_weights: [T, K] float; top_k_idx: [T, K] integer (ids outside [0, E)
    are dropped: they contribute exactly zero); w1: [E, H1, D]; b1: [E, H1] | None; w2: [E, O, H];
    b2: [E, O] | None; weights in x's dtype, H1 = H (2*H with ``glu``: gate rows, then up rows)
    -> [T, O] in x.dtype. ``glu``: False, True (act(gate) * up) or a ``reference.GluSpec`` (clamped,
    softcapped, interleaved gate/up: gpt-oss and its kin); the cpu, triton and torch backends run
    every spec, cuda only the plain one. Differentiable in x, top_k_weights, w1, b1, w2, b2; double backward on
    ``torch`` only (the compiled backends raise a clear error). The full contract: ``moe_kernels.contract``; the math:
    ``moe_kernels.reference.expert_mlp``.
    """
    check_expert_mlp_args(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu)
    module = resolve_backend(backend, x.device, x.dtype)
    return module.expert_mlp(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation, glu)


class MoEOutput(NamedTuple):
    """out: [T, O] in x's dtype; top_k_weights: [T, K] float32 (float64 for float64 x); top_k_idx: [T, K] int64, the
    router's choice (before capacity drops); expert_load: [E] int64, its assignments per expert (before capacity
    drops: ``min(load, capacity)`` are kept); logits: [T, E] in x's dtype when asked for, else None."""

    out: Tensor
    top_k_weights: Tensor
    top_k_idx: Tensor
    expert_load: Tensor
    logits: Tensor | None


def moe_mlp(
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    top_k: int,
    normalize: bool = True,
    activation: str = "gelu",
    glu: bool | GluSpec = False,
    backend: str = "auto",
    *,
    router_input: Tensor | None = None,
    capacity: int | None = None,
    return_logits: bool = False,
) -> MoEOutput:
    """The whole MoE MLP, routing included: logits = router_input @ router_weight^T (in x's dtype, as ``F.linear``;
    router_input defaults to x, a jittered copy is the other use), ``topk_gating(logits, top_k, normalize)``, the
    routing's ``expert_load``, ``routing.apply_capacity`` when ``capacity`` (assignments kept per expert) is given,
    and ``expert_mlp`` of x over what is kept.

    x: [T, D] float; router_weight: [E, D] and router_input [T, D] in x's dtype; the experts as for ``expert_mlp``
    -> MoEOutput. Differentiable in x, router_input, router_weight, w1, b1, w2, b2. A backend may run it as one
    launch sequence (``triton``, eagerly: routed once, the plan its experts run on also gives the load; without
    gradients, for decode and small batches, one kernel computes the logits, the top-k and the plan: four launches
    in all, three at T*K <= E, where the ops one by one take six); otherwise the ops above run one by one.
    """
    check_moe_mlp_args(x, router_weight, w1, b1, w2, b2, top_k, normalize, activation, glu, router_input, capacity,
                       return_logits)
    module = resolve_backend(backend, x.device, x.dtype)
    fused = getattr(module, "moe_mlp", None)
    if fused is not None:
        result = fused(x, router_input, router_weight, w1, b1, w2, b2, top_k, normalize, activation, glu, capacity,
                       return_logits)
        if result is not None:
            return MoEOutput(*result)
    logits = F.linear(x if router_input is None else router_input, router_weight)
    weights, idx = module.topk_gating(logits, top_k, normalize)
    load = module.expert_load(idx, w1.shape[0])
    kept = idx if capacity is None else apply_capacity(idx, w1.shape[0], capacity)
    out = module.expert_mlp(x, weights, kept, w1, b1, w2, b2, activation, glu)
    return MoEOutput(out, weights, idx, load, logits if return_logits else None)


# Load the light backends now (Triton's import is heavy, so it stays lazy): torch.compile then
# finds them in the cache instead of tracing into importlib.
for _name in ("torch", "cpu", "cuda"):
    _load(_name)
