"""cumo::topk_gating (csrc/cpu/gating.cpp + csrc/common/gating.h) against moe_kernels.reference.

Selection order contract: probability descending, ties to the lower expert id. torch.topk does not
promise an order among equal values, so ids are checked against a stable descending sort of the
reference's probabilities, and against reference.topk_gating itself wherever a row has no tie.
"""

import pytest
import torch

from moe_kernels import gating_ops, reference
from tests.helpers import RTOL, assert_close

try:
    from moe_kernels import _C  # noqa: F401

    torch.ops.cumo.topk_gating  # noqa: B018  (raises if gating.cpp is not in the build)
    gating_ops.register_topk_gating("cumo::topk_gating")
    _MISSING = None
except (ImportError, AttributeError, RuntimeError) as exc:
    _MISSING = f"moe_kernels._C with cumo::topk_gating is not built: {exc}"

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EXPERTS_TOP_K = [
    (4, 1),  # top-1
    (4, 2),  # CuMo's setting
    (8, 8),  # top_k == num_experts: everything selected, order still matters
    (64, 8),  # fine-grained: more experts than a SIMD width, several chunks per row
    (67, 5),  # odd E past 64
    (130, 130),  # large k: the insertion list holds every expert
]


def canonical_topk(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Ids in the contract's order: stable descending sort of the fp32 softmax."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]


def weights_for(logits: torch.Tensor, idx: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The reference formula (softmax -> gather -> renormalise) for given ids; differentiable."""
    weights = torch.softmax(logits.float(), dim=-1).gather(1, idx)
    return weights / weights.sum(dim=-1, keepdim=True) if normalize else weights


def rows_without_ties(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1).values
    return (probs[:, 1:] != probs[:, :-1]).all(dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k", EXPERTS_TOP_K)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(dtype, experts, top_k, normalize):
    logits = 3 * torch.randn(37, experts, dtype=dtype)
    weights, idx = torch.ops.cumo.topk_gating(logits, top_k, normalize)
    assert weights.dtype == torch.promote_types(dtype, torch.float32) and idx.dtype == torch.int64
    assert weights.shape == idx.shape == (37, top_k)
    assert torch.equal(idx, canonical_topk(logits, top_k))
    ref_weights, ref_idx = reference.topk_gating(logits, top_k, normalize)
    untied = rows_without_ties(logits)
    if dtype != torch.bfloat16:  # bf16 rows of many experts always tie: the canonical check covers them
        assert untied.all()
    assert torch.equal(idx[untied], ref_idx[untied])
    # Weights are fp32 (fp64 for fp64 logits): the fp32 tolerance applies.
    assert_close(weights, weights_for(logits, idx, normalize), torch.float32, "weights vs formula")
    assert_close(weights[untied], ref_weights[untied], torch.float32, "weights vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradient(dtype, normalize):
    experts, top_k = 9, 3
    logits = torch.randn(23, experts, dtype=dtype, requires_grad=True)
    weights, idx = torch.ops.cumo.topk_gating(logits, top_k, normalize)
    expected = weights_for(logits, idx, normalize)
    grad_out = torch.randn_like(weights)
    (grad,) = torch.autograd.grad((weights * grad_out).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * grad_out).sum(), logits)
    assert grad.dtype == dtype
    tolerance = RTOL[torch.float32] if dtype != torch.bfloat16 else RTOL[torch.bfloat16]
    err = float((grad.double() - expected_grad.double()).abs().max() / expected_grad.double().abs().max())
    assert err <= tolerance, f"logit gradient: relative error {err:.3g}"


def test_gradient_fp64_gradcheck():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    # The op computes in fp32, so gradcheck runs at fp32-sized steps and tolerances.
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.cumo.topk_gating(x, 2, True)[0], (logits,), eps=1e-3, atol=1e-3, rtol=1e-2
    )


def test_ties_go_to_lower_expert():
    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    weights, idx = torch.ops.cumo.topk_gating(logits, 4, False)
    assert idx.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert torch.allclose(weights[1], torch.full((4,), 1 / 6))


def test_bf16_many_ties():
    # bf16 logits of few distinct values: every row has ties; the order must still be canonical.
    logits = torch.randint(-3, 3, (50, 64)).to(torch.bfloat16)
    _, idx = torch.ops.cumo.topk_gating(logits, 8, True)
    assert torch.equal(idx, canonical_topk(logits, 8))


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.t().contiguous().t(),  # column-major
        lambda x: torch.stack([x, x], dim=-1).flatten(1)[:, ::2],  # column stride 2
        lambda x: torch.stack([x, x], dim=1).flatten(0, 1)[::2],  # row stride 2E
    ],
)
def test_non_contiguous(make):
    logits = torch.randn(19, 12)
    strided = make(logits)
    assert not strided.is_contiguous() and torch.equal(strided, logits)
    weights, idx = torch.ops.cumo.topk_gating(strided, 3, True)
    ref_weights, ref_idx = torch.ops.cumo.topk_gating(logits, 3, True)
    assert torch.equal(idx, ref_idx) and torch.equal(weights, ref_weights)


@pytest.mark.parametrize("tokens", [0, 1])
def test_few_tokens(tokens):
    logits = torch.randn(tokens, 5)
    weights, idx = torch.ops.cumo.topk_gating(logits, 2, True)
    assert weights.shape == idx.shape == (tokens, 2)
    ref_weights, ref_idx = reference.topk_gating(logits, 2, True)
    assert torch.equal(idx, ref_idx)
    assert_close(weights, ref_weights, torch.float32, "weights")


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0], [-80.0, -90.0, -100.0, -85.0]])
    weights, idx = torch.ops.cumo.topk_gating(logits, 2, True)
    assert torch.isfinite(weights).all()
    ref_weights, ref_idx = reference.topk_gating(logits, 2, True)
    assert torch.equal(idx, ref_idx)
    assert_close(weights, ref_weights, torch.float32, "weights")


def test_fake_shapes():
    weights, idx = torch.ops.cumo.topk_gating(torch.empty(7, 6, device="meta", dtype=torch.bfloat16), 4, True)
    assert weights.device.type == "meta" and weights.shape == idx.shape == (7, 4)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int64
    weights64, _ = torch.ops.cumo.topk_gating(torch.empty(7, 6, device="meta", dtype=torch.float64), 4, True)
    assert weights64.dtype == torch.float64


def test_float64_weights_are_exact():
    """float64 logits are gated in float64: the layer's fp64 gradcheck runs through this op."""
    logits = torch.randn(21, 7, dtype=torch.float64)
    weights, idx = torch.ops.cumo.topk_gating(logits, 3, True)
    ref_weights, ref_idx = reference.topk_gating(logits, 3, True)
    assert torch.equal(idx, ref_idx)
    assert_close(weights, ref_weights, torch.float64, "weights")


@pytest.mark.parametrize("top_k", [0, 6])
def test_bad_top_k_raises(top_k):
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.cumo.topk_gating(torch.randn(3, 5), top_k, True)


def test_backward_helper_matches_autograd():
    logits = torch.randn(11, 7, requires_grad=True)
    idx = canonical_topk(logits.detach(), 3)
    grad_out = torch.randn(11, 3)
    for normalize in (True, False):
        (expected,) = torch.autograd.grad((weights_for(logits, idx, normalize) * grad_out).sum(), logits)
        got = gating_ops.topk_gating_backward(grad_out, logits.detach(), idx, normalize)
        assert_close(got, expected, torch.float32, f"backward normalize={normalize}")
