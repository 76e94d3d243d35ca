"""Which way a Triton call goes, and that every way agrees with the reference: plain eager tensors
run the launchers through torch.autograd.Functions (no custom-op dispatch; the backward reuses the
forward's routing plan), tracing and fake tensors take the torch.library custom ops, and activation
checkpointing recomputes the eager path. Under TRITON_INTERPRET=1 on CPU tensors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels.triton as triton_backend  # noqa: E402
from moe_kernels.reference import GluSpec, glu_code  # noqa: E402
from tests.helpers import Shape, assert_close, assert_matches_reference, random_problem  # noqa: E402
from tests.moe_kernels.triton_launches import (  # noqa: E402
    backward_kernels,
    differentiable,
    forward_kernels,
    launches,
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_backend.reset_launch_counts()
    yield


def custom_op_expert_mlp(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation="gelu", glu=False):
    """The expert MLP through its torch.library custom op (what torch.compile and tensor subclasses use)."""
    return torch.ops.cumo_triton.expert_mlp_forward(x, top_k_weights, top_k_idx, w1, b1, w2, b2, activation,
                                                    *glu_code(glu), True, True)[0]


@pytest.mark.parametrize("glu", [False, True, GluSpec("clamped", interleaved=True, limit=0.6, up_offset=1.0)])
def test_custom_op_path_matches_reference(glu):
    """The eager path calls the launchers through a torch.autograd.Function; the custom op it skips runs
    the same launchers and must agree, routing plan rebuilt in its backward."""
    shape = Shape(21, 24, 20, 20, 4, 2)
    problem = random_problem(shape, glu=bool(glu), routing="skip_experts")
    activation = "quick_gelu" if isinstance(glu, GluSpec) else "silu"
    launches()
    out = custom_op_expert_mlp(*differentiable(problem), activation, glu)
    assert launches() == forward_kernels(shape)
    out.backward(torch.randn_like(out))
    assert launches() == backward_kernels(shape, custom_op=True)
    assert_matches_reference(custom_op_expert_mlp, problem, activation, glu)


def test_eager_path_skips_the_custom_ops_and_tracing_takes_them():
    """Plain eager tensors run the launchers without the custom ops' dispatch; a fake tensor (what
    torch.compile traces with) goes through the custom op and its fake kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.namespace)
            return func(*args, **(kwargs or {}))

    shape = Shape(9, 24, 20, 20, 4, 2)
    x, weights, idx, w1, b1, w2, b2 = differentiable(random_problem(shape, glu=True))
    with OpLog() as log:
        out = triton_backend.expert_mlp(x, weights, idx, w1, b1, w2, b2, "silu", True)
        out.backward(torch.ones_like(out))
        logits = torch.randn(9, 4, requires_grad=True)
        triton_backend.topk_gating(logits, 2)[0].sum().backward()
    assert "cumo_triton" not in log.ops and launches()["grouped_weight_grad_kernel"] == 2
    plain = [t.detach() for t in (x, weights, idx, w1, b1, w2, b2)]
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in plain]
    with mode:
        out = triton_backend.expert_mlp(*fake, "silu", True)
    assert out.shape == (9, 20) and launches() == {}


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches_plain_backward(reentrant):
    """torch.utils.checkpoint recomputes the layer in backward: the eager autograd path (whose backward
    reuses the forward's routing plan) must give the plain backward's gradients, with either checkpoint.
    The reentrant one runs the first forward without grad, so a loss the layer leaves as an attribute
    (last_aux_loss) has no graph there: that case trains the output alone."""
    from torch.utils.checkpoint import checkpoint

    from cumo_layers import SparseMoEMLP

    torch.manual_seed(0)
    layer = SparseMoEMLP(24, 16, num_experts=4, top_k=2, activation="silu", glu=True, backend="triton")
    x = torch.randn(9, 24, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=reentrant) if checkpointed else layer(x)
        (out.square().mean() + (0 if reentrant else layer.last_aux_loss)).backward()
        results.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}})
    for name, grad in results[0].items():
        assert_close(results[1][name], grad, torch.float32, name)
