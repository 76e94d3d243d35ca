"""The compiled CPU backend (moe_kernels/cpu.py, csrc/cpu) against moe_kernels/reference.py."""

import pytest
import torch

from moe_kernels import cpu, ops, reference
from moe_kernels.reference import glu_code
from moe_kernels.routing import build_routing_plan
from tests.helpers import (
    LOW_PRECISION,
    ODD_SHAPES,
    ROUTINGS,
    Shape,
    assert_close,
    assert_lowp_close,
    assert_matches_reference,
    output_and_grads,
    random_problem,
    routing_indices,
)

_REASON = cpu.unavailable_reason(torch.device("cpu"))
if _REASON is not None:
    pytest.skip(f"CPU backend unavailable: {_REASON}", allow_module_level=True)

ACTIVATIONS = list(reference.ACTIVATIONS)
NAMES = ["x", "top_k_weights", "w1", "b1", "w2", "b2"]  # differentiable inputs, in argument order
# Extra shapes for the C++ scheduling; the ODD_SHAPES of tests/helpers.py cover the rest.
SCHEDULE_SHAPES = [
    (Shape(600, 16, 8, 12, 3, 2), "3 experts of ~400 rows over the threads' bins (GEMMs through at::mm)"),
    (Shape(40, 8, 4, 8, 64, 8), "many small experts packed into per-thread bins, most with 0-8 rows"),
]


def run(fn, problem, activation, glu, grad_out=None):
    """Output of fn and the gradients of every differentiable input (None where absent)."""
    return output_and_grads(fn, problem, activation, glu, grad_out)


def compare(problem, activation, glu, dtype=torch.float32):
    """Forward and every gradient of the CPU backend against the reference (the shared harness)."""
    assert problem[0].dtype == dtype
    assert_matches_reference(cpu.expert_mlp, problem, activation, glu)


@pytest.mark.parametrize("shape", [s for s, _ in ODD_SHAPES], ids=[why for _, why in ODD_SHAPES])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(shape, routing, glu, bias):
    problem = random_problem(shape, glu=glu, bias=bias, routing=routing)
    compare(problem, "silu" if glu else "gelu", glu)


