"""Triton backend against moe_kernels.reference, under TRITON_INTERPRET=1 on CPU tensors.

Every test counts kernel launches (moe_kernels.triton.LAUNCHES), so a silent fallback to PyTorch
cannot pass. fp32 and fp16 only: the interpreter's bf16 tl.dot is broken. GPU tests (compiled
kernels, bf16, 64-bit offsets) are marked and skip without CUDA.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels.triton as triton_backend  # noqa: E402
from moe_kernels import ops, reference  # noqa: E402
from moe_kernels.routing import build_routing_plan  # noqa: E402
from moe_kernels.triton.routing import scan_in_scatter_tile  # noqa: E402
from tests.helpers import (  # noqa: E402
    ODD_SHAPES,
    ROUTINGS,
    Shape,
    assert_close,
    assert_compiled_matches_eager,
    assert_lowp_close,
    assert_matches_reference,
    random_problem,
    require_compiled_kernels,
)
from tests.moe_kernels.triton_launches import (  # noqa: E402
    backward_kernels,
    differentiable,
    forward_kernels,
    launches,
    routing_kernels,
)

ACTIVATIONS = list(reference.ACTIVATIONS)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Run the kernels through Triton's interpreter on CPU tensors, for this module only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_backend.reset_launch_counts()
    yield


def lower_id_topk(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k ids with ties to the lower id (the contract). torch.topk does not promise that
    order on ties (on CPU with E=64 it can pick the higher id), so ids are checked against a
    stable sort of the same fp32 probabilities."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return probs.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]


def grads(out, inputs, grad_out):
    live = [a for a in inputs if a is not None and a.requires_grad]
    return torch.autograd.grad(out, live, grad_out)


def drop_some_slots(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mark about a quarter of the slots dropped, with both sentinels (E and -1)."""
    idx = idx.clone()
    chosen = torch.rand(idx.shape) < 0.25
    sentinel = torch.where(torch.rand(idx.shape) < 0.5, num_experts, -1)
    return torch.where(chosen, sentinel, idx)


# ----------------------------------------------------------------------------------------------
# Availability


def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    x, w, idx, w1, b1, w2, b2 = random_problem(Shape(3, 8, 4, 8, 2, 1))
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.expert_mlp(x, w, idx, w1, b1, w2, b2, backend="triton")
    with pytest.raises(ops.BackendUnavailableError):
        triton_backend.expert_mlp(x, w, idx, w1, b1, w2, b2)
    with pytest.raises(ops.BackendUnavailableError):
        triton_backend.topk_gating(torch.randn(3, 4), 2)
    assert launches() == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None
    assert ops.resolve_backend("triton", "cpu") is triton_backend


def test_rejects_fp64():
    """Every Triton op refuses float64 with a TypeError naming it: the kernels compute in fp32 (the gating would
    otherwise return fp32 weights for fp64 logits, and route by probabilities that underflow in fp32)."""
    args = random_problem(Shape(3, 8, 4, 8, 2, 1), dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        triton_backend.expert_mlp(*args)
    logits = torch.tensor([[1.0, 1.0 + 1e-12, -1.0]], dtype=torch.float64)
    for requires_grad in (False, True):
        with pytest.raises(TypeError, match="gating kernels take .*float64"):
            ops.topk_gating(logits.clone().requires_grad_(requires_grad), 1, False, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        ops.router_losses(logits, torch.ones(1, 3), 1.0, 1.0, 1.0, backend="triton")


# ----------------------------------------------------------------------------------------------
# Routing metadata


@pytest.mark.parametrize("routing", ROUTINGS + ["dropped"])
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES] + [
    Shape(300, 8, 8, 8, 7, 2),  # 600 slots: several histogram blocks; E+1 = 8 buckets, a full power of two
    Shape(100, 8, 8, 8, 1000, 2),  # E=1000: 16-slot blocks; the scan kernel carries over steps
    Shape(16, 8, 8, 8, 64, 8),  # 128 slots x 128 buckets: the largest one-program plan
    Shape(17, 8, 8, 8, 64, 8),  # one token more: three kernels
], ids=[why for _, why in ODD_SHAPES] + ["several slot blocks", "many experts", "largest one-block", "past one block"])
@pytest.mark.parametrize("scan_kernel", [False, True], ids=["scan in the scatter", "scan kernel"])
def test_routing_plan_matches_reference(shape, routing, scan_kernel):
    idx = reference_idx = random_problem(shape, routing="random" if routing == "dropped" else routing)[2]
    if routing == "dropped":
        idx = reference_idx = drop_some_slots(idx, shape.experts)
        idx[0:1, 0] = 10**12  # far outside [0, E): still dropped, never an address
    # scan kernel: what plans past 2048 tokens at top-8 of 64 experts take
    with scan_in_scatter_tile(0) if scan_kernel else contextlib.nullcontext():
        plan = triton_backend.routing_plan(idx, shape.experts)
        assert launches() == routing_kernels(shape)
    expected = build_routing_plan(reference_idx, shape.experts)
    for name, got, want in zip(plan._fields, plan, expected):
        if name == "top_k":
            assert got == want
        else:
            assert got.dtype == torch.int64 and torch.equal(got, want), name


