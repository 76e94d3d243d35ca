"""Recognising a pretrained dense MLP and checking that it is what it looks like.

``read_dense_mlp`` reads the weights, biases and activation of a supported dense MLP (recognised by its
structure); ``check_forward`` then runs the module and the expert function it implies on a small probe
and refuses a module whose forward differs (a residual inside, a norm, a custom activation), on the meta
device through a CPU twin. ``cumo_layers.upcycle`` builds experts from what this file reads.

Supported dense MLPs:
  - ``fc1 / activation_fn / fc2``: Hugging Face CLIPMLP (and SiglipMLP and the like);
  - ``fc1 / act / drop1 / norm / drop2 / fc2``: timm ``Mlp`` (``norm`` must be Identity);
  - ``nn.Sequential(Linear, activation, Linear)``: the LLaVA/CuMo connector (Dropout allowed between);
  - ``gate_proj / up_proj / down_proj + act_fn``: Llama/Mistral/Qwen2-style MLPs, which become GLU
    experts with ``w1 = [gate; up]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_kernels.reference import ACTIVATIONS, apply_activation

SUPPORTED_MLPS = (
    "fc1/activation_fn/fc2 (Hugging Face CLIPMLP, SiglipMLP)",
    "fc1/act/fc2 with drop1/norm/drop2 (timm Mlp, norm = Identity)",
    "nn.Sequential(Linear, activation, Linear) (LLaVA connector; Dropout allowed between)",
    "gate_proj/up_proj/down_proj + act_fn (Llama/Mistral/Qwen2 MLP -> GLU experts)",
)

# Arguments of SparseMoEMLP that come from the dense module and cannot be overridden.

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
    ("transformers", "ReLUSquaredActivation"): "relu2",
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


def check_devices(dense: DenseMLP, kind: str) -> None:
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
def check_forward(module: nn.Module, dense: DenseMLP) -> None:
    """Run the dense module and the expert function on a small probe; raise if they disagree.

    Catches a module that has the right attribute names but a different forward (a residual inside,
    a norm, a custom activation): upcycling it would silently change the model.
    """
    if dense.w1.device.type == "meta":  # no data to run: check the same forward on a CPU twin
        twin = _cpu_twin(module)
        check_forward(twin, read_dense_mlp(twin))
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
