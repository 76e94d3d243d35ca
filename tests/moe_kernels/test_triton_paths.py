"""Which way a Triton call goes, and that every way agrees with the reference: plain eager tensors
run the launchers through torch.autograd.Functions (no custom-op dispatch; the backward reuses the
forward's routing plan), tracing and fake tensors take the torch.library custom ops, activation
checkpointing recomputes the eager path, and a few rows (T*K <= E) take fc2 and the combine as one kernel.
Under TRITON_INTERPRET=1 on CPU tensors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels.triton as triton_backend  # noqa: E402
from moe_kernels.reference import GluSpec, glu_code  # noqa: E402
from moe_kernels import reference  # noqa: E402
from tests.helpers import (  # noqa: E402
    Shape,
    assert_close,
    assert_lowp_close,
    assert_matches_reference,
    random_problem,
)
from tests.moe_kernels.triton_launches import (  # noqa: E402
    backward_kernels,
    differentiable,
    forward_kernels,
    launches,
    routing_kernels,
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


FEW_ROWS = [
    (Shape(1, 40, 24, 56, 8, 3), "silu", True, "decode: 3 of 8 experts, GLU, bias"),
    (Shape(2, 24, 12, 20, 8, 4), "gelu", False, "2 tokens, T*K == E"),
    (Shape(1, 16, 8, 24, 5, 5), "silu", GluSpec("softcapped", gate_cap=2.0, up_cap=3.0), "top_k == num_experts"),
    (Shape(3, 20, 40, 36, 12, 2), "quick_gelu", GluSpec("clamped", interleaved=True, limit=0.7, up_offset=1.0),
     "H crosses the hidden tile, interleaved GLU"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, activation, glu, why", FEW_ROWS, ids=[why for *_, why in FEW_ROWS])
def test_expert_mlp_few_rows_fuse_fc2_and_the_combine(shape, activation, glu, why, dtype):
    """At most a row per expert (T*K <= E) and the rows not kept: fc2 and the combine are one token-major kernel.
    Inference and a backward that does not need the rows (x and the experts trained, not the top-k weights), with
    dropped slots (their weights NaN: never read), a strided w2 and a bias."""
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, dtype=dtype, glu=bool(glu))
    idx[0, -1] = shape.experts  # a dropped slot
    weights = weights.masked_fill(idx >= shape.experts, float("nan"))
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)  # [E, O, H] stored column-major
    args = (x, weights, idx, w1, b1, w2, b2)
    # Inference, then training x, w1, b1, w2, b2 (the top-k weights fixed): the same forward kernels; each result
    # against the reference in the same dtype and in fp64.
    trained = (0, 3, 4, 5, 6)
    grad_out = torch.randn(shape.tokens, shape.d_out)

    def out_and_grads(fn, to, train):
        inputs = [a.detach().to(to) if a.is_floating_point() else a for a in args]
        leaves = [inputs[i].requires_grad_(train) for i in trained]
        launches()
        out = fn(*inputs, activation, glu)
        forward = launches()
        return [out.detach(), *(torch.autograd.grad(out, leaves, grad_out.to(to)) if train else ())], forward

    for train in (False, True):
        got, forward = out_and_grads(triton_backend.expert_mlp, dtype, train)
        assert forward == {**routing_kernels(shape), "grouped_gemm_kernel": 1, "fc2_combine_kernel": 1}
        want, exact = out_and_grads(reference.expert_mlp, dtype, train)[0], out_and_grads(
            reference.expert_mlp, torch.float64, train)[0]
        assert torch.isfinite(got[0]).all()
        compare(got, want, exact, ("out", "d x", "d w1", "d b1", "d w2", "d b2"), dtype)


def compare(got, want, exact, names, dtype):
    """Each result against the reference in its dtype (fp32) or by the low-precision rule against fp64."""
    for name, g, w, e in zip(names, got, want, exact):
        if dtype == torch.float32:
            assert_close(g, w, dtype, name)
        else:
            assert_lowp_close(g, w, e, name, floor=torch.finfo(dtype).eps / 2)
