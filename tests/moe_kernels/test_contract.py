"""The argument contract (moe_kernels/contract.py): every backend refuses the same bad input with the
same error, before anything runs; raw ops refuse too; NaN, double backward and bounded gating cost."""

import time

import pytest
import torch

from moe_kernels import ops, reference
from moe_kernels.reference import glu_code
from tests.helpers import Shape, random_problem

# Backends that run on this machine's CPU (triton through its interpreter).
CPU_BACKENDS = [name for name in ("torch", "cpu", "triton") if ops.unavailable_reason(name, "cpu") is None]


def _problem():
    return list(random_problem(Shape(6, 8, 4, 10, 4, 2)))


def _bad(change):
    args = _problem()
    kwargs = {"activation": "gelu", "glu": False}
    change(args, kwargs)
    return args, kwargs


# (mutation of (x, weights, idx, w1, b1, w2, b2) / kwargs, error, message): each breaks one rule.
BAD_INPUTS = [
    (lambda a, k: a.__setitem__(2, a[2].float()), TypeError, "top_k_idx must hold integer expert ids"),
    (lambda a, k: a.__setitem__(2, a[2] > 0), TypeError, "top_k_idx must hold integer expert ids"),
    (lambda a, k: a.__setitem__(2, a[2][:5]), ValueError, r"top_k_idx must be \[T, K\] with T = 6"),
    (lambda a, k: a.__setitem__(2, a[2][:, :0]), ValueError, "K >= 1"),
    (lambda a, k: a.__setitem__(1, a[1][:, :1]), ValueError, r"top_k_weights must be \(6, 2\)"),
    (lambda a, k: a.__setitem__(0, a[0].int()), TypeError, "x must be one of"),
    (lambda a, k: a.__setitem__(0, a[0][0]), ValueError, "x must have 2 dims"),
    (lambda a, k: a.__setitem__(3, a[3][:, :, :7]), ValueError, r"w1 must be \[E, H1, 8\]"),
    (lambda a, k: a.__setitem__(5, a[5][:3]), ValueError, r"w2 must be \[4, O, 4\]"),
    (lambda a, k: a.__setitem__(4, a[4][:, :3]), ValueError, r"b1 must be \[4, 4\]"),
    (lambda a, k: a.__setitem__(6, a[6][0]), ValueError, "b2 must have 2 dims"),
    (lambda a, k: a.__setitem__(6, a[6].double()), TypeError, "b2 must have x's dtype"),
    (lambda a, k: a.__setitem__(3, a[3][:0]), ValueError, "E >= 1"),
    (lambda a, k: k.update(activation="tanh"), ValueError, "unknown activation 'tanh'"),
    (lambda a, k: k.update(glu=1), TypeError, "glu must be a bool"),
    (lambda a, k: k.update(glu=True), ValueError, "with GLU"),
    (lambda a, k: a.__setitem__(4, torch.empty(4, 4, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("change,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_every_backend_raises_the_contract_error(backend, change, error, message):
    args, kwargs = _bad(change)
    with pytest.raises(error, match=message):
        ops.expert_mlp(*args, **kwargs, backend=backend)


def test_all_meta_inputs_are_refused_by_the_op():
    args = [t.to("meta") for t in _problem()]
    with pytest.raises(ValueError, match="meta device"):
        ops.expert_mlp(*args, backend="torch")


@pytest.mark.parametrize("logits,top_k,error,message", [
    (torch.randn(4, 3), 4, ValueError, r"top_k must be in \[1, 3\]"),
    (torch.randn(4, 3), 0, ValueError, r"top_k must be in \[1, 3\]"),
    (torch.randn(4, 3), 2.0, TypeError, "top_k must be an int"),
    (torch.randn(4, 0), 1, ValueError, "E >= 1"),
    (torch.randn(4), 1, ValueError, "logits must have 2 dims"),
    (torch.ones(4, 3, dtype=torch.int64), 1, TypeError, "logits must be one of"),
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gating_contract(backend, logits, top_k, error, message):
    with pytest.raises(error, match=message):
        ops.topk_gating(logits, top_k, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_logits_poison_only_their_token(backend):
    logits = torch.randn(6, 5)
    logits[1, 3] = float("nan")
    logits[4, 0] = float("inf")
    weights, idx = ops.topk_gating(logits, 2, backend=backend)
    ref_weights, ref_idx = reference.topk_gating(logits, 2)
    assert ((idx >= 0) & (idx < 5)).all()
    assert torch.equal(idx, ref_idx)  # poisoned rows: ids 0..K-1, as the reference's stable sort
    assert weights[[1, 4]].isnan().all()
    clean = [0, 2, 3, 5]
    assert not weights[clean].isnan().any()
    torch.testing.assert_close(weights[clean], ref_weights[clean], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_input_token_gives_nan_only_there(backend):
    from cumo_layers import SparseMoEMLP

    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2, backend=backend).eval()
    x = torch.randn(5, 8)
    clean = moe(x)
    x[2, 0] = float("nan")
    y = moe(x)
    assert y[2].isnan().all()
    # Equal up to rounding: the poisoned token's new experts change the GEMMs' row counts.
    torch.testing.assert_close(y[[0, 1, 3, 4]], clean[[0, 1, 3, 4]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_double_backward_raises_clearly(backend):
    args = [t.requires_grad_() if t.is_floating_point() else t for t in _problem()]
    y = ops.expert_mlp(*args, backend=backend)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(y.square().sum(), args[0], create_graph=True)


def test_double_backward_works_on_the_torch_backend():
    args = [t.double().requires_grad_() if t.is_floating_point() else t for t in _problem()]
    assert torch.autograd.gradgradcheck(
        lambda x, w1: ops.expert_mlp(x, args[1], args[2], w1, args[4], args[5], args[6], backend="torch"),
        (args[0], args[3]))


def test_raw_cpu_backward_takes_no_plan_from_outside():
    """The backward op rebuilds its routing plan: a caller cannot hand it indices outside the buffers."""
    if ops.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the cpu extension is not built")
    x, w, idx, w1, b1, w2, b2 = _problem()
    schema = str(torch.ops.cumo.expert_mlp_backward.default._schema)
    assert "slot_rows" not in schema and "expert_offsets" not in schema
    no_glu = glu_code(False)
    _, hidden = torch.ops.cumo.expert_mlp_forward(x, w, idx, w1, b1, w2, b2, "gelu", *no_glu, True)
    with pytest.raises(RuntimeError, match="hidden must be"):
        torch.ops.cumo.expert_mlp_backward(torch.randn(6, 10), x, w, idx, w1, b1, w2, b2, hidden[:3], "gelu",
                                           *no_glu, True, True)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        torch.ops.cumo.expert_mlp_backward(torch.randn(5, 10), x, w, idx, w1, b1, w2, b2, hidden, "gelu",
                                           *no_glu, True, True)


def test_raw_cpu_op_with_a_meta_bias_raises():
    """A meta tensor among CPU ones used to dispatch to the fake kernel and return empty memory."""
    if ops.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the cpu extension is not built")
    x, w, idx, w1, b1, w2, b2 = _problem()
    with pytest.raises(ValueError, match="one device"):
        torch.ops.cumo.expert_mlp_forward(x, w, idx, w1, b1.to("meta"), w2, b2, "gelu", *glu_code(False), False)


def test_cpu_gating_cost_is_bounded_for_huge_top_k():
    """O(E log K) selection: E = K = 32768 was seconds with an insertion list (O(E*K))."""
    if ops.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the cpu extension is not built")
    logits = torch.randn(4, 32768)
    start = time.perf_counter()
    weights, idx = ops.topk_gating(logits, 32768, backend="cpu")
    elapsed = time.perf_counter() - start
    ref_weights, ref_idx = reference.topk_gating(logits, 32768)
    assert torch.equal(idx, ref_idx)
    assert elapsed < 5.0, f"{elapsed:.2f} s"  # a hang guard, not a benchmark: the old path took minutes