@pytest.mark.parametrize("shape", [s for s, _ in SCHEDULE_SHAPES], ids=[why for _, why in SCHEDULE_SHAPES])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_scheduling_paths(shape, routing):
    compare(random_problem(shape, glu=True, routing=routing), "silu", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
@pytest.mark.parametrize("glu", [False, True])
def test_activation_backward_row_tiles(dtype, routing, glu):
    """A wide hidden layer (H1 = 2048 or 4096): the activation backward runs in several row tiles of
    ~32K elements (8 or 16 rows), in parallel over tiles for the expert that runs alone, with the b1
    gradient summed per tile; a partial last tile (60 rows per expert on average, 120 on one)."""
    problem = random_problem(Shape(60, 8, 2048, 8, 3, 2), dtype=dtype, glu=glu, bias=True, routing=routing)
    compare(problem, "silu" if glu else "quick_gelu", glu, dtype)


@pytest.mark.parametrize("glu,activation", [(False, "quick_gelu"), (True, "silu"), (True, "gelu"), (False, "gelu")])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_forward_activation_rounds_once_bf16(glu, activation, routing):
    """bf16 forward: the activation (and GLU's act(gate) * up) is computed in fp32 from the fc1 output
    and rounded to bf16 once, in row tiles (H1 = 2048 or 4096: tiles of 64 or 32 rows, several per
    expert, in parallel for the expert that runs alone), whatever the thread count. Identity weights,
    no biases and weight 1 make every GEMM and the combine exact, so y is exactly the rounded
    activation of x."""
    h = 2048
    h1 = 2 * h if glu else h
    x = torch.randn(200, h1).bfloat16()
    idx = routing_indices(200, 3, 1, routing, "cpu")
    w = torch.ones(200, 1)
    w1 = torch.eye(h1).expand(3, h1, h1).bfloat16()
    w2 = torch.eye(h).expand(3, h, h).bfloat16()
    hf = x.float()
    act = reference.ACTIVATIONS[activation]
    # contiguous gate: ATen's strided gelu path differs from its vectorised one in the last fp32 bit
    expected = (act(hf[:, :h].contiguous()) * hf[:, h:] if glu else act(hf)).bfloat16()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                y = cpu.expert_mlp(x, w, idx, w1, None, w2, None, activation, glu)
            assert torch.equal(y, expected), f"{n} threads: {(y.float() - expected.float()).abs().max()}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unbalanced_expert_runs_alone(dtype):
    """An expert with more than a thread's share of the rows runs alone (threaded GEMMs), the rest in bins."""
    shape = Shape(300, 24, 12, 20, 5, 2)
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, dtype=torch.float64, glu=True, routing="one_expert")
    idx[:, 1] = torch.where(torch.rand(300) < 0.5, 5, idx[:, 1])  # drop half the second choices
    problem64 = (x, w, idx, w1, b1, w2, b2)
    problem = [t.to(dtype) if t is not None and t.is_floating_point() and i != 1 else t for i, t in enumerate(problem64)]
    if dtype == torch.float32:
        compare(problem, "silu", True)
        return
    problem64 = [t.to(torch.float64) if t is not None and t.is_floating_point() else t for t in problem]
    y = cpu.expert_mlp(*problem, "silu", True)
    assert_lowp_close(y, reference.expert_mlp(*problem, "silu", True), reference.expert_mlp(*problem64, "silu", True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("glu,activation,bias", [(True, "silu", True), (False, "gelu", False),
                                                 (False, "quick_gelu", True), (True, "gelu_tanh", False),
                                                 (False, "relu", True)])
def test_small_row_kernel(dtype, glu, activation, bias):
    """Experts with 1..8 rows take the weight-streaming AVX-512 path (token rows read in place, bf16
    through VDPBF16PS where the CPU has it): every row count, unrolled main loop and masked tail
    (D=300, H=136 are not multiples of the 16- or 32-wide vectors), every activation, with and
    without biases, forward and (fp32) every gradient."""
    shape = Shape(36, 300, 136, 200, 8, 1)
    problem64 = list(random_problem(shape, dtype=torch.float64, glu=glu, bias=bias))
    problem64[2] = torch.arange(8).repeat_interleave(torch.arange(1, 9))[torch.randperm(36)].unsqueeze(1)
    problem = [t.to(dtype) if t is not None and t.is_floating_point() and i != 1 else t for i, t in enumerate(problem64)]
    if dtype == torch.float32:
        compare(problem, activation, glu)
        return
    problem64 = [t.to(torch.float64) if t is not None and t.is_floating_point() else t for t in problem]
    with torch.inference_mode():
        y = cpu.expert_mlp(*problem, activation, glu)
    assert_lowp_close(y, reference.expert_mlp(*problem, activation, glu),
                      reference.expert_mlp(*problem64, activation, glu))


@pytest.mark.parametrize("glu,activation", [(False, "quick_gelu"), (True, "silu"), (True, "gelu"), (False, "gelu_tanh")])
def test_small_rows_round_once_bf16(glu, activation):
    """The small-row path rounds like the ATen path: fc1's output to bf16, then act (and GLU's product)
    in fp32 rounded once. Identity weights, no biases and weight 1 make the GEMMs and the combine exact
    (VDPBF16PS products of bf16 values are exact), so y is exactly the rounded activation of x."""
    h = 96
    h1 = 2 * h if glu else h
    x = torch.randn(12, h1).bfloat16()
    idx = torch.arange(12).remainder(4).unsqueeze(1)  # 3 rows on each of 4 experts
    w1 = torch.eye(h1).expand(4, h1, h1).bfloat16()
    w2 = torch.eye(h).expand(4, h, h).bfloat16()
    hf = x.float()
    act = reference.ACTIVATIONS[activation]
    expected = (act(hf[:, :h].contiguous()) * hf[:, h:] if glu else act(hf)).bfloat16()
    with torch.inference_mode():
        y = cpu.expert_mlp(x, torch.ones(12, 1), idx, w1, None, w2, None, activation, glu)
    # scalar erf/tanh/exp may differ from ATen's vectorised ones in the last fp32 bit: one bf16 ulp at most
    ulp = expected.float().abs().clamp_min(2.0**-126) * 2.0**-7
    assert ((y.float() - expected.float()).abs() <= ulp).all()


@pytest.mark.parametrize("tokens", [6, 300])
def test_strided_weights(tokens):
    """Expert weights that are transposed views (no unit stride along the reduction) take the ATen
    GEMMs on every path, small and large; biases that are views too."""
    shape = Shape(tokens, 40, 24, 32, 4, 2)
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, glu=True)
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    b1 = b1.t().contiguous().t()
    assert w1.stride(-1) != 1 and b1.stride(-1) != 1
    compare((x, w, idx, w1, b1, w2, b2), "silu", True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("glu", [False, True])
def test_activations(activation, glu):
    compare(random_problem(Shape(29, 24, 12, 20, 5, 2), glu=glu), activation, glu)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [Shape(7, 24, 12, 20, 4, 2), Shape(130, 40, 24, 56, 6, 3), Shape(600, 16, 8, 12, 3, 2)])
@pytest.mark.parametrize("glu", [False, True])
def test_low_precision(dtype, shape, glu):
    """Error against an fp64 reference at most ~2x the reference's own error in the same dtype."""
    activation = "silu" if glu else "gelu"
    problem64 = random_problem(shape, dtype=torch.float64, glu=glu, routing="one_expert")
    problem = [t.to(dtype) if t is not None and t.is_floating_point() and i != 1 else t
               for i, t in enumerate(problem64)]
    # the fp64 reference sees the same rounded inputs
    problem64 = [t.to(torch.float64) if t is not None and t.is_floating_point() else t for t in problem]
    grad64 = torch.randn(shape.tokens, shape.d_out, dtype=torch.float64)
    y, grads = run(cpu.expert_mlp, problem, activation, glu, grad64.to(dtype))
    y_lp, grads_lp = run(reference.expert_mlp, problem, activation, glu, grad64.to(dtype))
    y_64, grads_64 = run(reference.expert_mlp, problem64, activation, glu, grad64)
    assert y.dtype == dtype
    assert_lowp_close(y, y_lp, y_64, "y")
    for name, g, g_lp, g_64 in zip(NAMES, grads, grads_lp, grads_64):
        if g_64 is not None:
            assert g.dtype == g_lp.dtype, name
            assert_lowp_close(g, g_lp, g_64, f"grad {name}")


@pytest.mark.parametrize("shape", [Shape(7, 24, 12, 20, 4, 2), Shape(130, 40, 24, 56, 6, 3)])
def test_matches_reference_fp64(shape):
    problem = list(random_problem(shape, dtype=torch.float64, glu=True, routing="one_expert"))
    problem[1] = problem[1].double()
    compare(problem, "gelu_tanh", True, dtype=torch.float64)


@pytest.mark.parametrize("glu,activation", [(False, "gelu"), (True, "silu"), (False, "quick_gelu"), (True, "gelu_tanh")])
def test_gradcheck_fp64(glu, activation):
    x, w, idx, w1, b1, w2, b2 = random_problem(Shape(5, 6, 4, 5, 3, 2), dtype=torch.float64, glu=glu)
    w = w.double()
    inputs = [t.requires_grad_() for t in (x, w, w1, b1, w2, b2)]

    def fn(x, w, w1, b1, w2, b2):
        return cpu.expert_mlp(x, w, idx, w1, b1, w2, b2, activation, glu)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_dropped_slots_and_nan_isolation():
    """Ids == E or < 0 are dropped: zero contribution, zero weight gradient, a NaN weight cannot leak."""
    shape = Shape(31, 16, 8, 12, 4, 3)
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, glu=True)
    drop = torch.rand(idx.shape) < 0.3
    drop[0] = True  # a token with every slot dropped
    idx = torch.where(drop, torch.where(torch.rand(idx.shape) < 0.5, shape.experts, -1), idx)
    w = torch.where(drop, float("nan"), w)
    problem = (x, w, idx, w1, b1, w2, b2)
    grad_out = torch.randn(shape.tokens, shape.d_out)
    y, grads = run(cpu.expert_mlp, problem, "silu", True, grad_out)
    y_ref, grads_ref = run(reference.expert_mlp, problem, "silu", True, grad_out)
    assert not y.isnan().any() and not any(g.isnan().any() for g in grads)
    assert not y[0].any() and not grads[0][0].any(), "a fully dropped token must be zero, with zero grad"
    assert not grads[1][drop].any(), "dropped slots get no weight gradient"
    assert_close(y, y_ref, torch.float32, "y")
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        if name == "top_k_weights":
            g_ref = torch.where(drop, 0.0, g_ref)  # reference's where() passes NaN*0 to dropped slots
        assert_close(g, g_ref, torch.float32, f"grad {name}")


