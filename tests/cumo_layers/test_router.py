"""TopKRouter and its auxiliary losses against hand-computed values (cumo_layers/router.py)."""

import math

import pytest
import torch

from cumo_layers.router import TopKRouter, balance_loss, cumo_balance_loss, expert_load, z_loss


def test_balance_loss_hand_computed():
    # 2 tokens, 3 experts, top-1. Token 0 -> expert 0, token 1 -> expert 0.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    idx = torch.tensor([[0], [0]])
    # f = [1, 0, 0]; P = [0.6, 0.25, 0.15]; E * sum f P = 3 * 0.6
    assert balance_loss(probs, idx, 3).item() == pytest.approx(1.8)


def test_balance_loss_top2_counts_every_assignment():
    probs = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]])
    idx = torch.tensor([[0, 1], [2, 3]])
    # f = [1/4] * 4; P = [0.25] * 4 -> 4 * 4 * (1/16) = 1.0 (perfectly balanced)
    assert balance_loss(probs, idx, 4).item() == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_losses_on_zero_tokens_are_zero():
    assert balance_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64), 4).item() == 0
    assert z_loss(torch.zeros(0, 4)).item() == 0


def test_expert_load_ignores_dropped_ids():
    idx = torch.tensor([[0, 3], [3, 4], [-1, 1]])
    assert expert_load(idx, 4).tolist() == [1, 1, 0, 2]


def test_router_forward_and_weighted_aux_loss():
    router = TopKRouter(8, 4, 2, balance_loss_coef=0.5, z_loss_coef=0.25)
    x = torch.randn(10, 8)
    out = router(x)
    logits = x @ router.weight.t()
    assert torch.allclose(out.logits, logits, atol=1e-6)
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.top_k_idx, top.indices)
    assert torch.allclose(out.top_k_weights, top.values / top.values.sum(-1, keepdim=True), atol=1e-6)
    expected_balance = balance_loss(probs, top.indices, 4)
    expected_z = torch.logsumexp(logits, -1).square().mean()
    assert torch.allclose(router.last_aux_loss, 0.5 * expected_balance + 0.25 * expected_z, atol=1e-6)
    router.eval()
    router(x)
    assert router.last_aux_loss is None


def test_router_unnormalised_weights_are_probabilities():
    router = TopKRouter(8, 5, 2, normalize_top_k=False).eval()
    x = torch.randn(6, 8)
    out = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    assert torch.allclose(out.top_k_weights, probs.gather(1, out.top_k_idx), atol=1e-6)


def test_jitter_only_in_training():
    router = TopKRouter(16, 8, 2, jitter=0.5)
    x = torch.randn(64, 16)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.logits, second.logits)
    router.train()
    assert not torch.equal(router(x).logits, first.logits)


def test_aux_loss_gradient_reaches_router():
    router = TopKRouter(8, 4, 2)
    router(torch.randn(10, 8))
    router.last_aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_router_init_matches_nn_linear_bound():
    router = TopKRouter(64, 8, 2)
    assert router.weight.abs().max() <= 1 / math.sqrt(64)
    assert router.weight.std() > 0.25 / math.sqrt(64)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(in_features=8, num_experts=0, top_k=1), ValueError, "num_experts must be >= 1, got 0"),
        (dict(in_features=8, num_experts=4, top_k=0), ValueError, "top_k must be >= 1, got 0"),
        (dict(in_features=8, num_experts=4, top_k=5), ValueError, r"top_k must be <= num_experts \(4\), got 5"),
        (dict(in_features=8, num_experts=4, top_k=2.0), TypeError, "top_k must be an int"),
        (dict(in_features=8, num_experts=4, top_k=2, jitter=1.5), ValueError, r"jitter must be a finite number in \[0.0, 1.0\)"),
        (dict(in_features=8, num_experts=4, top_k=2, backend="gpu"), ValueError, "unknown backend 'gpu'"),
    ],
)
def test_bad_router_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        TopKRouter(**kwargs)