# ----------------------------------------------------------------------------------------------
# Router


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k", [
    (0, 4, 2),  # no tokens: nothing launched
    (1, 4, 2),  # one token
    (37, 6, 2),  # CuMo-like, token count not a multiple of the tile
    (19, 8, 8),  # top_k == num_experts: the weights are the softmax itself (renormalised)
    (70, 64, 8),  # fine-grained: many experts, the row tile holds few tokens
    (5, 3, 1),  # top-1, non power-of-two experts: padding columns must never win
])
def test_topk_gating(tokens, experts, top_k, normalize, dtype):
    logits = (2 * torch.randn(tokens, experts)).to(dtype).requires_grad_()
    weights, idx = triton_backend.topk_gating(logits, top_k, normalize)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_weights, ref_idx = reference.topk_gating(ref_logits, top_k, normalize)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, lower_id_topk(logits, top_k))
    assert_close(weights.detach(), ref_weights.detach(), torch.float32, "top-k weights")
    if not torch.equal(idx, ref_idx):
        # torch.topk broke an exact tie (fp16 logits) the other way: the reference's function on
        # the contract's choice of expert, so the gradient is compared on the same experts.
        assert dtype == torch.float16
        ref_weights = torch.softmax(ref_logits.float(), dim=-1).gather(1, idx)
        if normalize:
            ref_weights = ref_weights / ref_weights.sum(dim=-1, keepdim=True)
    grad_weights = torch.randn(tokens, top_k)
    (grad_logits,) = torch.autograd.grad(weights, logits, grad_weights)
    (ref_grad,) = torch.autograd.grad(ref_weights, ref_logits, grad_weights)
    assert grad_logits.dtype == dtype
    if top_k == 1 and normalize:
        # The one weight is identically 1: the gradient is zero (the reference's is rounding noise).
        assert torch.count_nonzero(grad_logits) == 0
    else:
        assert_close(grad_logits.float(), ref_grad.float(), dtype, "d logits")
    expected = {} if tokens == 0 else {"topk_gating_kernel": 1, "topk_gating_backward_kernel": 1}
    assert launches() == expected


def test_topk_gating_ties_go_to_the_lower_id():
    logits = torch.randint(-2, 3, (50, 64)).float()  # many exact ties
    weights, idx = triton_backend.topk_gating(logits, 8, True)
    ref_weights, _ = reference.topk_gating(logits, 8, True)
    assert torch.equal(idx, lower_id_topk(logits, 8))
    assert torch.equal(idx[:, 0], logits.argmax(dim=-1))  # argmax returns the first maximum
    assert_close(weights.detach(), ref_weights.detach(), torch.float32, "weights")


def test_topk_gating_non_contiguous():
    logits = torch.randn(12, 20)[:, ::2]  # [12, 10], column stride 2
    weights, idx = triton_backend.topk_gating(logits, 3)
    ref_weights, ref_idx = reference.topk_gating(logits, 3)
    assert torch.equal(idx, ref_idx)
    assert_close(weights.detach(), ref_weights.detach(), torch.float32, "weights")


# ----------------------------------------------------------------------------------------------
# Expert MLP, fp32


