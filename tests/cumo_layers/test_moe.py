"""SparseMoEMLP (cumo_layers/moe.py): function, gradients, odd shapes, bad input, every backend."""

import pytest
import torch
from torch import nn

from cumo_layers import SparseMoEMLP, aux_loss
from moe_kernels import ops
from moe_kernels.reference import ACTIVATIONS
from moe_kernels.routing import apply_capacity, expert_capacity
from tests.helpers import (
    assert_close,
    assert_compiled_matches_eager,
    assert_lowp_close,
    cpu_backends,
    naive_expert_mlp,
    rel_err,
)


def expected_output(moe: SparseMoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The layer's function from a naive loop over its own routing decision (fp64)."""
    tokens = x.reshape(-1, moe.in_features)
    with torch.no_grad():
        route = moe.router(tokens)
        idx = route.top_k_idx
        if moe.capacity_factor is not None:
            idx = apply_capacity(idx, moe.num_experts, expert_capacity(moe.capacity_factor, tokens.shape[0], moe.top_k, moe.num_experts))
        out = naive_expert_mlp(tokens, route.top_k_weights, idx, moe.w1, moe.b1, moe.w2, moe.b2, moe.activation, moe.glu)
    return out.reshape(*x.shape[:-1], moe.out_features)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_naive_loop(activation, glu, bias):
    moe = SparseMoEMLP(12, 10, 7, num_experts=5, top_k=2, activation=activation, glu=glu, bias=bias, dtype=torch.float64)
    x = torch.randn(3, 4, 12, dtype=torch.float64)  # leading dims are kept
    y = moe(x)
    assert y.shape == (3, 4, 7)
    assert rel_err(y, expected_output(moe, x)) < 1e-12


def test_parameter_layout_matches_design():
    moe = SparseMoEMLP(16, 32, 24, num_experts=4, top_k=2, glu=True)
    shapes = {name: tuple(p.shape) for name, p in moe.named_parameters()}
    assert shapes == {"router.weight": (4, 16), "w1": (4, 64, 16), "b1": (4, 64), "w2": (4, 24, 32), "b2": (4, 24)}
    assert SparseMoEMLP(16, 32, bias=False).b1 is None


def test_layer_gradcheck_fp64():
    moe = SparseMoEMLP(6, 5, 4, num_experts=4, top_k=2, activation="gelu_tanh", glu=True, dtype=torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    params = list(moe.parameters())

    names = [name for name, _ in moe.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(moe, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_() for p in params]))


def test_gradients_reach_every_parameter():
    moe = SparseMoEMLP(8, 16, num_experts=4, top_k=2)
    out = moe(torch.randn(64, 8))
    (out.square().mean() + moe.last_aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype):
    moe = SparseMoEMLP(32, 48, num_experts=4, top_k=2, activation="silu", glu=True, dtype=torch.float64)
    x = torch.randn(40, 32, dtype=torch.float64)
    with torch.no_grad():
        route = moe.router(x)
        exact = naive_expert_mlp(x, route.top_k_weights, route.top_k_idx, moe.w1, moe.b1, moe.w2, moe.b2, "silu", True)
        low = SparseMoEMLP(32, 48, num_experts=4, top_k=2, activation="silu", glu=True, dtype=dtype)
        low.load_state_dict({k: v.to(dtype) for k, v in moe.state_dict().items()})
        # Same routing for both, so only the expert math differs.
        args = (x.to(dtype), route.top_k_weights, route.top_k_idx, low.w1, low.b1, low.w2, low.b2, "silu", True)
        low_out = ops.expert_mlp(*args, backend="torch")
        layer_backend_out = ops.expert_mlp(*args, backend=low.backend)
        y = low(x.to(dtype))
    assert y.dtype == dtype
    assert_lowp_close(layer_backend_out, low_out, exact, f"backend {low.backend!r} in {dtype}")
    assert rel_err(y, exact) < 0.05  # routing may flip for near-ties in low precision, output stays close


@pytest.mark.parametrize(
    "shape",
    [
        (0, 8),  # 0 tokens
        (2, 0, 8),  # 0 tokens behind leading dims
        (1, 8),  # 1 token: most experts get nothing
        (8,),  # a single vector, no token dim
    ],
)
def test_odd_token_counts(shape):
    moe = SparseMoEMLP(8, 6, 5, num_experts=4, top_k=2, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert y.shape == (*shape[:-1], 5)
    assert rel_err(y, expected_output(moe, x)) < 1e-12
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_top_k_equals_num_experts():
    moe = SparseMoEMLP(8, 6, num_experts=3, top_k=3, dtype=torch.float64)
    x = torch.randn(10, 8, dtype=torch.float64)
    assert rel_err(moe(x), expected_output(moe, x)) < 1e-12
    assert moe.last_expert_load.tolist() == [10, 10, 10]


def test_all_tokens_on_one_expert():
    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=1, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
    x = torch.rand(16, 8, dtype=torch.float64) + 0.1  # positive: expert 2 wins every token
    y = moe(x)
    assert moe.last_expert_load.tolist() == [0, 0, 16, 0]
    assert rel_err(y, expected_output(moe, x)) < 1e-12


def test_non_contiguous_input():
    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2, dtype=torch.float64)
    base = torch.randn(8, 5, 3, dtype=torch.float64)
    x = base.transpose(0, 2)  # [3, 5, 8], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(moe(x), moe(x.contiguous()))


def test_nan_token_changes_no_other_token():
    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2).eval()
    x = torch.randn(20, 8)
    clean = moe(x)
    x[7, 3] = float("nan")
    poisoned = moe(x)
    assert torch.isnan(poisoned[7]).all()
    others = torch.arange(20) != 7
    # Not bit-equal: the NaN token's routing changes the expert segment sizes, and BLAS blocking with them.
    assert torch.isfinite(poisoned[others]).all()
    assert_close(poisoned[others], clean[others], torch.float32, "other tokens")