def test_cumo_balance_loss_hand_computed():
    # 2 samples x 2 tokens, 2 experts, top-2 (only the top-1 choice counts in f).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]])
    # sample 0: f = [1, 0], P = [0.75, 0.25] -> 2 * 0.75 = 1.5
    # sample 1: f = [0, 1], P = [0.25, 0.75] -> 2 * 0.75 = 1.5; the mean is 1.5.
    assert cumo_balance_loss(probs, idx, 2, num_samples=2).item() == pytest.approx(1.5)
    # One sample of 4 tokens: f = [0.5, 0.5], P = [0.5, 0.5] -> 2 * 0.5 = 1.0 (balanced overall).
    assert cumo_balance_loss(probs, idx, 2, num_samples=1).item() == pytest.approx(1.0)
    # Switch over the same batch counts both slots of every token: f = [0.5, 0.5] -> 1.0.
    assert balance_loss(probs, idx, 2).item() == pytest.approx(1.0)


def test_cumo_balance_loss_rejects_samples_that_do_not_divide_tokens():
    with pytest.raises(ValueError, match="num_samples"):
        cumo_balance_loss(torch.rand(5, 3).softmax(-1), torch.zeros(5, 1, dtype=torch.int64), 3, num_samples=2)


def test_layer_cumo_balance_loss_is_per_sample():
    from cumo_layers import SparseMoEMLP

    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2, balance_loss="cumo", dtype=torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    moe(x)
    recorded = moe.router.last_balance_loss.item()
    route = moe.eval().router(x.reshape(-1, 8))
    expected = cumo_balance_loss(torch.softmax(route.logits, -1), route.top_k_idx, 4, num_samples=3)
    assert recorded == pytest.approx(expected.item(), rel=1e-12)
    assert recorded != pytest.approx(
        cumo_balance_loss(torch.softmax(route.logits, -1), route.top_k_idx, 4, num_samples=1).item(), rel=1e-12
    )


def test_router_output_load_is_the_routing_histogram():
    router = TopKRouter(8, 5, 2)
    out = router(torch.randn(30, 8))
    assert torch.equal(out.expert_load, torch.bincount(out.top_k_idx.flatten(), minlength=5))


def test_deepcopy_after_training_forward():
    import copy

    router = TopKRouter(8, 4, 2)
    router(torch.randn(6, 8, requires_grad=True))
    assert router.last_aux_loss is not None and router.last_aux_loss.grad_fn is not None
    clone = copy.deepcopy(router)
    assert clone.last_aux_loss is None and torch.equal(clone.weight, router.weight)
    assert router.last_aux_loss is not None  # the original keeps its losses


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(jitter=1.0), ValueError),  # jitter must stay below 1
        (dict(jitter="0.1"), TypeError),  # a string is not a number
        (dict(balance_loss_coef=float("nan")), ValueError),  # NaN coefficient
        (dict(z_loss_coef=-1.0), ValueError),  # negative coefficient
        (dict(balance_loss="gshard"), ValueError),  # unknown loss variant
    ],
)
def test_router_rejects_bad_settings(kwargs, error):
    with pytest.raises(error):
        TopKRouter(8, 4, 2, **kwargs)


def test_router_rejects_integer_input():
    with pytest.raises(TypeError, match="floating point"):
        TopKRouter(8, 4, 2)(torch.ones(3, 8, dtype=torch.int64))


def test_gate_routes_without_counting_or_recording():
    """TopKRouter.gate: forward's routing (same weights, ids, logits) without the load and without touching the
    recorded losses (the expert-parallel layer counts and weighs over every rank itself)."""
    router = TopKRouter(8, 4, 2).train()
    x = torch.randn(6, 8)
    route = router(x)
    recorded = router.last_aux_loss
    gated = router.gate(x)
    assert gated.expert_load is None and router.last_aux_loss is recorded
    for got, expected in zip(gated[:3], route[:3]):
        assert torch.equal(got, expected)