def check_expert_mlp(args, activation="gelu", glu=False, grad_out_strided=False):
    """Forward and backward of the Triton expert MLP against the reference (the shared harness);
    returns the forward's and the backward's kernel launches."""
    launches()
    out = triton_backend.expert_mlp(*differentiable(args), activation, glu)
    forward_launches = launches()
    grad_out = torch.randn(out.shape[0], 2 * out.shape[1])[:, ::2] if grad_out_strided else torch.randn_like(out)
    out.backward(grad_out)
    backward_launches = launches()
    assert_matches_reference(triton_backend.expert_mlp, args, activation, glu, grad_out)
    launches()
    return forward_launches, backward_launches


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[why for _, why in ODD_SHAPES])
def test_expert_mlp_fp32(shape, routing):
    forward, backward = check_expert_mlp(random_problem(shape, routing=routing))
    if shape.tokens == 0:
        assert forward == {} and backward == {}
    else:
        assert forward == forward_kernels(shape)
        assert backward == backward_kernels(shape)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_mlp_activations(activation, glu):
    # Bias only on the GLU cases, so both epilogues run with and without it.
    shape = Shape(21, 24, 20, 20, 4, 2)
    forward, backward = check_expert_mlp(random_problem(shape, glu=glu, bias=glu), activation, glu)
    assert forward == forward_kernels(shape) and backward == backward_kernels(shape)


def test_expert_mlp_dropped_slots_cannot_leak_nan():
    shape = Shape(40, 24, 12, 20, 5, 3)
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape)
    idx = drop_some_slots(idx, shape.experts)
    weights = torch.where((idx < 0) | (idx >= shape.experts), float("nan"), weights)
    check_expert_mlp((x, weights, idx, w1, b1, w2, b2), "silu", glu=False)
    args = differentiable((x, weights, idx, w1, b1, w2, b2))
    out = triton_backend.expert_mlp(*args, "silu", False)
    out.sum().backward()
    for a in args:
        if a is not None and a.requires_grad:
            assert torch.isfinite(a.grad).all()
    dropped = (idx < 0) | (idx >= shape.experts)
    assert (args[1].grad[dropped] == 0).all()


def test_expert_mlp_every_slot_dropped():
    x, weights, idx, w1, b1, w2, b2 = random_problem(Shape(9, 16, 8, 16, 4, 2))
    idx = torch.full_like(idx, 4)
    check_expert_mlp((x, weights, idx, w1, b1, w2, b2))


def test_expert_mlp_non_contiguous():
    shape = Shape(23, 24, 12, 20, 4, 2)
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, glu=True)
    x = torch.randn(shape.tokens, 2 * shape.d_in)[:, ::2]  # row stride 2*D, column stride 2
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H1, D] stored column-major
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    weights = torch.randn(shape.top_k, shape.tokens).softmax(0).t()
    idx = idx.t().contiguous().t()
    assert not (x.is_contiguous() or w1.is_contiguous() or weights.is_contiguous() or idx.is_contiguous())
    check_expert_mlp((x, weights, idx, w1, b1, w2, b2), "gelu_tanh", glu=True, grad_out_strided=True)


def test_expert_mlp_partial_grads():
    """Only x and w1 need grad: fc2 folds the top-k weights into its epilogue, no rows are kept,
    and only the kernels those gradients need run."""
    shape = Shape(30, 16, 24, 16, 4, 2)
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape)
    x.requires_grad_()
    w1.requires_grad_()
    out = triton_backend.expert_mlp(x, weights, idx, w1, b1, w2, b2, "relu", False)
    ref_x, ref_w1 = x.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    ref_out = reference.expert_mlp(ref_x, weights, idx, ref_w1, b1, w2, b2, "relu", False)
    assert_close(out.detach(), ref_out.detach(), torch.float32, "out")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w1), grad_out)
    want = torch.autograd.grad(ref_out, (ref_x, ref_w1), grad_out)
    for name, g, w in zip(("d x", "d w1"), got, want):
        assert_close(g, w, torch.float32, name)
    assert launches() == {**routing_kernels(shape), "grouped_gemm_kernel": 4, "grouped_weight_grad_kernel": 1,
                          "combine_kernel": 2}  # routed once: the backward reuses the forward's plan


