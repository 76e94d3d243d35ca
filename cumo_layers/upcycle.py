"""Co-upcycling: turn pretrained dense MLPs into SparseMoEMLP layers whose experts are copies.

CuMo (arXiv 2405.05949) starts every expert as an exact copy of the dense MLP and trains the router
from scratch. With the top-k weights renormalised to sum to 1 (``normalize_top_k=True``, the default),
every token's output is ``sum_k w_k * dense(x) = dense(x)``: right after upcycling the model computes
the same function as before, whatever the router says.

Router initialisation: the router is ``TopKRouter``'s default, PyTorch's ``nn.Linear`` init
U(-1/sqrt(in), 1/sqrt(in)) with no bias, exactly what CuMo's ``Linear(d, E, bias=False)`` gets.
No noise is added to the experts (CuMo copies exactly); they diverge through training, driven by the
router and the auxiliary losses.

Which dense MLPs are supported, and how they are recognised and checked on a probe before anything
is copied: ``cumo_layers/dense_mlp.py``. This file builds the experts and walks whole models.

Decisions a user should know:
  - Device and dtype follow the dense weights. Bias follows the dense layers; when only one of the
    two projections has a bias, the missing one becomes a zero bias (exact, but it is a new trainable
    parameter the dense model did not have).
  - Dropout with p > 0 in the dense MLP is not carried into the experts (a warning says so, once per
    call). A timm Mlp with a real ``norm`` layer, or a conv (``use_conv=True``) Mlp, is refused.
  - ``normalize_top_k=False`` or a ``capacity_factor`` break the exactness (warned once per call).
  - The parameters copy the dense ones and share no storage with them; their ``requires_grad`` is
    the MoE's default (True), as in CuMo's third stage, which trains everything.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn

from cumo_layers.dense_mlp import (  # noqa: F401  (UpcycleError and activation_name: also public here)
    MLP_CHILD_NAMES,
    SUPPORTED_MLPS,
    UpcycleError,
    activation_name,
    check_devices,
    check_forward,
    read_dense_mlp,
)
from cumo_layers.moe import SparseMoEMLP

DERIVED_ARGS = ("in_features", "hidden_features", "out_features", "activation", "glu", "bias", "device", "dtype")

Match = str | re.Pattern | Callable[[str, nn.Module], bool] | None


def _check_kwargs(kw: dict[str, Any]) -> list[str]:
    """Reject arguments that come from the dense module; return the exactness warnings."""
    clash = [name for name in DERIVED_ARGS if name in kw]
    if clash:
        raise TypeError(f"upcycle takes {clash} from the dense module; do not pass them")
    issues = []
    if not kw.get("normalize_top_k", True):
        issues.append("normalize_top_k=False: the top-k weights do not sum to 1, so the output is scaled")
    if kw.get("capacity_factor") is not None:
        issues.append(f"capacity_factor={kw['capacity_factor']}: assignments over capacity are dropped")
    return issues


def _warn_inexact(issues: list[str]) -> None:
    if issues:
        warnings.warn(
            "the upcycled model will not compute the dense model's function: " + "; ".join(issues),
            UserWarning,
            stacklevel=3,
        )


def _warn_dropout(notes: list[str]) -> None:
    if notes:
        warnings.warn(
            f"dropout is not carried into the experts (SparseMoEMLP has none): {', '.join(notes)}",
            UserWarning,
            stacklevel=3,
        )


def _upcycle(module: nn.Module, num_experts: int, top_k: int, kw: dict[str, Any]) -> tuple[SparseMoEMLP, list[str]]:
    dense = read_dense_mlp(module)
    check_devices(dense, type(module).__name__)
    check_forward(module, dense)
    hidden = dense.w2.shape[1]
    moe = SparseMoEMLP(
        dense.w1.shape[1], hidden, dense.w2.shape[0], num_experts=num_experts, top_k=top_k,
        activation=dense.activation, glu=dense.glu, bias=dense.b1 is not None,
        device=dense.w1.device, dtype=dense.w1.dtype, **kw,
    )
    with torch.no_grad():
        moe.w1.copy_(dense.w1.expand_as(moe.w1))
        moe.w2.copy_(dense.w2.expand_as(moe.w2))
        if dense.b1 is not None:
            moe.b1.copy_(dense.b1.expand_as(moe.b1))
            moe.b2.copy_(dense.b2.expand_as(moe.b2))
    moe.train(module.training)
    return moe, dense.notes


def upcycle(dense_mlp: nn.Module, num_experts: int = 4, top_k: int = 2, **kw: Any) -> SparseMoEMLP:
    """A SparseMoEMLP whose ``num_experts`` experts are copies of ``dense_mlp`` (CuMo co-upcycling).

    dense_mlp: a supported dense MLP (see ``SUPPORTED_MLPS``) mapping [..., in] -> [..., out].
    kw: further SparseMoEMLP arguments (router_jitter, normalize_top_k, balance_loss_coef,
    z_loss_coef, capacity_factor, backend); sizes, activation, GLU, bias, device and dtype come
    from the dense module. Returns a new module on the dense weights' device and dtype, in the
    dense module's train/eval mode, computing the same function as ``dense_mlp`` (exactly, up to
    fp32 rounding of the top-k weights, unless normalize_top_k=False or a capacity is set).
    Raises UpcycleError for an unsupported module or activation.
    """
    _warn_inexact(_check_kwargs(kw))
    moe, notes = _upcycle(dense_mlp, num_experts, top_k, kw)
    _warn_dropout(notes)
    return moe


def _selector(match: Match) -> Callable[[str, nn.Module], bool] | None:
    if match is None or callable(match) and not isinstance(match, re.Pattern):
        return match
    if isinstance(match, (str, re.Pattern)):
        pattern = re.compile(match)
        return lambda name, module: pattern.search(name) is not None
    raise TypeError(f"match must be None, a regex (str or re.Pattern) or a callable(name, module), got {match!r}")


def _is_supported(module: nn.Module) -> bool:
    try:
        read_dense_mlp(module)
    except UpcycleError:
        return False
    return True


def _near_misses(model: nn.Module, limit: int = 5) -> list[str]:
    """Modules that look like MLPs (a Sequential, or fc1/gate_proj/... children) but were not recognised, and why."""
    misses = []
    for name, module in model.named_modules():
        if type(module) is nn.Sequential or MLP_CHILD_NAMES & {child for child, _ in module.named_children()}:
            try:
                read_dense_mlp(module)
            except UpcycleError as exc:
                reason = str(exc).split(". Supported dense MLPs")[0]
                misses.append(f"{name or '<root>'}: {reason}")
        if len(misses) == limit:
            break
    return misses


def upcycle_model(
    model: nn.Module, num_experts: int = 4, top_k: int = 2, match: Match = None, **kw: Any
) -> nn.Module:
    """Replace dense MLPs inside ``model`` by upcycled SparseMoEMLPs, in place; returns ``model``.

    Walks the module tree top-down and does not descend into a replaced module.
    match=None: every supported dense MLP (see ``SUPPORTED_MLPS``) is replaced; other modules are
    walked into. match=regex (``re.search`` on the qualified name, e.g. ``"mlp"`` or
    ``r"layers\\.\\d+\\.mlp$"``) or callable(name, module) -> bool: exactly the selected modules
    are replaced, and a selected module that is not a supported MLP raises UpcycleError (nothing is
    skipped silently). A module object reachable under several names (shared weights) becomes one
    shared MoE. If ``model`` itself is a supported MLP (and selected), the new MoE is returned.
    Raises UpcycleError if nothing was replaced, listing the near misses. kw: as for ``upcycle``.
    """
    _warn_inexact(_check_kwargs(kw))
    select = _selector(match)
    replaced: dict[int, SparseMoEMLP] = {}
    notes: list[str] = []

    def wanted(name: str, module: nn.Module) -> bool:
        return _is_supported(module) if select is None else bool(select(name, module))

    def upcycle_one(name: str, module: nn.Module) -> SparseMoEMLP:
        if id(module) not in replaced:
            try:
                moe, found = _upcycle(module, num_experts, top_k, kw)
            except UpcycleError as exc:
                raise UpcycleError(f"{name or '<root>'}: {exc}") from None
            replaced[id(module)] = moe
            notes.extend(f"{name}.{note}" if not note.startswith("[") else f"{name}{note}" for note in found)
        return replaced[id(module)]

    def visit(parent: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter skips a module seen under an earlier name.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in replaced or wanted(name, child):
                setattr(parent, child_name, upcycle_one(name, child))
            else:
                visit(child, name)

    if _is_supported(model) and (select is None or select("", model)):
        moe = upcycle_one("", model)
        _warn_dropout(notes)
        return moe
    visit(model, "")
    if not replaced:
        if select is None:
            misses = _near_misses(model)
            seen = Counter(type(m).__name__ for m in model.modules())
            raise UpcycleError(
                f"no supported dense MLP found in {type(model).__name__} (module types: "
                f"{dict(seen.most_common(12))}); near misses: {misses or 'none'}. "
                f"Supported dense MLPs: {'; '.join(SUPPORTED_MLPS)}"
            )
        names = [n for n, _ in model.named_modules() if n][:12]
        raise UpcycleError(f"match={match!r} selected no module in {type(model).__name__}; its module names "
                           f"begin {names}")
    _warn_dropout(notes)
    return model
