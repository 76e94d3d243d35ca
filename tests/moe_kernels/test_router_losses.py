"""ops.router_losses (the router's balance, z and weighted auxiliary loss) on every backend that runs here,
against the reference, forward and backward; the Triton kernels under TRITON_INTERPRET=1 (no tl.dot in them,
so bf16 runs in the interpreter too), their launches counted; the router's losses on the triton backend
against the public reference losses of cumo_layers.router."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import ops, reference
from tests.helpers import RTOL, cpu_backends

# (T, E, S): empty, one expert, odd E, T > BLOCK_T (several partial sums), several samples.
SHAPES = [(0, 4, 1), (1, 1, 1), (1, 64, 1), (5, 7, 1), (70, 64, 2), (130, 64, 5), (12, 100, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
COEFS = (0.5, 1.3, 0.07)  # z_scale, balance_coef, z_coef


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the Triton backend take CPU tensors


def launches() -> dict:
    from moe_kernels.triton import LAUNCHES

    return dict(LAUNCHES)


def check_against_reference(backend: str, logits: torch.Tensor, weights: torch.Tensor,
                            used: tuple[bool, bool, bool] = (True, True, True), balance_scale: float = 1.0):
    """The three losses and the logits' gradient (through the losses marked used, with random weights)
    against the reference's. Both compute in fp32 from the same logits: the fp32 tolerance for the losses,
    the logits' dtype's for the gradient (rounded to it once in both)."""
    actual_in = logits.detach().clone().requires_grad_()
    expected_in = logits.detach().clone().requires_grad_()
    actual = ops.router_losses(actual_in, weights, *COEFS, backend=backend, balance_scale=balance_scale)
    expected = reference.router_losses(expected_in, weights, *COEFS, balance_scale)
    for name, a, e in zip(("balance", "z", "aux"), actual, expected):
        assert a.shape == () and a.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=RTOL[torch.float32], atol=1e-6, msg=name)
    if logits.shape[0] == 0 or not any(used):
        return
    probe = torch.randn(3)
    sum(loss * p for loss, p, u in zip(actual, probe, used) if u).backward()
    sum(loss * p for loss, p, u in zip(expected, probe, used) if u).backward()
    assert actual_in.grad.dtype == logits.dtype
    torch.testing.assert_close(actual_in.grad.float(), expected_in.grad.float(), rtol=RTOL[logits.dtype],
                               atol=1e-6 if logits.dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,samples", SHAPES)
def test_matches_the_reference(backend, dtype, tokens, experts, samples):
    torch.manual_seed(tokens * 131 + experts)
    check_against_reference(backend, (torch.randn(tokens, experts) * 4).to(dtype), torch.rand(samples, experts))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("used", [(True, False, False), (False, True, False), (False, False, True)])
def test_gradient_through_one_loss(backend, used):
    """Only one loss reaches the result: the others' gradients stay None (nothing zero-filled)."""
    torch.manual_seed(1)
    check_against_reference(backend, torch.randn(9, 6), torch.rand(3, 6), used)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_integer_counts_times_a_scale(backend, counts_dtype):
    """Switch's balance weights are the expert load times one number: the op reads the counts and the scale (no
    cast or scale kernel before it), and the losses and gradient are those of the float weights they stand for."""
    torch.manual_seed(3)
    logits = torch.randn(70, 64)  # two programs of the Triton kernels
    counts = torch.randint(0, 40, (1, 64), dtype=counts_dtype)
    scale = 64 / (70 * 2 * 70)
    check_against_reference(backend, logits, counts, balance_scale=scale)
    as_floats = ops.router_losses(logits, counts.float() * scale, *COEFS, backend=backend)
    for a, e in zip(ops.router_losses(logits, counts, *COEFS, backend=backend, balance_scale=scale), as_floats):
        torch.testing.assert_close(a, e, rtol=RTOL[torch.float32], atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_logits_and_broadcast_weights(backend):
    """Logits as a transposed view, balance weights as an expanded view (stride 0 over the samples)."""
    torch.manual_seed(2)
    logits = torch.randn(6, 12).t()
    weights = torch.rand(1, 6).expand(4, 6)
    check_against_reference(backend, logits, weights)


@pytest.mark.parametrize("backend", cpu_backends())
def test_infinite_logits_follow_pytorch(backend):
    """A +inf logit makes the balance NaN and z +inf, as PyTorch's softmax and logsumexp do."""
    logits = torch.tensor([[0.5, float("inf"), 1.0], [1.0, 2.0, 3.0]])
    actual = ops.router_losses(logits, torch.rand(1, 3), *COEFS, backend=backend)
    expected = reference.router_losses(logits, torch.rand(1, 3), *COEFS)
    assert actual[0].isnan() and expected[0].isnan()
    assert actual[1] == expected[1] == float("inf")


def test_triton_launches_and_determinism():
    """Two small kernels forward (per-block shares, then their sum), one backward; the sum in a fixed
    order, so a repeat is bitwise equal. No tokens: only the reduce kernel, which writes zeros."""
    pytest.importorskip("triton")
    from moe_kernels.triton import reset_launch_counts

    reset_launch_counts()
    logits = torch.randn(200, 64, requires_grad=True)  # four programs of 64 tokens
    weights = torch.rand(2, 64)
    first = ops.router_losses(logits, weights, *COEFS, backend="triton")
    assert launches() == {"router_losses_kernel": 1, "router_losses_reduce_kernel": 1}
    first[2].backward()
    assert launches() == {"router_losses_kernel": 1, "router_losses_reduce_kernel": 1,
                          "router_losses_backward_kernel": 1}
    again = ops.router_losses(logits, weights, *COEFS, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    reset_launch_counts()
    empty = torch.zeros(0, 64, requires_grad=True)
    losses = ops.router_losses(empty, weights, *COEFS, backend="triton")
    assert [loss.item() for loss in losses] == [0.0, 0.0, 0.0]
    assert launches() == {"router_losses_reduce_kernel": 1}


def test_triton_custom_ops_pass_opcheck():
    """The path torch.compile takes: schema, fake tensors, autograd registration."""
    pytest.importorskip("triton")
    from moe_kernels.triton import losses as triton_losses

    logits, weights = torch.randn(6, 7, requires_grad=True), torch.rand(2, 7)
    torch.library.opcheck(triton_losses._router_losses_op, (logits, weights, *COEFS, 0.5))
    grads = (torch.tensor(0.3), None, torch.tensor(1.0))
    torch.library.opcheck(triton_losses._router_losses_backward_op, (logits.detach(), weights, *grads, *COEFS, 0.5))


def test_triton_compiles_to_one_graph():
    pytest.importorskip("triton")
    logits, weights = torch.randn(6, 7), torch.rand(3, 7)
    compiled = torch.compile(lambda t: ops.router_losses(t, weights, *COEFS, backend="triton"), fullgraph=True,
                             backend="eager")
    for actual, expected in zip(compiled(logits), reference.router_losses(logits, weights, *COEFS)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("logits,weights,coefs,error,match", [
    (torch.randn(4), torch.rand(1, 4), COEFS, ValueError, "2 dims"),
    (torch.ones(3, 4, dtype=torch.int64), torch.rand(1, 4), COEFS, TypeError, "logits must be one of"),
    (torch.randn(3, 0), torch.rand(1, 0), COEFS, ValueError, "E >= 1"),
    (torch.randn(6, 4), torch.rand(4, 4), COEFS, ValueError, r"balance_weights must be \[S, 4\]"),
    (torch.randn(6, 4), torch.rand(2, 5), COEFS, ValueError, r"balance_weights must be \[S, 4\]"),
    (torch.randn(6, 4), torch.rand(4), COEFS, ValueError, "balance_weights must have 2 dims"),
    (torch.randn(6, 4), torch.rand(1, 4), (1.0, float("nan"), 0.1), ValueError, "balance_coef must be a finite"),
    (torch.randn(6, 4), torch.ones(1, 4, dtype=torch.bool), COEFS, TypeError, "float or integer"),
    (torch.randn(6, 4), torch.rand(1, 4), COEFS + (float("inf"),), ValueError, "balance_scale must be a finite"),
])
def test_bad_arguments_raise_the_same_error_everywhere(backend, logits, weights, coefs, error, match):
    with pytest.raises(error, match=match):
        ops.router_losses(logits, weights, *coefs[:3], backend=backend, balance_scale=(coefs[3:] or (1.0,))[0])


def test_triton_refuses_float64_by_name():
    pytest.importorskip("triton")
    with pytest.raises(TypeError, match="float64"):
        ops.router_losses(torch.randn(3, 4, dtype=torch.float64), torch.rand(1, 4), *COEFS, backend="triton")


def test_triton_backward_checks_its_gradients():
    pytest.importorskip("triton")
    from moe_kernels.triton import losses as triton_losses

    with pytest.raises(ValueError, match="grad_z must be a 0-d tensor"):
        triton_losses._router_losses_backward_op(torch.randn(5, 7), torch.rand(1, 7), None, torch.randn(5), None,
                                                 *COEFS, 1.0)


@pytest.mark.parametrize("balance", ["switch", "cumo"])
def test_the_routers_losses_on_triton_are_the_reference_losses(balance):
    """TopKRouter on the triton backend: its three losses equal cumo_layers.router's reference functions of
    its own logits and routing, and their gradient reaches the router weight as the reference's does."""
    pytest.importorskip("triton")
    from cumo_layers.router import TopKRouter, balance_loss, cumo_balance_loss, expert_load, z_loss

    torch.manual_seed(3)
    router = TopKRouter(16, 6, 2, balance_loss=balance, balance_loss_coef=0.3, z_loss_coef=0.05,
                        backend="triton").train()
    x = torch.randn(12, 16)
    route = router(x, num_samples=3)
    logits = route.logits.detach().requires_grad_()
    probs = torch.softmax(logits, dim=-1)
    if balance == "cumo":
        expected_balance = cumo_balance_loss(probs, route.top_k_idx, 6, num_samples=3)
    else:
        expected_balance = balance_loss(probs, route.top_k_idx, 6, expert_load(route.top_k_idx, 6))
    expected_z = z_loss(logits)
    torch.testing.assert_close(router.last_balance_loss, expected_balance)
    torch.testing.assert_close(router.last_z_loss, expected_z)
    torch.testing.assert_close(router.last_aux_loss, 0.3 * expected_balance + 0.05 * expected_z)
    (grad_weight,) = torch.autograd.grad(router.last_aux_loss, [router.weight])
    (grad_logits,) = torch.autograd.grad(0.3 * expected_balance + 0.05 * expected_z, [logits])
    torch.testing.assert_close(grad_weight, grad_logits.t() @ x, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,samples", [(1, 64, 1), (4096, 128, 4), (777, 6, 7)])
def test_compiled_triton_kernels_on_gpu(monkeypatch, dtype, tokens, experts, samples):
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels(monkeypatch)
    torch.manual_seed(tokens + experts)
    check_against_reference("triton", (torch.randn(tokens, experts, device="cuda") * 4).to(dtype),
                            torch.rand(samples, experts, device="cuda"))
