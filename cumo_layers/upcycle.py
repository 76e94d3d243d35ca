"""Co-upcycling: turn pretrained dense MLPs into SparseMoEMLP layers whose experts are copies.

CuMo (arXiv 2405.05949) starts every expert as an exact copy of the dense MLP and trains the router
from scratch. With the top-k weights renormalised to sum to 1 (``normalize_top_k=True``, the default),
every token's output is ``sum_k w_k * dense(x) = dense(x)``: right after upcycling the model computes
the same function as before, whatever the router says.

Router initialisation: the router is ``TopKRouter``'s default, PyTorch's ``nn.Linear`` init
U(-1/sqrt(in), 1/sqrt(in)) with no bias, exactly what CuMo's ``Linear(d, E, bias=False)`` gets.
No noise is added to the experts (CuMo copies exactly); they diverge through training, driven by the
router and the auxiliary losses.

Supported dense MLPs (recognised by their structure, then checked numerically on a small probe):
  - ``fc1 / activation_fn / fc2``: Hugging Face CLIPMLP (and SiglipMLP and the like);
  - ``fc1 / act / drop1 / norm / drop2 / fc2``: timm ``Mlp`` (``norm`` must be Identity);
  - ``nn.Sequential(Linear, activation, Linear)``: the LLaVA/CuMo connector (Dropout allowed between);
  - ``gate_proj / up_proj / down_proj + act_fn``: Llama/Mistral/Qwen2-style MLPs, which become GLU
    experts with ``w1 = [gate; up]``.

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

import functools
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cumo_layers.moe import SparseMoEMLP
from moe_kernels.reference import ACTIVATIONS, apply_activation

SUPPORTED_MLPS = (
    "fc1/activation_fn/fc2 (Hugging Face CLIPMLP, SiglipMLP)",
    "fc1/act/fc2 with drop1/norm/drop2 (timm Mlp, norm = Identity)",
    "nn.Sequential(Linear, activation, Linear) (LLaVA connector; Dropout allowed between)",
    "gate_proj/up_proj/down_proj + act_fn (Llama/Mistral/Qwen2 MLP -> GLU experts)",
)

# Arguments of SparseMoEMLP that come from the dense module and cannot be overridden.
DERIVED_ARGS = ("in_features", "hidden_features", "out_features", "activation", "glu", "bias", "device", "dtype")

# Activation modules by (top-level package, class name). Tanh-approximation variants all compute
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) and differ only in rounding.
ACTIVATION_CLASSES: dict[tuple[str, str], str] = {
    ("torch", "SiLU"): "silu",
    ("torch", "ReLU"): "relu",
    ("transformers", "GELUActivation"): "gelu",
    ("transformers", "QuickGELUActivation"): "quick_gelu",
    ("transformers", "NewGELUActivation"): "gelu_tanh",
    ("transformers", "GELUTanh"): "gelu_tanh",  # PytorchGELUTanh is an alias of this class
    ("transformers", "PytorchGELUTanh"): "gelu_tanh",  # the class's name in older releases
    ("transformers", "FastGELUActivation"): "gelu_tanh",
    ("transformers", "AccurateGELUActivation"): "gelu_tanh",
    ("transformers", "SiLUActivation"): "silu",
    ("timm", "GELU"): "gelu",
    ("timm", "GELUTanh"): "gelu_tanh",
    ("timm", "QuickGELU"): "quick_gelu",
    ("timm", "Swish"): "silu",
}
# Activation functions (act_fn may be a plain function), by identity or (package, name).
ACTIVATION_FUNCTIONS: dict[Callable, str] = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.relu: "relu",
    torch.relu: "relu",
}
ACTIVATION_FUNCTION_NAMES: dict[tuple[str, str], str] = {
    ("timm", "gelu"): "gelu",
    ("timm", "gelu_tanh"): "gelu_tanh",
    ("timm", "quick_gelu"): "quick_gelu",
    ("timm", "swish"): "silu",
}
GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}
# Child names that make a module an MLP candidate worth naming when nothing was recognised.
MLP_CHILD_NAMES = {"fc1", "fc2", "gate_proj", "up_proj", "down_proj"}

# Tolerance of the probe check (relative to the output's max magnitude). It only has to catch a
# structural mismatch (a forward that is not what the attribute names suggest), which is O(1).
PROBE_TOKENS = 8
PROBE_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
PROBE_RTOL_LOW_PRECISION = 5e-2

Match = str | re.Pattern | Callable[[str, nn.Module], bool] | None


class UpcycleError(ValueError):
    """A module cannot be upcycled (unsupported structure or activation), or nothing matched."""


class UnsupportedActivationError(UpcycleError):
    """The dense MLP's activation has no SparseMoEMLP equivalent."""