def test_expert_mlp_inference():
    shape = Shape(17, 16, 8, 24, 4, 2)
    args = random_problem(shape, glu=True)
    with torch.no_grad():
        out = triton_backend.expert_mlp(*args, "quick_gelu", True)
    assert_close(out, reference.expert_mlp(*args, "quick_gelu", True), torch.float32, "out")
    assert launches() == forward_kernels(shape)


def test_expert_mlp_deterministic():
    args = differentiable(random_problem(Shape(45, 16, 8, 16, 4, 3), routing="one_expert"))
    results = []
    for _ in range(2):
        out = triton_backend.expert_mlp(*args, "gelu", False)
        results.append((out, *grads(out, args, torch.ones_like(out))))
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# Expert MLP, fp16 (flash-attention's rule against an fp64 reference)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("shape", [
    Shape(7, 24, 12, 20, 4, 2),  # odd sizes, T < any tile
    Shape(33, 32, 16, 32, 8, 8),  # top_k == num_experts
    Shape(70, 40, 24, 56, 6, 3),  # several row tiles per expert
])
def test_expert_mlp_fp16(shape, glu):
    args = random_problem(shape, dtype=torch.float16, glu=glu)
    assert_matches_reference(triton_backend.expert_mlp, args, "silu", glu)
    assert sum(launches().values()) > 0


# ----------------------------------------------------------------------------------------------
# The whole layer: router -> gating -> expert MLP, through moe_kernels.ops


@pytest.mark.parametrize("glu", [False, True])
def test_layer_forward_backward(glu):
    shape = Shape(26, 24, 16, 24, 6, 2)
    x, _, _, w1, b1, w2, b2 = random_problem(shape, glu=glu)
    router = torch.randn(shape.experts, shape.d_in) / shape.d_in**0.5
    params = differentiable((x, router, w1, b1, w2, b2))
    ref_params = differentiable(params)

    def layer(backend, x, router, w1, b1, w2, b2):
        weights, idx = ops.topk_gating(x @ router.t(), shape.top_k, True, backend=backend)
        return ops.expert_mlp(x, weights, idx, w1, b1, w2, b2, "gelu", glu, backend=backend), idx

    out, idx = layer("triton", *params)
    ref_out, ref_idx = layer("torch", *ref_params)
    assert torch.equal(idx, ref_idx)
    assert_close(out.detach(), ref_out.detach(), torch.float32, "out")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(ref_out, ref_params, grad_out)
    for name, g, w in zip(("x", "router weight", "w1", "b1", "w2", "b2"), got, want):
        assert_close(g, w, torch.float32, f"d {name}")
    counts = launches()
    assert counts["topk_gating_kernel"] == 1 and counts["topk_gating_backward_kernel"] == 1
    assert counts["topk_weight_grad_kernel"] == 1 and counts["grouped_gemm_kernel"] == 4


def test_sparse_moe_mlp_module():
    layers = pytest.importorskip("cumo_layers")
    torch.manual_seed(1)
    layer = layers.SparseMoEMLP(24, 16, num_experts=4, top_k=2, activation="quick_gelu", backend="triton")
    ref_layer = layers.SparseMoEMLP(24, 16, num_experts=4, top_k=2, activation="quick_gelu", backend="torch")
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out = layer(x)
    ref_out = ref_layer(ref_x)
    assert_close(out.detach(), ref_out.detach(), torch.float32, "out")
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert_close(x.grad, ref_x.grad, torch.float32, "d x")
    for (name, p), ref_p in zip(layer.named_parameters(), ref_layer.parameters()):
        assert_close(p.grad, ref_p.grad, torch.float32, f"d {name}")
    assert launches()["grouped_gemm_kernel"] == 4


def test_layer_compiles_to_one_graph():
    """The Triton ops are torch.library custom ops with fakes and autograd: torch.compile(fullgraph=True)
    traces the layer, forward and backward, with the kernels as opaque nodes, and the compiled layer
    still launches them (no silent fallback) and matches eager."""
    layers = pytest.importorskip("cumo_layers")
    torch.manual_seed(2)
    layer = layers.SparseMoEMLP(16, 24, num_experts=4, top_k=2, glu=True, activation="silu", backend="triton")
    launches()

    def compiled_backward_launched():  # fc1, fc2 of the compiled forward; d pre, dX of its backward
        counts = launches()
        assert counts["grouped_gemm_kernel"] == 4, counts

    assert_compiled_matches_eager(layer, torch.randn(11, 16), after_compiled_backward=compiled_backward_launched)


