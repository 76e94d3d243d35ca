"""The argument contract of the public ops, checked once before any backend runs.

``moe_kernels.ops`` calls these before it dispatches, so every backend sees the same errors for
the same bad input; the Triton launchers and the fake (meta) kernels call them too, because
``torch.ops.*`` can be called directly. The compiled C++/CUDA ops check the same contract in C++.
Errors name the argument, what it is, and what was expected: TypeError for a wrong kind or dtype,
ValueError for a wrong shape, value or device.

Shapes: T tokens, D input features, H expert hidden size (H1 = H, or 2*H with GLU), O output
features, E experts, K = top_k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_kernels.reference import GLU_KINDS, GluSpec, as_glu, check_activation

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t: object, dims: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {_shape(t)}")
    return t


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_glu(glu: object, activation: str) -> None:
    """glu: a bool (True: the plain GLU) or a ``reference.GluSpec`` whose kind is one of GLU_KINDS, with
    a finite limit > 0 for the clamped kinds, finite caps > 0 for softcapped (whose activation is
    'silu'), a finite up_offset, and the fields its kind does not use left at their defaults."""
    if not isinstance(glu, GluSpec):
        if not isinstance(glu, bool):
            raise TypeError(f"glu must be a bool or a GluSpec, got {type(glu).__name__} {glu!r}")
        return
    if glu.kind not in GLU_KINDS:
        raise ValueError(f"glu: unknown GLU kind {glu.kind!r}; expected one of {list(GLU_KINDS)}")
    check_flag("glu.interleaved", glu.interleaved)
    default = GluSpec()
    used = GLU_KINDS[glu.kind]
    for name in ("limit", "up_offset", "gate_cap", "up_cap"):
        value = getattr(glu, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"glu.{name} must be a float, got {type(value).__name__} {value!r}")
        if name not in used:
            if value != getattr(default, name):
                raise ValueError(f"glu.{name} has no meaning for kind {glu.kind!r}; leave it at its default")
            continue
        positive = name != "up_offset"
        if not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"glu.{name} must be a finite float{' > 0' if positive else ''} for kind "
                             f"{glu.kind!r}, got {value!r}")
    if glu.kind == "softcapped" and activation != "silu":
        raise ValueError(f"glu kind 'softcapped' is cap(gate) * sigmoid(gate) * cap(up), a SiLU with capped factors: "
                         f"activation must be 'silu', got {activation!r}")


def check_one_device(op: str, named: dict[str, Tensor | None], allow_meta: bool = False) -> None:
    """Every tensor on one device, and that device holds data (not meta) unless ``allow_meta``
    (the fake kernels: meta in, meta out). Fake tensors under torch.compile report the device they
    stand for, so tracing passes either way."""
    tensors = {name: t for name, t in named.items() if t is not None}
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: every tensor must be on one device, got {where}")
    if devices and next(iter(devices)).type == "meta" and not allow_meta:
        raise ValueError(
            f"{op}: got tensors on the meta device, which hold no data (a module built on meta needs its "
            "weights loaded, e.g. load_state_dict(..., assign=True), before it runs)"
        )


def _check_ids(top_k_idx: Tensor) -> None:
    _check_tensor("top_k_idx", top_k_idx, 2)
    if top_k_idx.dtype.is_floating_point or top_k_idx.dtype.is_complex or top_k_idx.dtype == torch.bool:
        raise TypeError(f"top_k_idx must hold integer expert ids (int64 or int32), got {top_k_idx.dtype}")


def check_expert_load_args(top_k_idx: Tensor, num_experts: int, allow_meta: bool = False) -> None:
    """top_k_idx: [T, K] integer; num_experts: int >= 1."""
    _check_ids(top_k_idx)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    check_one_device("expert_load", {"top_k_idx": top_k_idx}, allow_meta)


def check_logits(logits: Tensor, op: str, allow_meta: bool = False) -> None:
    """logits: [T, E] float, E >= 1, on one device."""
    _check_tensor("logits", logits, 2)
    _check_float("logits", logits)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must be [T, E] with E >= 1 experts, got shape {_shape(logits)}")
    check_one_device(op, {"logits": logits}, allow_meta)


def check_router_losses_args(logits: Tensor, balance_weights: Tensor, z_scale: float, balance_coef: float,
                             z_coef: float, balance_scale: float = 1.0, allow_meta: bool = False) -> None:
    """logits: [T, E] float, E >= 1; balance_weights: [S, E] float or integer (counts) with S >= 1 dividing T; the
    three weights and balance_scale finite real numbers."""
    check_logits(logits, "router_losses", allow_meta)
    _check_tensor("balance_weights", balance_weights, 2)
    if balance_weights.dtype.is_complex or balance_weights.dtype == torch.bool:
        raise TypeError(f"balance_weights must be float or integer (counts), got {balance_weights.dtype}")
    num_tokens, num_experts = logits.shape
    num_samples = balance_weights.shape[0]
    if balance_weights.shape[1] != num_experts or num_samples < 1 or num_tokens % num_samples:
        raise ValueError(f"balance_weights must be [S, {num_experts}] with S >= 1 dividing the {num_tokens} tokens, "
                         f"got shape {_shape(balance_weights)}")
    for name, value in (("z_scale", z_scale), ("balance_coef", balance_coef), ("z_coef", z_coef),
                        ("balance_scale", balance_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    check_one_device("router_losses", {"logits": logits, "balance_weights": balance_weights}, allow_meta)


def check_gating_args(logits: Tensor, top_k: int, normalize: bool, allow_meta: bool = False) -> None:
    """logits: [T, E] float, E >= 1; top_k: int in [1, E]; normalize: bool."""
    check_logits(logits, "topk_gating", allow_meta)
    _check_top_k(top_k, logits.shape[1])
    check_flag("normalize", normalize)


def _check_top_k(top_k: int, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__} {top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {top_k}")


def check_expert_mlp_args(
    x: Tensor,
    top_k_weights: Tensor,
    top_k_idx: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str,
    glu: bool | GluSpec,
    allow_meta: bool = False,
) -> None:
    """x: [T, D] float; top_k_weights: [T, K] float; top_k_idx: [T, K] integer (ids outside [0, E)
    are dropped, K >= 1); the experts: ``_check_experts``; all on one device."""
    _check_tensor("x", x, 2)
    _check_float("x", x)
    _check_ids(top_k_idx)
    num_tokens, top_k = top_k_idx.shape
    if num_tokens != x.shape[0]:
        raise ValueError(f"top_k_idx must be [T, K] with T = {x.shape[0]} (x's tokens), got {_shape(top_k_idx)}")
    if top_k < 1:
        raise ValueError(f"top_k_idx must be [T, K] with K >= 1, got {_shape(top_k_idx)}")
    _check_tensor("top_k_weights", top_k_weights, 2)
    _check_float("top_k_weights", top_k_weights)
    if top_k_weights.shape != top_k_idx.shape:
        raise ValueError(f"top_k_weights must be {_shape(top_k_idx)} like top_k_idx, got {_shape(top_k_weights)}")
    _check_experts(x, w1, b1, w2, b2, activation, glu)
    check_one_device("expert_mlp", {"x": x, "top_k_weights": top_k_weights, "top_k_idx": top_k_idx,
                                    "w1": w1, "b1": b1, "w2": w2, "b2": b2}, allow_meta)


def check_moe_mlp_args(x: Tensor, router_weight: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                       b2: Tensor | None, top_k: int, normalize: bool, activation: str, glu: bool | GluSpec,
                       router_input: Tensor | None = None, capacity: int | None = None, return_logits: bool = False,
                       allow_meta: bool = False) -> None:
    """x: [T, D] float; router_weight: [E, D] and router_input: [T, D] | None in x's dtype; top_k: int in [1, E];
    normalize: bool; capacity: int >= 0 | None; return_logits: bool; the experts: ``_check_experts``; all on one
    device."""
    _check_tensor("x", x, 2)
    _check_float("x", x)
    num_experts = _check_experts(x, w1, b1, w2, b2, activation, glu)
    _check_tensor("router_weight", router_weight, 2)
    if _shape(router_weight) != (num_experts, x.shape[1]):
        raise ValueError(f"router_weight must be [{num_experts}, {x.shape[1]}] (w1's experts, x's features), "
                         f"got {_shape(router_weight)}")
    if router_weight.dtype != x.dtype:
        raise TypeError(f"router_weight must have x's dtype {x.dtype}, got {router_weight.dtype}")
    if router_input is not None:
        _check_tensor("router_input", router_input, 2)
        if router_input.shape != x.shape:
            raise ValueError(f"router_input must be {list(x.shape)} like x, got {list(router_input.shape)}")
        if router_input.dtype != x.dtype:
            raise TypeError(f"router_input must have x's dtype {x.dtype}, got {router_input.dtype}")
    _check_top_k(top_k, num_experts)
    check_flag("normalize", normalize)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None (dropless) or an int >= 0 (assignments kept per expert), "
                         f"got {capacity!r}")
    check_flag("return_logits", return_logits)
    check_one_device("moe_mlp", {"x": x, "router_input": router_input, "router_weight": router_weight, "w1": w1,
                                 "b1": b1, "w2": w2, "b2": b2}, allow_meta)


def _check_experts(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str,
                   glu: bool | GluSpec) -> int:
    """w1: [E, H1, D], E >= 1; b1: [E, H1] | None; w2: [E, O, H] with H1 = H (2*H with GLU); b2: [E, O] | None;
    weights and biases in x's dtype; glu: ``check_glu``. Returns E."""
    check_activation(activation)
    check_glu(glu, activation)
    gated = as_glu(glu) is not None
    _check_tensor("w1", w1, 3)
    _check_tensor("w2", w2, 3)
    num_experts, hidden1, d_in = w1.shape
    if num_experts < 1:
        raise ValueError(f"w1 must be [E, H1, D] with E >= 1 experts, got {_shape(w1)}")
    if d_in != x.shape[1]:
        raise ValueError(f"w1 must be [E, H1, {x.shape[1]}] (x's features), got {_shape(w1)}")
    hidden = w2.shape[2]
    if w2.shape[0] != num_experts or hidden1 != (2 * hidden if gated else hidden):
        expected = f"[{num_experts}, O, {hidden1 // 2 if gated else hidden1}]"
        raise ValueError(f"w2 must be {expected} for w1 {_shape(w1)}{' with GLU' if gated else ''}, got {_shape(w2)}")
    for name, bias, rows in (("b1", b1, hidden1), ("b2", b2, w2.shape[1])):
        if bias is not None:
            _check_tensor(name, bias, 2)
            if bias.shape != (num_experts, rows):
                raise ValueError(f"{name} must be [{num_experts}, {rows}], got {_shape(bias)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    return num_experts


def double_backward_error(backend: str) -> str:
    """What every compiled backend raises on backward(create_graph=True) through expert_mlp."""
    return (
        f"expert_mlp: backend {backend!r} has first-order gradients only; a double backward "
        "(create_graph=True, e.g. a gradient penalty) needs backend='torch', which is plain autograd"
    )