def test_non_contiguous_inputs():
    shape = Shape(23, 16, 8, 12, 5, 2)
    x, w, idx, w1, b1, w2, b2 = random_problem(shape, glu=True)
    problem = (
        torch.cat([x, x], dim=1)[:, ::2].clone().t().contiguous().t(),  # column-major x
        w.t().contiguous().t(),
        idx.t().contiguous().t(),
        w1.transpose(1, 2).contiguous().transpose(1, 2),
        b1[:, None].expand(-1, 2, -1)[:, 0],
        w2.transpose(1, 2).contiguous().transpose(1, 2),
        b2,
    )
    assert not problem[0].is_contiguous() and not problem[3].is_contiguous()
    grad_out = torch.randn(shape.tokens, shape.d_out)
    y, grads = run(cpu.expert_mlp, problem, "silu", True, grad_out)
    y_ref, grads_ref = run(reference.expert_mlp, [t.contiguous() for t in problem], "silu", True, grad_out)
    assert_close(y, y_ref, torch.float32, "y")
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close(g, g_ref, torch.float32, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    """Bit-identical output and gradients on repeat, on a problem that uses every thread."""
    problem = random_problem(Shape(700, 32, 16, 24, 8, 4), dtype=dtype, glu=True, routing="one_expert")
    grad_out = torch.randn(700, 24, dtype=dtype)
    y1, g1 = run(cpu.expert_mlp, problem, "silu", True, grad_out)
    y2, g2 = run(cpu.expert_mlp, problem, "silu", True, grad_out)
    assert torch.equal(y1, y2)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_independent_of_thread_count(dtype):
    """Bit-identical output and gradients with 1 and 2 threads: the bins, the small-row path's feature
    split, the activation tiles and the combine must not change any sum's order. One expert runs alone
    (threaded GEMMs), the others share bins, several own at most 8 rows (small-row path)."""
    shape = Shape(300, 40, 24, 36, 16, 2)
    problem = list(random_problem(shape, dtype=dtype, glu=True, routing="one_expert"))
    idx = problem[2]
    idx[:40, 1] = torch.arange(1, 41) % 15 + 1  # experts 1..15 get a few rows each...
    idx[40:, 1] = 1 + (torch.arange(260) % 2)   # ...and experts 1, 2 over a hundred more
    grad_out = torch.randn(shape.tokens, shape.d_out, dtype=dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run(cpu.expert_mlp, problem, "silu", True, grad_out))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.equal(a, b), name


def test_inference_saves_nothing():
    """Without grad the forward skips the [T*K, H1] hidden buffer; with grad it keeps it."""
    x, w, idx, w1, b1, w2, b2 = random_problem(Shape(9, 8, 4, 8, 4, 2))
    args = (x, w, idx, w1, b1, w2, b2, "gelu")
    assert torch.ops.cumo.expert_mlp_forward(*args, *glu_code(False), False)[1].shape == (0, 4)
    assert torch.ops.cumo.expert_mlp_forward(*args, *glu_code(False), True)[1].shape == (18, 4)
    with torch.no_grad():
        w1.requires_grad_()
        y = cpu.expert_mlp(*args, False)
    assert not y.requires_grad


def test_inference_mode():
    """Under torch.inference_mode the worker threads' ATen calls must see inference mode too."""
    problem = random_problem(Shape(300, 16, 8, 12, 16, 4), glu=True)
    with torch.inference_mode():
        y = cpu.expert_mlp(*problem, "silu", True)
    assert_close(y, reference.expert_mlp(*problem, "silu", True), torch.float32, "y")


def test_backward_recomputes_unsaved_hidden():
    """save_hidden=False still differentiates: backward recomputes the hidden rows."""
    problem = random_problem(Shape(37, 16, 8, 12, 5, 3), glu=True)
    grad_out = torch.randn(37, 12)

    def unsaved(*args):
        return torch.ops.cumo.expert_mlp_forward(*args[:-1], *glu_code(args[-1]), False)[0]

    y, grads = run(unsaved, problem, "gelu_tanh", True, grad_out)
    y_ref, grads_ref = run(reference.expert_mlp, problem, "gelu_tanh", True, grad_out)
    assert_close(y, y_ref, torch.float32, "y")
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close(g, g_ref, torch.float32, f"grad {name}")


ROUTING_PLAN_CASES = [
    (0, 4, 2),  # empty
    (37, 8, 3),  # odd T, serial counting sort
    (50, 64, 1),  # many experts, most empty
    (5000, 16, 8),  # 40000 slots: chunked (parallel) histogram and scatter
]


@pytest.mark.parametrize("tokens,experts,top_k", ROUTING_PLAN_CASES)
@pytest.mark.parametrize("routing", ROUTINGS + ["dropped"])
def test_routing_plan_equals_reference(tokens, experts, top_k, routing):
    idx = routing_indices(tokens, experts, top_k, "random" if routing == "dropped" else routing)
    if routing == "dropped":
        idx = torch.where(torch.rand(idx.shape) < 0.2, torch.where(torch.rand(idx.shape) < 0.5, experts, -3), idx)
    plan = cpu.routing_plan(idx, experts)
    expected = build_routing_plan(idx, experts)
    assert plan.top_k == expected.top_k
    for name, a, b in zip(plan._fields[:4], plan[:4], expected[:4]):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_opcheck():
    x, w, idx, w1, b1, w2, b2 = random_problem(Shape(11, 8, 4, 6, 4, 2), glu=True)
    for t in (x, w, w1, b1, w2, b2):
        t.requires_grad_()
    glu = glu_code(True)
    torch.library.opcheck(torch.ops.cumo.expert_mlp_forward, (x, w, idx, w1, b1, w2, b2, "silu", *glu, True))
    torch.library.opcheck(torch.ops.cumo.expert_mlp_forward, (x, w, idx, w1, None, w2, None, "relu", *glu, False))
    torch.library.opcheck(torch.ops.cumo.routing_plan, (idx, 4))
    _, hidden = torch.ops.cumo.expert_mlp_forward(x, w, idx, w1, b1, w2, b2, "silu", *glu, True)
    grad_y = torch.randn(11, 6)
    backward_args = (grad_y, x.detach(), w.detach(), idx, w1.detach(), b1.detach(), w2.detach(), b2.detach(),
                     hidden, "silu", *glu)
    for flags in [(True, True), (False, True), (True, False)]:
        torch.library.opcheck(torch.ops.cumo.expert_mlp_backward, (*backward_args, *flags))


@pytest.mark.parametrize("trainable", ["x", "experts", "router"])
def test_partial_gradients(trainable):
    """Frozen experts or a frozen input: backward skips those GEMMs, the rest match the reference."""
    problem = random_problem(Shape(37, 16, 8, 12, 5, 3), glu=True)
    wanted = {"x": [0], "experts": [3, 4, 5, 6], "router": [1]}[trainable]
    grad_out = torch.randn(37, 12)
    grads = {}
    for name, fn in (("cpu", cpu.expert_mlp), ("ref", reference.expert_mlp)):
        args = [t.detach().clone().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(problem)]
        y = fn(*args, "silu", True)
        grads[name] = torch.autograd.grad(y, [args[i] for i in wanted], grad_out)
    for g, g_ref in zip(grads["cpu"], grads["ref"]):
        assert_close(g, g_ref, torch.float32, trainable)


def test_torch_compile_fullgraph():
    problem = random_problem(Shape(13, 8, 4, 6, 4, 2), glu=True)
    grad_out = torch.randn(13, 6)
    compiled = torch.compile(cpu.expert_mlp, backend="aot_eager", fullgraph=True)
    y, grads = run(compiled, problem, "silu", True, grad_out)
    y_ref, grads_ref = run(reference.expert_mlp, problem, "silu", True, grad_out)
    assert_close(y, y_ref, torch.float32, "y")
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close(g, g_ref, torch.float32, f"grad {name}")


def test_dispatch_by_name():
    problem = random_problem(Shape(9, 8, 4, 8, 4, 2))
    assert ops.resolve_backend("auto", "cpu") is cpu
    y = ops.expert_mlp(*problem, activation="gelu", backend="cpu")
    assert_close(y, reference.expert_mlp(*problem, "gelu"), torch.float32, "y")
    int32_ids = list(problem)
    int32_ids[2] = problem[2].int()
    assert torch.equal(cpu.expert_mlp(*int32_ids, "gelu", False), y)


def test_raw_backend_checks_its_own_arguments():
    """Without ops.py's contract in front, the C++ op still refuses (RuntimeError from TORCH_CHECK)."""
    x, w, idx, w1, b1, w2, b2 = random_problem(Shape(9, 8, 4, 8, 4, 2))
    with pytest.raises(RuntimeError, match="activation"):
        cpu.expert_mlp(x, w, idx, w1, b1, w2, b2, "tanh", False)
    with pytest.raises(RuntimeError, match="GLU"):
        cpu.expert_mlp(x, w, idx, w1, b1, w2, b2, "gelu", True)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu.expert_mlp(x.double(), w, idx, w1, b1, w2, b2, "gelu", False)


def test_topk_gating():
    """The wrapper runs the compiled op, or says clearly that it is missing; never falls back."""
    logits = torch.randn(19, 8)
    if not hasattr(torch.ops.cumo, "topk_gating"):
        with pytest.raises(RuntimeError, match="topk_gating"):
            cpu.topk_gating(logits, 2, True)
        return
    logits.requires_grad_()
    weights, idx = cpu.topk_gating(logits, 2, True)
    ref_weights, ref_idx = reference.topk_gating(logits, 2, True)
    assert torch.equal(idx, ref_idx)
    assert_close(weights, ref_weights, torch.float32, "weights")
    grad = torch.randn_like(weights)  # the backend's loader registers the op's autograd
    assert_close(torch.autograd.grad(weights, logits, grad)[0], torch.autograd.grad(ref_weights, logits, grad)[0],
                 torch.float32, "grad logits")


def test_backward_allocates_no_zero_gradient_for_hidden():
    """The saved [T*K, H1] hidden is a non-differentiable output of the forward op: backward must not
    receive (and allocate) a zero-filled gradient for it, which would be as large as the activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shape = Shape(40, 24, 12, 20, 4, 2)
    x, w, idx, w1, b1, w2, b2 = [t.requires_grad_() if t.is_floating_point() else t
                                 for t in random_problem(shape, glu=True)]
    y = cpu.expert_mlp(x, w, idx, w1, b1, w2, b2, "silu", True)
    hidden_shape = (shape.tokens * shape.top_k, 2 * shape.hidden)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
            return out

    with Record() as record:
        y.backward(torch.randn_like(y))
    assert not [f for f, s in record.shapes if s == hidden_shape and "expert_mlp" not in f], record.shapes
    assert w1.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 200])
def test_combine_exact(dtype, tokens):
    """The weighted combine: sum_k w_k * row_k over the kept slots in fp32, rounded once (bf16: to nearest
    even, NaN canonical), with a partial last vector (O = 37). Identity experts and relu on positive
    inputs make every expert output row equal to x's row; x with 8 significant bits and weights in
    eighths make every product and sum exact in fp32, so the expected value is exact whatever the
    order or fusion of the multiply-adds, and the bf16 output shows the rounding alone."""
    d, k, e = 37, 3, 4
    x = (torch.randint(64, 256, (tokens, d)) / 64).to(dtype)
    x[1, 3] = float("nan")
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
    idx[0, 2] = e  # a dropped slot: skipped, its weight unused
    w = torch.randint(1, 8, (tokens, k)) / 8
    w[0, 2] = float("nan")
    eye = torch.eye(d).expand(e, d, d).to(dtype)
    with torch.inference_mode():
        y = cpu.expert_mlp(x, w, idx, eye, None, eye, None, "relu", False)
    kept = (idx < e).float()
    expected = (torch.nan_to_num(w) * kept).sum(1, keepdim=True) * x.float()
    expected[1] = float("nan")  # the NaN reaches every column of token 1 through the GEMMs (NaN * 0)
    expected = expected.to(dtype)
    assert torch.isnan(y[1]).all()
    assert torch.equal(y[2:], expected[2:]) and torch.equal(y[0], expected[0])
    if dtype == torch.bfloat16:
        assert (y.view(torch.int16)[1] == 0x7FC0).all()


def test_concurrent_calls_from_python_threads():
    """Serving: calls from several Python threads at once (the op releases the GIL) each get their own
    scratch and plan; every result equals the same call made alone."""
    from concurrent.futures import ThreadPoolExecutor

    problems = [random_problem(Shape(t, 24, 12, 20, 6, 2), glu=True) for t in (5, 40, 300, 7)]
    with torch.inference_mode():
        alone = [cpu.expert_mlp(*p, "silu", True) for p in problems]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                together = list(pool.map(lambda p: cpu.expert_mlp(*p, "silu", True), problems))
                for a, b in zip(alone, together):
                    assert torch.equal(a, b)