def test_custom_ops_pass_opcheck():
    """Schemas, fakes and autograd registrations of the Triton custom ops agree with what they compute."""
    from moe_kernels.triton import experts as triton_expert_mlp
    from moe_kernels.triton import gating as triton_gating

    shape = Shape(9, 12, 8, 10, 4, 2)
    x, w, idx, w1, b1, w2, b2 = differentiable(random_problem(shape, glu=True))
    for glu in (True, reference.GluSpec("clamped", interleaved=True, limit=0.5, up_offset=1.0)):
        torch.library.opcheck(triton_expert_mlp._expert_mlp_forward_op,
                              (x, w, idx, w1, b1, w2, b2, "silu", *reference.glu_code(glu), True, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    logits = torch.randn(9, 4, requires_grad=True)
    torch.library.opcheck(triton_gating._topk_gating_op, (logits, 2, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------
# Bigger matrix (slow under the interpreter)


@pytest.mark.slow
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [
    Shape(257, 64, 96, 48, 8, 2),  # several tiles in every dimension
    Shape(100, 48, 40, 72, 16, 4),  # many experts with few rows each
])
def test_expert_mlp_fp32_larger(shape, activation, glu):
    args = random_problem(shape, glu=glu, routing="skip_experts")
    forward, backward = check_expert_mlp(args, activation, glu)
    assert forward == forward_kernels(shape) and backward == backward_kernels(shape)


# ----------------------------------------------------------------------------------------------
# Compiled kernels on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("glu", [False, True])
def test_expert_mlp_cuda(dtype, glu, monkeypatch):
    require_compiled_kernels(monkeypatch)
    shape = Shape(300, 256, 192, 128, 8, 2)
    args = random_problem(shape, dtype=dtype, device="cuda", glu=glu, routing="skip_experts")
    args = list(args)
    args[2] = drop_some_slots(args[2].cpu(), shape.experts).cuda()
    assert_matches_reference(triton_backend.expert_mlp, args, "gelu", glu)
    assert launches()["grouped_gemm_kernel"] == 4


@pytest.mark.gpu
@pytest.mark.slow
def test_expert_mlp_cuda_64bit_offsets(monkeypatch):
    """T*K*D past 2**31 elements: the permuted-row buffers need 64-bit index arithmetic."""
    require_compiled_kernels(monkeypatch)
    shape = Shape(2**18 + 3, 4096, 64, 64, 4, 2)  # dX rows: (2**19 + 6) * 4096 > 2**31 elements
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_()
    out = triton_backend.expert_mlp(x, weights, idx, w1, b1, w2, b2)
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    tail = slice(shape.tokens - 5, shape.tokens)  # the last tokens sit past the 2**31 boundary
    results = []
    for dtype in (torch.bfloat16, torch.float64):
        ref_x = x[tail].detach().to(dtype).requires_grad_()
        ref_out = reference.expert_mlp(ref_x, weights[tail], idx[tail], *(p.to(dtype) for p in (w1, b1, w2, b2)))
        results.append((ref_out, *torch.autograd.grad(ref_out, ref_x, torch.ones_like(ref_out))))
    (lowp_out, lowp_grad), (exact_out, exact_grad) = results
    assert_lowp_close(out[tail], lowp_out, exact_out, "out past 2**31")
    assert_lowp_close(grad_x[tail], lowp_grad, exact_grad, "d x past 2**31")


def test_activation_codes_follow_the_reference_table():
    """The kernels' constexpr codes and the reference's activation table name the same functions."""
    from moe_kernels.triton import expert_launches as triton_ops
    from moe_kernels.triton.runtime import kernels

    module = kernels(True)
    for name, code in triton_ops.ACTIVATION_CODES.items():
        assert getattr(module, name.upper()) == code, name
    assert list(triton_ops.ACTIVATION_CODES) == list(reference.ACTIVATIONS)
