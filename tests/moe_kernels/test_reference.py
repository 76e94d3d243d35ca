"""The oracle itself: reference ops against a naive per-token loop, and fp64 gradcheck."""

import pytest
import torch

from moe_kernels import reference
from moe_kernels.reference import ACTIVATIONS
from moe_kernels.routing import build_routing_plan
from tests.helpers import ODD_SHAPES, ROUTINGS, Shape, naive_expert_mlp, random_problem, rel_err


@pytest.mark.parametrize("shape,edge", ODD_SHAPES, ids=[edge.split(":")[0] for _, edge in ODD_SHAPES])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_mlp_matches_naive_loop(shape, edge, routing, glu, bias):
    problem = random_problem(shape, torch.float64, glu=glu, bias=bias, routing=routing)
    out = reference.expert_mlp(*problem, activation="silu", glu=glu)
    expected = naive_expert_mlp(*problem, activation="silu", glu=glu)
    assert out.shape == (shape.tokens, shape.d_out)
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations_match_naive_loop(activation):
    problem = random_problem(Shape(9, 8, 6, 5, 3, 2), torch.float64)
    out = reference.expert_mlp(*problem, activation=activation)
    assert rel_err(out, naive_expert_mlp(*problem, activation=activation)) < 1e-12


def test_quick_gelu_formula():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert torch.allclose(ACTIVATIONS["quick_gelu"](x), x * torch.sigmoid(1.702 * x))


@pytest.mark.parametrize("glu", [False, True])
def test_expert_mlp_gradcheck(glu):
    x, weights, idx, w1, b1, w2, b2 = random_problem(Shape(6, 5, 4, 3, 4, 2), torch.float64, glu=glu)
    idx[1, 1] = 4  # one dropped slot: no gradient may reach or leave it
    weights = weights.double()
    inputs = [t.requires_grad_() for t in (x, weights, w1, b1, w2, b2)]

    def fn(x, weights, w1, b1, w2, b2):
        return reference.expert_mlp(x, weights, idx, w1, b1, w2, b2, "gelu", glu)

    assert torch.autograd.gradcheck(fn, inputs)
    fn(*inputs).sum().backward()
    assert weights.grad[1, 1] == 0


def test_permute_grouped_gemm_combine_gradcheck():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0], [1, 3]])
    weights = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    plan = build_routing_plan(idx, 3)  # expert id 3 is out of range: dropped

    def fn(x, weights, w, b):
        rows = reference.grouped_gemm(reference.permute(x, plan), w, plan.expert_offsets, b)
        return reference.combine(rows, weights, idx, plan)

    assert torch.autograd.gradcheck(fn, (x, weights, w, b))


def test_grouped_gemm_segments():
    x = torch.randn(7, 3, dtype=torch.float64)
    w = torch.randn(2, 4, 3, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 5])
    out = reference.grouped_gemm(x, w, offsets)
    assert torch.allclose(out[:2], x[:2] @ w[0].t())
    assert torch.allclose(out[2:5], x[2:5] @ w[1].t())
    assert torch.all(out[5:] == 0)  # rows past offsets[E] are dropped


def test_topk_gating_renormalises_and_matches_softmax():
    logits = torch.randn(11, 6)
    weights, idx = reference.topk_gating(logits, 3, normalize=True)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int64
    assert reference.topk_gating(logits.bfloat16(), 3)[0].dtype == torch.float32
    assert reference.topk_gating(logits.double(), 3)[0].dtype == torch.float64
    assert torch.allclose(weights.sum(-1), torch.ones(11))
    probs = torch.softmax(logits, -1)
    raw, raw_idx = reference.topk_gating(logits, 3, normalize=False)
    assert torch.equal(idx, raw_idx)
    assert torch.allclose(raw, probs.gather(1, idx), atol=1e-7)
    assert torch.all(probs.gather(1, idx).min(-1).values >= probs.topk(3).values[:, -1] - 1e-12)


def test_nan_token_does_not_leak():
    x, weights, idx, w1, b1, w2, b2 = random_problem(Shape(12, 8, 6, 8, 4, 2), torch.float32)
    clean = reference.expert_mlp(x, weights, idx, w1, b1, w2, b2)
    x[5] = float("nan")
    poisoned = reference.expert_mlp(x, weights, idx, w1, b1, w2, b2)
    assert torch.isnan(poisoned[5]).all()
    others = torch.arange(12) != 5
    assert torch.equal(poisoned[others], clean[others])


def test_deterministic():
    problem = random_problem(Shape(64, 16, 8, 16, 4, 2), torch.float32)
    assert torch.equal(reference.expert_mlp(*problem), reference.expert_mlp(*problem))


def test_topk_gating_ties_go_to_lower_expert():
    logits = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3, 0.1]]).log()
    _, idx = reference.topk_gating(logits, 4)
    assert idx.tolist() == [[1, 2, 4, 3]]