@dataclass
class DenseMLP:
    """A dense MLP read into the expert layout: y = w2 @ act(w1 @ x + b1) + b2 (GLU: w1 = [gate; up])."""

    w1: Tensor  # [H1, in]
    b1: Tensor | None  # [H1]
    w2: Tensor  # [out, H]
    b2: Tensor | None  # [out]
    activation: str
    glu: bool
    layout: str
    notes: list[str] = field(default_factory=list)

    def expert_forward(self, x: Tensor) -> Tensor:
        """x: [N, in] -> [N, out], the function every expert computes."""
        hidden = apply_activation(F.linear(x, self.w1, self.b1), self.activation, self.glu)
        return F.linear(hidden, self.w2, self.b2)


def activation_name(act: Any) -> str:
    """The SparseMoEMLP activation name of an activation module or function; raises UpcycleError."""
    if isinstance(act, nn.GELU):
        if act.approximate in GELU_APPROXIMATE:
            return GELU_APPROXIMATE[act.approximate]
    elif isinstance(act, nn.Module):
        key = (type(act).__module__.split(".")[0], type(act).__name__)
        if key in ACTIVATION_CLASSES:
            return ACTIVATION_CLASSES[key]
    elif isinstance(act, functools.partial):
        approximate = act.keywords.get("approximate", "none")
        if act.func is F.gelu and not act.args and set(act.keywords) <= {"approximate"}:
            if approximate in GELU_APPROXIMATE:
                return GELU_APPROXIMATE[approximate]
    elif callable(act):
        if act in ACTIVATION_FUNCTIONS:
            return ACTIVATION_FUNCTIONS[act]
        key = (getattr(act, "__module__", "") or "").split(".")[0], getattr(act, "__name__", "")
        if key in ACTIVATION_FUNCTION_NAMES:
            return ACTIVATION_FUNCTION_NAMES[key]
    raise UnsupportedActivationError(
        f"unsupported activation {_describe_activation(act)}; supported: {sorted(ACTIVATIONS)} as nn.GELU "
        f"(approximate 'none'/'tanh'), nn.SiLU, nn.ReLU, F.gelu/F.silu/F.relu, Hugging Face "
        f"{sorted(n for p, n in ACTIVATION_CLASSES if p == 'transformers')}, timm "
        f"{sorted(n for p, n in ACTIVATION_CLASSES if p == 'timm')}"
    )


def _describe_activation(act: Any) -> str:
    if isinstance(act, nn.Module):
        return f"{type(act).__module__}.{type(act).__qualname__} ({act!r})"
    return repr(act)