def test_deterministic_output():
    moe = SparseMoEMLP(16, 32, num_experts=8, top_k=2).eval()
    x = torch.randn(100, 16)
    assert torch.equal(moe(x), moe(x))


@pytest.mark.parametrize("factor", [0.25, 1.0, 8.0])
def test_capacity_factor_drops_overflow(factor):
    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2, capacity_factor=factor, dtype=torch.float64)
    x = torch.randn(30, 8, dtype=torch.float64)
    y = moe(x)
    capacity = expert_capacity(factor, 30, 2, 4)
    assert int(moe.last_expert_load.max()) <= capacity
    assert rel_err(y, expected_output(moe, x)) < 1e-12
    if factor == 8.0:  # capacity above demand: identical to dropless
        dropless = SparseMoEMLP(8, 6, num_experts=4, top_k=2, dtype=torch.float64)
        dropless.load_state_dict(moe.state_dict())
        assert torch.equal(dropless(x), y)


def test_aux_loss_sums_every_moe_layer():
    model = nn.Sequential(SparseMoEMLP(8, 6, num_experts=4, top_k=2), nn.ReLU(), SparseMoEMLP(8, 6, num_experts=3, top_k=1))
    model(torch.randn(12, 8))
    total = model[0].last_aux_loss + model[2].last_aux_loss
    assert torch.allclose(aux_loss(model), total)
    model.eval()
    model(torch.randn(12, 8))
    assert aux_loss(model).item() == 0
    assert aux_loss(nn.Linear(2, 2)).item() == 0


