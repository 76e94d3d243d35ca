"""ops.moe_mlp (router GEMM, gating, routing and experts as one op) on every backend that runs here, against the
ops one by one on the reference; the Triton backend under TRITON_INTERPRET=1, where its fused inference path
(route_one_block_kernel for decode and small batches) is checked against the reference's plan as well."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import ops, reference
from moe_kernels.reference import GluSpec
from moe_kernels.routing import apply_capacity, build_routing_plan
from tests.helpers import RTOL, assert_lowp_close, cpu_backends, rel_err

# (T, D, H, O, E, K) and the edge each covers.
SHAPES = [
    ((0, 16, 8, 16, 4, 2), "no tokens"),
    ((1, 40, 16, 24, 16, 8), "decode: one token, 8 of 16 experts"),
    ((3, 33, 8, 20, 6, 3), "K not a power of two, D crosses tiles"),
    ((16, 32, 8, 32, 64, 8), "16 x 8 slots over 64 experts: the largest one-block routing"),
    ((5, 16, 8, 16, 4, 4), "top_k == num_experts"),
    ((7, 16, 8, 16, 1, 1), "one expert"),
    ((130, 24, 8, 16, 6, 3), "too many slots for one block: the router's GEMM, gating and plan apart"),
]
IDS = [why for _, why in SHAPES]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the Triton backend take CPU tensors


def problem(shape, dtype=torch.float32, glu=False, bias=True, seed=0):
    """(x, router_weight, w1, b1, w2, b2): well separated router logits, so that no top-k is a near tie."""
    tokens, d_in, hidden, d_out, experts, _ = shape
    gen = torch.Generator().manual_seed(seed)
    h1 = 2 * hidden if glu else hidden

    def rand(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=gen)).to(dtype)

    return (rand(tokens, d_in), rand(experts, d_in, scale=2 / d_in**0.5), rand(experts, h1, d_in, scale=d_in**-0.5),
            rand(experts, h1, scale=0.1) if bias else None, rand(experts, d_out, hidden, scale=hidden**-0.5),
            rand(experts, d_out, scale=0.1) if bias else None)


def one_by_one(x, router_weight, w1, b1, w2, b2, top_k, normalize, activation, glu, router_input=None, capacity=None):
    """The reference: F.linear, then the reference's gating, load, capacity drops and expert MLP."""
    logits = F.linear(x if router_input is None else router_input, router_weight)
    weights, idx = reference.topk_gating(logits, top_k, normalize)
    kept = idx if capacity is None else apply_capacity(idx, w1.shape[0], capacity)
    out = reference.expert_mlp(x, weights, kept, w1, b1, w2, b2, activation, glu)
    return out, weights, idx, reference.expert_load(idx, w1.shape[0]), logits


def dtypes(backend: str) -> list[torch.dtype]:
    # The interpreter's bf16 tl.dot is wrong (runtime.dot_options works around it; fp16 covers low precision).
    return [torch.float32, torch.float16] if backend == "triton" else [torch.float32, torch.bfloat16]


def cases() -> list:
    return [pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
            for backend in cpu_backends() for dtype in dtypes(backend)]


@pytest.mark.parametrize("backend, dtype", cases())
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=IDS)
@pytest.mark.parametrize("glu, activation", [(False, "gelu"), (True, "silu"),
                                             (GluSpec("clamped", interleaved=True, limit=7.0, up_offset=1.0), "silu")],
                         ids=["plain", "glu", "clamped-interleaved-glu"])