def _linear(module: nn.Module | None, what: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise UpcycleError(f"{what} is {type(module).__name__}, expected nn.Linear")
    if not module.weight.is_floating_point() or module.weight.shape != (module.out_features, module.in_features):
        raise UpcycleError(
            f"{what} holds a {module.weight.dtype} weight of shape {tuple(module.weight.shape)}; "
            "quantised or packed linear layers cannot be copied into experts"
        )
    return module


def _dropout_notes(modules: list[tuple[str, nn.Module]]) -> list[str]:
    notes = []
    for name, module in modules:
        if not isinstance(module, nn.Dropout):
            raise UpcycleError(f"{name} is {type(module).__name__}, expected nn.Dropout")
        if module.p > 0:
            notes.append(f"{name} (p={module.p})")
    return notes


def _check_children(module: nn.Module, allowed: set[str]) -> None:
    extra = [name for name, _ in module.named_children() if name not in allowed]
    if extra:
        raise UpcycleError(f"it has submodules {extra} besides {sorted(allowed)}")


def _biases(layers: list[nn.Linear]) -> list[Tensor | None]:
    """Each layer's bias; when some but not all have one, the missing ones become zeros."""
    if all(layer.bias is None for layer in layers):
        return [None] * len(layers)
    return [
        layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features) for layer in layers
    ]


def _from_fc(fc1: nn.Linear, act: Any, fc2: nn.Linear, layout: str, notes: list[str]) -> DenseMLP:
    if fc1.out_features != fc2.in_features:
        raise UpcycleError(
            f"fc1 gives {fc1.out_features} features but fc2 takes {fc2.in_features}; the forward is not "
            "fc2(act(fc1(x))) (a GLU Mlp?)"
        )
    b1, b2 = _biases([fc1, fc2])
    return DenseMLP(fc1.weight, b1, fc2.weight, b2, activation_name(act), False, layout, notes)


def read_dense_mlp(module: nn.Module) -> DenseMLP:
    """Read a supported dense MLP into the expert layout, or raise UpcycleError saying why not."""
    kind = type(module).__name__
    try:
        children = dict(module.named_children())
        if type(module) is nn.Sequential:
            layers = [(f"[{i}]", m) for i, m in enumerate(module)]
            core = [(n, m) for n, m in layers if not isinstance(m, nn.Dropout)]
            if len(core) != 3:
                raise UpcycleError(f"it has {len(core)} non-Dropout layers, expected (Linear, activation, Linear)")
            notes = _dropout_notes([(n, m) for n, m in layers if isinstance(m, nn.Dropout)])
            fc1 = _linear(core[0][1], f"layer {core[0][0]}")
            fc2 = _linear(core[2][1], f"layer {core[2][0]}")
            return _from_fc(fc1, core[1][1], fc2, "Sequential(Linear, activation, Linear)", notes)
        if {"gate_proj", "up_proj", "down_proj"} <= set(children) and hasattr(module, "act_fn"):
            _check_children(module, {"gate_proj", "up_proj", "down_proj", "act_fn"})
            gate = _linear(module.gate_proj, "gate_proj")
            up = _linear(module.up_proj, "up_proj")
            down = _linear(module.down_proj, "down_proj")
            if gate.weight.shape != up.weight.shape or down.in_features != gate.out_features:
                raise UpcycleError(
                    f"gate_proj {tuple(gate.weight.shape)}, up_proj {tuple(up.weight.shape)} and down_proj "
                    f"{tuple(down.weight.shape)} do not fit down(act(gate(x)) * up(x))"
                )
            gate_bias, up_bias, down_bias = _biases([gate, up, down])
            b1 = None if gate_bias is None else torch.cat([gate_bias, up_bias])
            w1 = torch.cat([gate.weight, up.weight])
            return DenseMLP(w1, b1, down.weight, down_bias, activation_name(module.act_fn), True, "gate/up/down")
        if {"fc1", "fc2"} <= set(children) and hasattr(module, "activation_fn"):
            _check_children(module, {"fc1", "fc2", "activation_fn"})
            fc1, fc2 = _linear(module.fc1, "fc1"), _linear(module.fc2, "fc2")
            return _from_fc(fc1, module.activation_fn, fc2, "fc1/activation_fn/fc2", [])
        if {"fc1", "fc2", "act"} <= set(children):
            _check_children(module, {"fc1", "act", "drop1", "norm", "drop2", "fc2"})
            norm = children.get("norm")
            if norm is not None and not isinstance(norm, nn.Identity):
                raise UpcycleError(f"its norm is {type(norm).__name__}; only a timm Mlp without norm is supported")
            fc1, fc2 = _linear(module.fc1, "fc1"), _linear(module.fc2, "fc2")
            notes = _dropout_notes([(n, children[n]) for n in ("drop1", "drop2") if n in children])
            return _from_fc(fc1, module.act, fc2, "fc1/act/fc2", notes)
        raise UpcycleError("its structure is none of the supported ones")
    except UnsupportedActivationError as exc:
        raise UnsupportedActivationError(f"cannot upcycle {kind}: {exc}") from None
    except UpcycleError as exc:
        raise UpcycleError(f"cannot upcycle {kind}: {exc}. Supported dense MLPs: {'; '.join(SUPPORTED_MLPS)}") from None