def test_autocast_bf16_on_cpu():
    moe = SparseMoEMLP(16, 32, num_experts=4, top_k=2)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, moe(x)) < 0.05


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(num_experts=0), ValueError, "num_experts must be >= 1, got 0"),
        (dict(top_k=0), ValueError, "top_k must be >= 1, got 0"),
        (dict(num_experts=2, top_k=3), ValueError, r"top_k must be <= num_experts \(2\), got 3"),
        (dict(activation="swish"), ValueError, r"unknown activation 'swish'; expected one of \['gelu'"),
        (dict(backend="npu"), ValueError, "unknown backend 'npu'"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be > 0 or None"),
        (dict(capacity_factor=float("inf")), ValueError, r"capacity_factor \(None = dropless\) must be a finite"),
        (dict(capacity_factor="1.0"), TypeError, r"capacity_factor \(None = dropless\) must be a number"),
        (dict(balance_loss="top1"), ValueError, "balance_loss must be one of"),
        (dict(dtype=torch.int32), TypeError, "floating point dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        SparseMoEMLP(8, 6, **kwargs)


def test_bad_hidden_size():
    with pytest.raises(ValueError, match="hidden_features must be an int >= 1, got 0"):
        SparseMoEMLP(8, 0)


@pytest.mark.parametrize(
    "x,error,pattern",
    [
        (torch.randn(4, 9), ValueError, r"expects input \[\.\.\., 8\] \(in_features=8\), got shape \(4, 9\)"),
        (torch.ones(4, 8, dtype=torch.int64), TypeError, "floating point input, got dtype torch.int64"),
        (torch.tensor(1.0), ValueError, "got a 0-d tensor"),
        (torch.randn(4, 8, dtype=torch.float64), TypeError, "does not match the expert weights' dtype torch.float32"),
        ([1.0] * 8, TypeError, "expects a torch.Tensor, got list"),
    ],
)
def test_bad_input(x, error, pattern):
    moe = SparseMoEMLP(8, 6)
    with pytest.raises(error, match=pattern):
        moe(x)


BACKEND_NAMES = ["cpu", "triton", "cuda"]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_named_backend_matches_torch_or_raises(backend):
    """Each named backend either computes the reference's function or refuses to run: never a fallback."""
    device = "cpu"
    reason = ops.unavailable_reason(backend, device)
    moe = SparseMoEMLP(16, 12, 10, num_experts=4, top_k=2, glu=True, activation="silu", backend=backend)
    x = torch.randn(2, 9, 16)
    if reason is not None:
        with pytest.raises(ops.BackendUnavailableError, match=f"backend '{backend}' cannot run on cpu"):
            moe(x)
        return
    ref = SparseMoEMLP(16, 12, 10, num_experts=4, top_k=2, glu=True, activation="silu", backend="torch")
    ref.load_state_dict(moe.state_dict())
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = moe(x), ref(x_ref)
    assert_close(y, y_ref, torch.float32, f"{backend} forward")
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float32, f"{backend} dx")
    for (name, p), p_ref in zip(moe.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float32, f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiles_to_one_graph(backend):
    """torch.compile(fullgraph=True) traces the layer, forward and backward, without graph breaks."""
    moe = SparseMoEMLP(16, 24, num_experts=4, top_k=2, glu=True, activation="silu", backend=backend)
    assert_compiled_matches_eager(moe, torch.randn(11, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_to_one_graph_gpu(backend, compiler):
    """The GPU backends under torch.compile(fullgraph=True), forward and backward, against eager; the
    cuda backend in bf16 (torch._grouped_mm traces 16-bit operands only)."""
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    moe = SparseMoEMLP(64, 96, num_experts=8, top_k=2, glu=True, activation="silu", backend=backend)
    moe = moe.to("cuda", dtype)
    assert_compiled_matches_eager(moe, torch.randn(37, 64, device="cuda", dtype=dtype), compiler)


def test_meta_input_is_rejected_clearly():
    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="meta device"):
        moe(torch.empty(3, 8, device="meta"))


def test_deepcopy_after_training_forward():
    import copy

    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2)
    moe(torch.randn(5, 8)).sum().backward()
    clone = copy.deepcopy(moe)
    x = torch.randn(4, 8)
    assert torch.equal(clone.eval()(x), moe.eval()(x))


def test_capacity_load_equals_a_recount():
    moe = SparseMoEMLP(8, 6, num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(40, 8)
    moe(x)
    route = moe.router(x)
    capacity = expert_capacity(0.5, 40, 2, 4)
    kept = apply_capacity(route.top_k_idx, 4, capacity)
    assert torch.equal(moe.last_expert_load, torch.bincount(kept[kept < 4], minlength=4))


@pytest.mark.parametrize("backend,compiler", [
    ("torch", "aot_eager"), ("torch", "inductor"), ("cpu", "aot_eager"), ("cpu", "inductor"),
    ("triton", "aot_eager"),  # under the interpreter: its custom ops (experts, gating, losses, load) traced
    pytest.param("triton", "inductor", marks=pytest.mark.slow),
])
def test_compile_dynamic_token_counts(backend, compiler, monkeypatch):
    """fullgraph compile, forward and backward with the router's losses, over 5 token counts and then 0 (an
    expert-parallel rank may hold none): at most 3 graphs for the counts (the first specialises, the second marks
    the token dim dynamic) and one more for 0 (a size of 0 is always specialised); the output, the aux loss and
    the input gradient equal to eager."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors
    if ops.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(ops.unavailable_reason(backend, "cpu"))
    torch._dynamo.reset()
    counters.clear()
    moe = SparseMoEMLP(16, 24, num_experts=4, top_k=2, glu=True, activation="silu", backend=backend)
    compiled = torch.compile(moe, backend=compiler, fullgraph=True)
    for tokens in (3, 7, 16, 33, 50, 0):
        x = torch.randn(tokens, 16, requires_grad=True)
        y = compiled(x)
        aux = moe.last_aux_loss
        (y.sum() + aux).backward()
        grad, x.grad = x.grad, None
        expected = moe(x)
        (expected.sum() + moe.last_aux_loss).backward()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux, moe.last_aux_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)
        if tokens == 50:
            assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("tokens", [0, 1, 12, 50])
def test_eval_forward_is_one_op_and_equals_the_router_path(backend, tokens, monkeypatch):
    """An eval forward runs ops.moe_mlp (on triton: one launch sequence, the router's GEMM, gating and plan in
    one kernel up to 16 x 8 slots); with a hook on the router it runs the router module, which the hook sees.
    Both give the same output and load, and the load is the routing's count."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    moe = SparseMoEMLP(16, 12, num_experts=16, top_k=8, glu=True, activation="silu", backend=backend).eval()
    moe.router.last_aux_loss = torch.ones(())  # an eval forward clears what a training forward left
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        fused, fused_load = moe(x), moe.last_expert_load
        assert moe.last_aux_loss is None
        seen = []
        moe.router.register_forward_hook(lambda module, args, out: seen.append(out.top_k_idx))
        apart = moe(x)
    assert len(seen) == 1
    torch.testing.assert_close(fused, apart, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused_load, moe.last_expert_load)
    assert fused_load.tolist() == torch.bincount(seen[0].reshape(-1), minlength=16).tolist()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("balance_loss", ["switch", "cumo"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_training_forward_through_one_op_equals_the_router_path(backend, balance_loss, capacity_factor, monkeypatch):
    """A training step through ops.moe_mlp (the jittered router input, capacity, losses from its logits and load)
    against the same step with the router called as a module (a hook on it): output, losses, load, gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    moe = SparseMoEMLP(16, 12, num_experts=8, top_k=2, activation="gelu", router_jitter=0.1, balance_loss=balance_loss,
                       capacity_factor=capacity_factor, backend=backend)
    x = torch.randn(3, 5, 16)
    results = []
    for hooked in (False, True):
        if hooked:
            moe.router.register_forward_hook(lambda module, args, out: None)
        torch.manual_seed(7)  # the same jitter noise
        x_leaf = x.clone().requires_grad_()
        out = moe(x_leaf)
        losses = (moe.router.last_balance_loss, moe.router.last_z_loss, moe.last_aux_loss)
        grads = torch.autograd.grad(out.square().sum() + moe.last_aux_loss, [x_leaf, *moe.parameters()])
        results.append((out, *losses, moe.last_expert_load, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_router_subclass_with_its_own_forward_is_called():
    """A router swapped for a subclass (here: a fixed preference for expert 3) is run as a module, not bypassed."""
    from cumo_layers import TopKRouter

    class Biased(TopKRouter):
        def forward(self, x, num_samples=1, count_load=False):
            route = super().forward(x, num_samples, count_load)
            idx = route.top_k_idx.clone()
            idx[:, 0] = 3
            return route._replace(top_k_idx=idx, expert_load=torch.bincount(idx.reshape(-1), minlength=4))

    moe = SparseMoEMLP(16, 12, num_experts=4, top_k=1).eval()
    biased = Biased(16, 4, 1)
    biased.load_state_dict(moe.router.state_dict())
    moe.router = biased
    x = torch.randn(6, 16)
    with torch.no_grad():
        moe(x)
    assert moe.last_expert_load.tolist() == [0, 0, 0, 6]


def test_a_backward_hook_on_the_router_sees_the_backward():
    moe = SparseMoEMLP(16, 12, num_experts=4, top_k=2)
    seen = []
    moe.router.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    moe(torch.randn(5, 16, requires_grad=True)).sum().backward()
    assert seen == [(5, 2)]  # the gradient of the router's top-k weights


@pytest.mark.parametrize("backend", cpu_backends())
def test_eval_forward_compiles_to_one_graph(backend, monkeypatch):
    """torch.compile(fullgraph=True) of an eval forward (ops.moe_mlp traced as the ops one by one, through their
    custom ops), over token counts that take the fused kernel eagerly and some that do not."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    moe = SparseMoEMLP(16, 24, num_experts=8, top_k=2, glu=True, activation="silu", backend=backend).eval()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for tokens in (1, 9, 80):
            x = torch.randn(tokens, 16)
            y, load = compiled(x), moe.last_expert_load
            torch.testing.assert_close(y, moe(x), rtol=1e-5, atol=1e-6)
            assert torch.equal(load, moe.last_expert_load)


@pytest.mark.slow
def test_soak_random_layer_calls_keep_memory_flat():
    """1000 forward + backward calls over a mix of layers, token counts (0 included), dtypes (bf16 by
    autocast), training and eval: resident memory after the warm-up stays flat. The inputs cycle
    through a fixed set, so PyTorch's own per-shape caches (oneDNN's bf16 GEMM primitives grow by
    hundreds of MB over random shapes, with or without this package) fill during the warm-up; a leak
    of one call's activations (a few hundred KB) would add well over 100 MB."""
    import gc
    import os

    def resident_mb() -> float:
        gc.collect()
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    layers = [SparseMoEMLP(64, 256, num_experts=e, top_k=k, glu=glu, capacity_factor=cf)
              for e, k, glu, cf in [(4, 2, False, None), (8, 8, True, None), (16, 1, True, 1.0), (6, 3, False, 0.5)]]
    inputs = [torch.randn(tokens, 64) for tokens in (0, 1, 7, 64, 200)]
    baseline = None
    for call in range(1000):
        layer = layers[call % len(layers)].train(call % 3 != 0)
        autocast = call % 5 == 0
        x = inputs[call % len(inputs)].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        (y.float().square().mean() + (layer.last_aux_loss if layer.training else 0)).backward()
        layer.zero_grad(set_to_none=True)
        if call == 200:
            baseline = resident_mb()
    growth = resident_mb() - baseline
    assert growth < 20, f"resident memory grew {growth:.1f} MB over 800 calls"