def test_matches_the_ops_one_by_one(backend, dtype, shape, glu, activation):
    top_k = shape[-1]
    args = problem(shape, dtype, glu=bool(glu))
    got = ops.moe_mlp(*args, top_k, True, activation, glu, backend=backend)
    out, weights, idx, load, _ = one_by_one(*args, top_k, True, activation, glu)
    assert got.logits is None
    assert got.top_k_idx.dtype == torch.int64 and torch.equal(got.top_k_idx, idx)
    assert got.expert_load.dtype == torch.int64 and torch.equal(got.expert_load, load)
    assert got.expert_load.tolist() == torch.bincount(idx.reshape(-1), minlength=shape[4]).tolist()
    assert got.top_k_weights.dtype == torch.float32
    torch.testing.assert_close(got.top_k_weights, weights, rtol=1e-5, atol=1e-6)
    assert got.out.dtype == dtype and got.out.shape == (shape[0], shape[3])
    if dtype == torch.float32:
        torch.testing.assert_close(got.out, out, rtol=RTOL[dtype], atol=1e-6)
    else:
        x, _, w1, b1, w2, b2 = (None if t is None else t.double() for t in args)
        exact = reference.expert_mlp(x, weights.double(), idx, w1, b1, w2, b2, activation, glu)
        assert_lowp_close(got.out, out, exact, "moe_mlp out")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_off(backend, normalize):
    shape = (5, 16, 8, 16, 8, 3)
    args = problem(shape)
    got = ops.moe_mlp(*args, 3, normalize, "gelu", False, backend=backend)
    out, weights, idx, _, _ = one_by_one(*args, 3, normalize, "gelu", False)
    assert torch.equal(got.top_k_idx, idx)
    torch.testing.assert_close(got.top_k_weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.out, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("d_in, hidden", [(0, 4), (8, 0)], ids=["no input features", "no hidden units"])
@pytest.mark.parametrize("glu", [False, True])
def test_zero_features_or_hidden_units(backend, d_in, hidden, glu):
    """D = 0 or H = 0 are degenerate but valid: the experts reduce to their biases. The output and every gradient
    (the bias gradients are sums over rows whose other operand is empty) against the reference's."""
    check_zero_features_or_hidden_units(backend, d_in, hidden, glu, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("d_in, hidden", [(0, 4), (8, 0)], ids=["no input features", "no hidden units"])
def test_zero_features_or_hidden_units_on_gpu(monkeypatch, backend, d_in, hidden):
    from tests.helpers import require_compiled_kernels

    if backend == "triton":
        require_compiled_kernels(monkeypatch)
    elif ops.unavailable_reason("cuda", "cuda") is not None:
        pytest.skip(ops.unavailable_reason("cuda", "cuda"))
    check_zero_features_or_hidden_units(backend, d_in, hidden, True, "cuda")


def check_zero_features_or_hidden_units(backend, d_in, hidden, glu, device):
    gen = torch.Generator().manual_seed(0)
    experts, h1 = 3, 2 * hidden if glu else hidden
    leaves = [torch.randn(*size, generator=gen).to(device)
              for size in ((5, d_in), (experts, d_in), (experts, h1, d_in), (experts, h1), (experts, 6, hidden),
                           (experts, 6))]
    results = []
    for name in (backend, "torch"):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = ops.moe_mlp(*inputs, 2, True, "gelu", glu, backend=name).out
        results.append((out, *torch.autograd.grad(out, inputs, torch.ones_like(out))))
    for what, got, want in zip(("out", "d x", "d router", "d w1", "d b1", "d w2", "d b2"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_inputs(backend):
    """x and the router weight as transposed views (strides other than a row-major tensor's)."""
    shape = (6, 24, 8, 16, 8, 2)
    x, router_weight, w1, b1, w2, b2 = problem(shape)
    x_t, router_t = x.t().contiguous().t(), router_weight.t().contiguous().t()
    assert not x_t.is_contiguous() and not router_t.is_contiguous()
    got = ops.moe_mlp(x_t, router_t, w1, b1, w2, b2, 2, True, "gelu", False, backend=backend)
    out, _, idx, _, _ = one_by_one(x, router_weight, w1, b1, w2, b2, 2, True, "gelu", False)
    assert torch.equal(got.top_k_idx, idx)
    torch.testing.assert_close(got.out, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("tokens", [9, 300])
def test_gradients_match_the_reference(backend, tokens):
    """Differentiable in every input; on triton through its eager Functions, routed once (300 tokens x 2 slots:
    several routing blocks, counted by the gating kernel)."""
    shape = (tokens, 16, 8, 12, 4, 2)
    args = [t.requires_grad_() for t in problem(shape)]
    got = ops.moe_mlp(*args, 2, True, "gelu", False, backend=backend)
    grads = torch.autograd.grad(got.out.square().sum(), args)
    expected = torch.autograd.grad(one_by_one(*args, 2, True, "gelu", False)[0].square().sum(), args)
    for name, g, e in zip(("x", "router_weight", "w1", "b1", "w2", "b2"), grads, expected):
        assert rel_err(g, e) < 1e-5, name


NAMES = ("x", "router_weight", "w1", "b1", "w2", "b2")
TRAINED = {"everything": NAMES, "x alone": ("x",), "router alone": ("router_weight",),
           "experts alone": ("w1", "b1", "w2", "b2")}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("outputs", [("out",), ("top_k_weights",), ("logits",), ("out", "top_k_weights", "logits")],
                         ids=["out", "weights", "logits", "all outputs"])
@pytest.mark.parametrize("trained", list(TRAINED))
def test_gradients_through_each_output(backend, outputs, trained):
    """The top-k weights and the logits are differentiable outputs (the layer's losses read the logits), alone or
    with the output; any subset of the inputs may be trained. A random probe per output weighs the loss."""
    shape = (9, 16, 8, 12, 4, 2)
    args = [t.requires_grad_(name in TRAINED[trained]) for name, t in zip(NAMES, problem(shape))]
    got = ops.moe_mlp(*args, 2, True, "gelu", False, backend=backend, return_logits=True)._asdict()
    out, weights, _, _, logits = one_by_one(*args, 2, True, "gelu", False)
    expected = dict(out=out, top_k_weights=weights, logits=logits)
    probes = {name: torch.randn(expected[name].shape) for name in outputs}
    leaves = [t for t in args if t.requires_grad]

    def loss(values):
        return sum((values[name] * probes[name]).sum() for name in outputs)

    loss_ref = loss(expected)
    if not loss_ref.requires_grad:  # e.g. the logits do not depend on the experts: nothing flows back
        loss_got = loss(got)
        grads = torch.autograd.grad(loss_got, leaves, allow_unused=True) if loss_got.requires_grad else ()
        assert all(g is None or not g.any() for g in grads)
        return
    got_grads = torch.autograd.grad(loss(got), leaves, allow_unused=True)
    for name, g, e in zip([n for n, t in zip(NAMES, args) if t.requires_grad], got_grads,
                          torch.autograd.grad(loss_ref, leaves, allow_unused=True)):
        if e is None:
            assert g is None or not g.any(), name
        else:
            assert rel_err(g, e) < 1e-5, name


@pytest.mark.parametrize("backend", cpu_backends())
def test_low_precision_gradients(backend):
    """The training path in fp16 (bf16 on the compiled CPU backend; the interpreter's bf16 tl.dot is wrong), the
    logits' gradient from a loss on them included, against fp64: at most 2x the error of the reference run in the
    same precision (flash-attention's rule)."""
    dtype = dtypes(backend)[1]
    shape = (40, 32, 16, 24, 8, 2)
    args = problem(shape, dtype)
    probe = torch.randn(shape[0], shape[3], dtype=torch.float64)

    def grads(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out, _, _, _, logits = fn(leaves)
        loss = (out.double() * probe).sum() + logits.double().square().sum()
        return torch.autograd.grad(loss, leaves)

    got = grads(lambda a: ops.moe_mlp(*a, 2, True, "gelu", False, backend=backend, return_logits=True), args)
    lowp = grads(lambda a: one_by_one(*a, 2, True, "gelu", False), args)
    exact = grads(lambda a: one_by_one(*a, 2, True, "gelu", False), [t.double() for t in args])
    for name, g, r, e in zip(NAMES, got, lowp, exact):
        assert g.dtype == dtype, name
        assert_lowp_close(g, r, e, name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_nan_token_poisons_only_itself(backend):
    shape = (4, 16, 8, 16, 8, 2)
    x, *rest = problem(shape)
    x[2, 5] = float("nan")
    got = ops.moe_mlp(x, *rest, 2, True, "gelu", False, backend=backend)
    assert ((got.top_k_idx >= 0) & (got.top_k_idx < 8)).all()
    assert got.top_k_weights[2].isnan().all() and got.out[2].isnan().all()
    keep = [0, 1, 3]
    out, weights, idx, _, _ = one_by_one(x[keep], *rest, 2, True, "gelu", False)
    assert torch.equal(got.top_k_idx[keep], idx)
    torch.testing.assert_close(got.out[keep], out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("capacity", [None, 0, 3])
def test_router_input_capacity_and_logits(backend, grad, capacity):
    """A jittered router input, capacity drops (the ids and the load returned are the router's, before the drops)
    and the logits, with and without gradients (into router_input as well)."""
    shape = (11, 16, 8, 12, 4, 2)
    args = [t.requires_grad_(grad) for t in problem(shape)]
    router_input = (args[0].detach() * (1 + 0.1 * torch.rand(args[0].shape))).requires_grad_(grad)
    got = ops.moe_mlp(*args, 2, True, "gelu", False, backend=backend, router_input=router_input, capacity=capacity,
                      return_logits=True)
    out, weights, idx, load, logits = one_by_one(*args, 2, True, "gelu", False, router_input, capacity)
    assert torch.equal(got.top_k_idx, idx) and torch.equal(got.expert_load, load)
    torch.testing.assert_close(got.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.top_k_weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.out, out, rtol=1e-5, atol=1e-6)
    if grad:
        leaves = [*args, router_input]
        loss_got = got.out.square().sum() + got.logits.square().sum()
        loss_ref = out.square().sum() + logits.square().sum()
        for g, e in zip(torch.autograd.grad(loss_got, leaves), torch.autograd.grad(loss_ref, leaves)):
            assert rel_err(g, e) < 1e-5


def test_triton_fused_path_launches_and_plan(monkeypatch, request):
    """Decode and small batches: one route_one_block_kernel whose plan is build_routing_plan's; larger batches:
    route_blocks_kernel (the router's GEMM and the gating, counting the routing blocks' ids), then the plan's
    scatter, which scans those counts (no histogram kernel, no scan kernel); past ROUTER_REREAD_BYTES the logits
    come from F.linear and topk_gating_kernel counts. At most a row per expert (T*K <= E): fc2 and the combine as
    one fc2_combine_kernel. Gradients wanted: no plan in the router's kernel (it keeps the logits)."""
    pytest.importorskip("triton")
    from moe_kernels.triton import LAUNCHES, reset_launch_counts, runtime
    from moe_kernels.triton.routing import route_one_block

    request.addfinalizer(runtime.clear_shape_caches)
    # With gradients: the router's kernel keeps the logits, then one plan whose counts are the load (no histogram
    # of its own).
    reset_launch_counts()
    args = [t.requires_grad_() for t in problem((2, 16, 8, 16, 4, 2))]
    got = ops.moe_mlp(*args, 2, True, "gelu", False, backend="triton")
    assert dict(LAUNCHES) == {"route_blocks_kernel": 1, "routing_one_block_kernel": 1, "grouped_gemm_kernel": 2,
                              "combine_kernel": 1}, dict(LAUNCHES)
    assert torch.equal(got.expert_load, reference.expert_load(got.top_k_idx, 4))
    for shape, router, cublas in (((1, 40, 16, 24, 16, 8), "route_one_block_kernel", False),
                                  ((16, 32, 8, 32, 64, 8), "route_one_block_kernel", False),
                                  ((130, 24, 8, 16, 6, 3), "route_blocks_kernel", False),
                                  ((130, 24, 8, 16, 6, 3), "topk_gating_kernel", True)):  # cuBLAS last
        if cublas:
            monkeypatch.setattr("moe_kernels.triton.routing.ROUTER_REREAD_BYTES", 0)
            runtime.clear_shape_caches()
        x, router_weight, *experts = problem(shape)
        top_k = shape[-1]
        reset_launch_counts()
        ops.moe_mlp(x, router_weight, *experts, top_k, True, "gelu", False, backend="triton")
        routing = {router: 1} if router == "route_one_block_kernel" else {router: 1, "routing_scatter_kernel": 1}
        few_rows = shape[0] * top_k <= shape[4]
        experts_launches = ({"grouped_gemm_kernel": 1, "fc2_combine_kernel": 1} if few_rows
                            else {"grouped_gemm_kernel": 2, "combine_kernel": 1})
        assert dict(LAUNCHES) == {**routing, **experts_launches}, dict(LAUNCHES)
        routed = route_one_block(x, router_weight, top_k, True, interpret=True)
        assert (routed is not None) == (router == "route_one_block_kernel")
        if routed is not None:
            _, ids, plan = routed
            for got, want in zip(plan, build_routing_plan(ids, shape[4])):
                assert got == want if isinstance(want, int) else torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, d_in, experts, top_k", [
    (130, 24, 6, 3),  # routing blocks of 32 tokens: tl.dot; K not a power of two
    (100, 40, 64, 8),  # routing blocks of 8 tokens, two a program (tl.dot's 16 rows)
    (7, 16, 4, 2),  # one routing block: no histogram
    (200, 16, 100, 1),  # E = 100, top-1: blocks of 64 tokens, tl.dot over 128 expert columns
    (300, 8, 300, 2),  # E = 300: two blocks of 8 tokens a program over 512 buckets, the largest histogram
])
def test_triton_route_blocks_is_the_router_gemm_and_gate_and_plan(tokens, d_in, experts, top_k, dtype):
    """route_blocks (the router's GEMM in the gating kernel) against F.linear then gate_and_plan: the logits to the
    GEMM's rounding, the same ids and plan, the weights to fp32 rounding; strided x and router weight."""
    pytest.importorskip("triton")
    from moe_kernels.triton.routing import gate_and_plan, route_blocks

    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(d_in, tokens, generator=gen).to(dtype).t()  # column-major
    router_weight = (2 * d_in**-0.5 * torch.randn(experts, 2 * d_in, generator=gen)).to(dtype)[:, ::2]
    logits, weights, ids, plan = route_blocks(x, router_weight, top_k, True, True, interpret=True)
    expected_logits = F.linear(x, router_weight)
    one_ulp = {} if dtype == torch.float32 else dict(rtol=2**-10, atol=2**-10)  # fp16: rounded once, either way
    torch.testing.assert_close(logits, expected_logits, **one_ulp)
    expected_weights, expected_ids, expected_plan = gate_and_plan(logits, top_k, True, interpret=True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
    for got, want in zip(plan, expected_plan):
        assert got == want if isinstance(want, int) else torch.equal(got, want)
    assert route_blocks(x, router_weight, top_k, True, False, interpret=True)[0] is None  # logits not kept
    assert route_blocks(x[:0], router_weight, top_k, True, True, interpret=True) is None


def test_triton_router_gemm_in_a_kernel_where_its_tiles_fit():
    """route_blocks is None (F.linear and gate_and_plan run instead) where the programs' re-reads of the router
    weight pass ROUTER_REREAD_BYTES (T = 16384 at D = 2048 over 128 experts: 1024 programs re-reading 512 KB) or
    its histogram would (1000 experts at top-2: two blocks of 16 lanes over 1024 buckets a program);
    route_one_block is None where its broadcast product (under 16 tokens) would hold more than ROUTE_TILE values
    (8 tokens over 256 experts; the layer then routes with route_blocks, whose programs hold 16 tokens)."""
    pytest.importorskip("triton")
    from moe_kernels.triton.routing import ROUTER_REREAD_BYTES, route_blocks, route_one_block

    assert 1024 * 128 * 2048 * 2 > ROUTER_REREAD_BYTES
    x, router_weight = torch.empty(16384, 2048, dtype=torch.bfloat16), torch.empty(128, 2048, dtype=torch.bfloat16)
    assert route_blocks(x, router_weight, 8, True, True, interpret=True) is None
    assert route_blocks(torch.randn(300, 8), torch.randn(1000, 8), 2, True, True, interpret=True) is None
    x, router_weight = torch.randn(8, 16), torch.randn(256, 16)
    assert route_one_block(x, router_weight, 2, True, interpret=True) is None
    assert route_blocks(x, router_weight, 2, True, True, interpret=True) is not None


@pytest.mark.parametrize("scan_kernel", [False, True], ids=["scan in the scatter", "scan kernel"])
@pytest.mark.parametrize("tokens, experts, top_k", [(130, 6, 3), (300, 64, 8), (100, 1000, 2), (33, 7, 7), (5, 4, 1)])
def test_triton_gating_counts_the_routing_blocks(tokens, experts, top_k, scan_kernel):
    """gate_and_plan: the gating kernel's per-block counts feed the plan's scatter (and scan kernel); the weights
    and ids are topk_gating's and the plan is build_routing_plan's (blocks of whole tokens: K not a power of two, E
    up to 1000, one block and several)."""
    pytest.importorskip("triton")
    from moe_kernels.triton.routing import gate_and_plan, scan_in_scatter_tile

    logits = torch.randn(tokens, experts)
    with scan_in_scatter_tile(0) if scan_kernel else contextlib.nullcontext():
        weights, ids, plan = gate_and_plan(logits, top_k, True, interpret=True)
    expected_weights, expected_ids = reference.topk_gating(logits, top_k, True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
    for got, want in zip(plan, build_routing_plan(ids, experts)):
        assert got == want if isinstance(want, int) else torch.equal(got, want)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(router_weight=a["router_weight"][:, :-1]), ValueError, r"router_weight must be \[4, 16\]"),
    (lambda a: a.update(router_weight=a["router_weight"][:3]), ValueError, r"router_weight must be \[4, 16\]"),
    (lambda a: a.update(router_weight=a["router_weight"].double()), TypeError, "router_weight must have x's dtype"),
    (lambda a: a.update(top_k=0), ValueError, r"top_k must be in \[1, 4\]"),
    (lambda a: a.update(top_k=5), ValueError, r"top_k must be in \[1, 4\]"),
    (lambda a: a.update(top_k=2.0), TypeError, "top_k must be an int"),
    (lambda a: a.update(normalize=1), TypeError, "normalize must be a bool"),
    (lambda a: a.update(x=a["x"][:, :-1]), ValueError, r"w1 must be \[E, H1, 15\]"),
    (lambda a: a.update(w2=a["w2"][:, :, :-1]), ValueError, "w2 must be"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "x must be one of"),
    (lambda a: a.update(router_weight=a["router_weight"].to("meta")), ValueError, "one device"),
    (lambda a: a.update(activation="swish"), ValueError, "activation"),
    (lambda a: a.update(router_input=a["x"][:2]), ValueError, r"router_input must be \[3, 16\] like x"),
    (lambda a: a.update(router_input=a["x"].double()), TypeError, "router_input must have x's dtype"),
    (lambda a: a.update(capacity=-1), ValueError, "capacity must be None"),
    (lambda a: a.update(capacity=True), ValueError, "capacity must be None"),
    (lambda a: a.update(return_logits=None), TypeError, "return_logits must be a bool"),
])
@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_arguments_raise_before_any_backend_runs(backend, mutate, error, match):
    x, router_weight, w1, b1, w2, b2 = problem((3, 16, 8, 16, 4, 2))
    kwargs = dict(x=x, router_weight=router_weight, w1=w1, b1=b1, w2=w2, b2=b2, top_k=2, normalize=True,
                  activation="gelu", glu=False, backend=backend)
    mutate(kwargs)
    with pytest.raises(error, match=match):
        ops.moe_mlp(**kwargs)


GPU_SHAPES = [((1, 2048, 64, 2048, 64, 8), "decode: the one-block router kernel, broadcast product, fc2_combine"),
              ((16, 1024, 32, 1024, 64, 8), "16 x 8 slots: the one-block router kernel, tl.dot"),
              ((4, 1024, 128, 1024, 4, 2), "CuMo's 4 experts, top-2"),
              ((300, 256, 64, 256, 16, 4), "past one routing block: route_blocks, the scatter scans"),
              ((2304, 128, 32, 128, 64, 8), "288 routing blocks: route_blocks, a scan kernel, the scatter"),
              ((16384, 2048, 16, 64, 128, 8), "the router's GEMM by cuBLAS (re-reads past 32 MB), then gating")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [s for s, _ in GPU_SHAPES], ids=[why for _, why in GPU_SHAPES])
def test_on_gpu(monkeypatch, backend, dtype, shape):
    """Compiled kernels: the routing equals the reference's (fp32: every token; bf16, whose logits are rounded, at
    least 99% of tokens: a near tie may round either way), and the output equals the reference's over the
    backend's own routing, within the low-precision rule."""
    from tests.helpers import require_compiled_kernels

    if backend == "triton":
        require_compiled_kernels(monkeypatch)
    elif ops.unavailable_reason("cuda", "cuda") is not None:
        pytest.skip(ops.unavailable_reason("cuda", "cuda"))
    top_k = shape[-1]
    args = [None if t is None else t.cuda() for t in problem(shape, dtype, glu=True, bias=backend == "triton")]
    got = ops.moe_mlp(*args, top_k, True, "silu", True, backend=backend)
    out, weights, idx, load, _ = one_by_one(*args, top_k, True, "silu", True)
    same = (got.top_k_idx == idx).all(dim=1)
    assert same.all() if dtype == torch.float32 else same.float().mean() >= 0.99, f"{int((~same).sum())} tokens differ"
    assert torch.equal(got.expert_load, torch.bincount(got.top_k_idx.reshape(-1), minlength=shape[4]))
    # fp32 softmax of logits rounded to x's dtype: a logit may round the other way (summation order).
    tolerance = 1e-5 if dtype == torch.float32 else RTOL[dtype]
    torch.testing.assert_close(got.top_k_weights[same], weights[same], rtol=tolerance, atol=tolerance)
    x, _, w1, b1, w2, b2 = (None if t is None else t.double() for t in args)
    exact = reference.expert_mlp(x, got.top_k_weights.double(), got.top_k_idx, w1, b1, w2, b2, "silu", True)
    lowp = reference.expert_mlp(args[0], got.top_k_weights, got.top_k_idx, *args[2:], "silu", True)
    assert_lowp_close(got.out, lowp, exact, f"{backend} moe_mlp", floor=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [s for s, _ in GPU_SHAPES[3:]], ids=[why for _, why in GPU_SHAPES[3:]])
def test_training_on_gpu(monkeypatch, shape):
    """Compiled kernels, fp32, a training step past one routing block (the router's GEMM in the gating kernel, which
    keeps the logits; a scan kernel or not; cuBLAS's logits): the output, the logits and every gradient against the
    torch backend's."""
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels(monkeypatch)
    top_k = shape[-1]
    leaves = [t.cuda() for t in problem(shape, glu=True)]
    results = []
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in leaves]
        got = ops.moe_mlp(*inputs, top_k, True, "silu", True, backend=backend, return_logits=True)
        loss = got.out.square().sum() + got.logits.square().sum() + got.top_k_weights.square().sum()
        results.append((got.out, got.logits, *torch.autograd.grad(loss, inputs)))
    for what, got, want in zip(("out", "logits", "d x", "d router", "d w1", "d b1", "d w2", "d b2"), *results):
        assert rel_err(got, want) < 1e-5, what
