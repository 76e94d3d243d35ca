"""ops.router_statistics (each row's softmax and log-sum-exp, what the router's losses read) on every backend
that runs here, against the reference, forward and backward; the Triton kernels under TRITON_INTERPRET=1
(no tl.dot in them, so bf16 runs in the interpreter too), their launches counted."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import ops, reference
from tests.helpers import RTOL

SHAPES = [(0, 4), (1, 1), (1, 64), (5, 7), (70, 64), (3, 100)]  # (T, E): empty, one expert, odd E, T > BLOCK_T
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backends() -> list[str]:
    return [name for name in ("torch", "cpu", "triton") if ops.unavailable_reason(name, "cpu") is None]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the Triton backend take CPU tensors


def launches() -> dict:
    from moe_kernels.triton import LAUNCHES

    return dict(LAUNCHES)


def check_against_reference(backend: str, logits: torch.Tensor, use_probs: bool = True, use_lse: bool = True):
    """Outputs and the logits' gradient (through whichever outputs are used) against the reference's, in fp32
    (both compute in fp32 from the same logits): the fp32 tolerance, whatever the logits' dtype."""
    actual_in = logits.detach().clone().requires_grad_()
    expected_in = logits.detach().clone().requires_grad_()
    probs, lse = ops.router_statistics(actual_in, backend=backend)
    ref_probs, ref_lse = reference.router_statistics(expected_in)
    assert probs.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(probs, ref_probs, rtol=RTOL[torch.float32], atol=1e-7)
    torch.testing.assert_close(lse, ref_lse, rtol=RTOL[torch.float32], atol=1e-6)
    grad_probs, grad_lse = torch.randn_like(ref_probs), torch.randn_like(ref_lse)

    def loss(p, s):
        return (p * grad_probs).sum() * use_probs + (s * grad_lse).sum() * use_lse

    loss(probs, lse).backward()
    loss(ref_probs, ref_lse).backward()
    assert actual_in.grad.dtype == logits.dtype
    # The gradient is rounded to the logits' dtype once, in both.
    torch.testing.assert_close(actual_in.grad.float(), expected_in.grad.float(), rtol=RTOL[logits.dtype],
                               atol=1e-6 if logits.dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts", SHAPES)
def test_matches_the_reference(backend, dtype, tokens, experts):
    torch.manual_seed(tokens * 131 + experts)
    check_against_reference(backend, (torch.randn(tokens, experts) * 4).to(dtype))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("use", ["probs", "lse"])
def test_gradient_through_one_output(backend, use):
    """Only one output reaches the loss: the other's gradient is None (not a zero-filled tensor)."""
    torch.manual_seed(1)
    check_against_reference(backend, torch.randn(9, 6), use_probs=use == "probs", use_lse=use == "lse")


@pytest.mark.parametrize("backend", backends())
def test_non_contiguous_logits_and_broadcast_gradients(backend):
    """Strided logits (a transposed view), and the gradients autograd hands over for a mean of the
    outputs: expanded views with stride 0."""
    torch.manual_seed(2)
    base = torch.randn(6, 11).requires_grad_()
    ref_base = base.detach().clone().requires_grad_()
    probs, lse = ops.router_statistics(base.t(), backend=backend)
    ref_probs, ref_lse = reference.router_statistics(ref_base.t())
    torch.testing.assert_close(probs, ref_probs)
    (probs.mean() + lse.mean()).backward()
    (ref_probs.mean() + ref_lse.mean()).backward()
    torch.testing.assert_close(base.grad, ref_base.grad)


@pytest.mark.parametrize("backend", backends())
def test_infinite_logits_follow_pytorch(backend):
    """A +inf logit: lse +inf and NaN probabilities; a row of -inf: lse -inf (PyTorch's softmax and
    logsumexp), other rows untouched."""
    inf = float("inf")
    logits = torch.tensor([[0.5, inf, 1.0], [-inf, -inf, -inf], [1.0, 2.0, 3.0]])
    probs, lse = ops.router_statistics(logits, backend=backend)
    ref_probs, ref_lse = reference.router_statistics(logits)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(probs, ref_probs, equal_nan=True)


def test_triton_launches_one_kernel_each_way():
    pytest.importorskip("triton")
    from moe_kernels.triton import reset_launch_counts

    reset_launch_counts()
    logits = torch.randn(70, 64, requires_grad=True)
    probs, lse = ops.router_statistics(logits, backend="triton")
    assert launches() == {"router_statistics_kernel": 1}
    (probs.square().sum() + lse.sum()).backward()
    assert launches() == {"router_statistics_kernel": 1, "router_statistics_backward_kernel": 1}


def test_triton_custom_op_passes_opcheck():
    """The path torch.compile takes: schema, fake tensors, autograd registration."""
    pytest.importorskip("triton")
    from moe_kernels.triton import statistics

    logits = torch.randn(5, 7, requires_grad=True)
    torch.library.opcheck(statistics._router_statistics_op, (logits,))
    probs = torch.softmax(logits.detach(), -1)
    torch.library.opcheck(statistics._router_statistics_backward_op,
                          (probs, torch.randn(5, 7), torch.randn(5), torch.float16))
    torch.library.opcheck(statistics._router_statistics_backward_op, (probs, None, torch.randn(5), torch.float32))


def test_triton_compiles_to_one_graph():
    pytest.importorskip("triton")
    logits = torch.randn(5, 7, requires_grad=True)
    compiled = torch.compile(lambda t: ops.router_statistics(t, backend="triton"), fullgraph=True, backend="eager")
    probs, lse = compiled(logits)
    ref_probs, ref_lse = reference.router_statistics(logits)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("logits,error,match", [
    (torch.randn(4), ValueError, "2 dims"),
    (torch.ones(3, 4, dtype=torch.int64), TypeError, "logits must be one of"),
    (torch.randn(3, 0), ValueError, "E >= 1"),
])
def test_bad_logits_raise_the_same_error_everywhere(backend, logits, error, match):
    with pytest.raises(error, match=match):
        ops.router_statistics(logits, backend=backend)


def test_triton_refuses_float64_by_name():
    pytest.importorskip("triton")
    with pytest.raises(TypeError, match="float64"):
        ops.router_statistics(torch.randn(3, 4, dtype=torch.float64), backend="triton")


def test_triton_backward_checks_gradient_shapes():
    pytest.importorskip("triton")
    from moe_kernels.triton import statistics

    probs = torch.softmax(torch.randn(5, 7), -1)
    with pytest.raises(ValueError, match=r"grad_lse must be \[5\]"):
        statistics._router_statistics_backward_op(probs, None, torch.randn(4), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts", [(1, 64), (4096, 128), (777, 6)])
def test_compiled_triton_kernels_on_gpu(monkeypatch, dtype, tokens, experts):
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels(monkeypatch)
    torch.manual_seed(tokens + experts)
    check_against_reference("triton", (torch.randn(tokens, experts, device="cuda") * 4).to(dtype))