def _check_devices(dense: DenseMLP, kind: str) -> None:
    params = [p for p in (dense.w1, dense.b1, dense.w2, dense.b2) if p is not None]
    if len({(p.device, p.dtype) for p in params}) != 1:
        found = sorted({f"{p.device}/{p.dtype}" for p in params})
        raise UpcycleError(f"cannot upcycle {kind}: its weights live on different devices/dtypes {found}")


@torch.no_grad()
def _cpu_twin(module: nn.Module) -> nn.Module:
    """A CPU fp32 copy of a meta-device module with random weights: what the forward computes (a
    residual, a norm, a custom activation) does not depend on the values, so the probe check runs on
    it. Costs one copy of this MLP's weights, freed right after."""
    import copy

    twin = copy.deepcopy(module).to_empty(device="cpu").float()
    for tensor in [*twin.parameters(), *twin.buffers()]:
        if tensor.is_floating_point():
            tensor.normal_(0.0, 1.0 / max(1, tensor.shape[-1]) ** 0.5)
    return twin


@torch.no_grad()
def _check_forward(module: nn.Module, dense: DenseMLP) -> None:
    """Run the dense module and the expert function on a small probe; raise if they disagree.

    Catches a module that has the right attribute names but a different forward (a residual inside,
    a norm, a custom activation): upcycling it would silently change the model.
    """
    if dense.w1.device.type == "meta":  # no data to run: check the same forward on a CPU twin
        twin = _cpu_twin(module)
        _check_forward(twin, read_dense_mlp(twin))
        return
    generator = torch.Generator(device=dense.w1.device).manual_seed(0)
    probe = torch.randn(PROBE_TOKENS, dense.w1.shape[1], generator=generator, device=dense.w1.device)
    probe = probe.to(dense.w1.dtype)
    was_training = module.training
    module.eval()  # dropout off
    try:
        expected = module(probe)
    finally:
        module.train(was_training)
    actual = dense.expert_forward(probe)
    if not isinstance(expected, Tensor) or expected.shape != actual.shape:
        got = tuple(expected.shape) if isinstance(expected, Tensor) else type(expected).__name__
        raise UpcycleError(f"cannot upcycle {type(module).__name__}: its forward returned {got}, expected "
                           f"{tuple(actual.shape)} for a {dense.layout} MLP")
    scale = expected.double().abs().max().clamp_min(1e-30)
    err = float((actual.double() - expected.double()).abs().max() / scale)
    rtol = PROBE_RTOL.get(dense.w1.dtype, PROBE_RTOL_LOW_PRECISION)
    if not err <= rtol:
        raise UpcycleError(
            f"cannot upcycle {type(module).__name__}: it looks like a {dense.layout} MLP with activation "
            f"{dense.activation!r}, but its forward differs from that by {err:.3g} (relative) on a probe; "
            "a custom forward cannot be copied into experts (exclude it with match=)"
        )


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
    _check_devices(dense, type(module).__name__)
    _check_forward(module, dense)
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
