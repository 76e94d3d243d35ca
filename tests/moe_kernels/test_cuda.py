"""CUDA backend (csrc/cuda, moe_kernels/cuda.py).

(a) every csrc/cuda/*.cu compiles with plain nvcc for sm_80 and sm_90 (skipped without nvcc);
(b) the built extension registers its ops with the expected schemas, fakes and autograd;
(c) the torch side of the expert MLP (grouped GEMMs, masking, combine) against the reference on
    CPU, fed the reference routing plan (torch._grouped_mm runs on CPU too);
(d) GPU parity of gating, routing plan and expert MLP (forward and backward) with the reference,
    marked gpu: they run only where CUDA exists.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

from moe_kernels import cuda as cuda_backend
from moe_kernels import ops, reference
from moe_kernels.routing import build_routing_plan
from tests.helpers import (
    ODD_SHAPES,
    ROUTINGS,
    RTOL,
    Shape,
    assert_close,
    assert_matches_reference,
    random_problem,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
NVCC = "/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else shutil.which("nvcc")
ARCHS = ("80", "90")

try:
    from moe_kernels import _cuda  # noqa: F401

    _EXTENSION_MISSING = None
except ImportError as exc:
    _EXTENSION_MISSING = f"moe_kernels._cuda is not built: {exc}"

needs_extension = pytest.mark.skipif(_EXTENSION_MISSING is not None, reason=str(_EXTENSION_MISSING))


# ----------------------------------------------------------------------------- (a) nvcc


def test_cuda_sources_exist():
    names = sorted(os.path.basename(path) for path in CUDA_SOURCES)
    assert names == ["gating.cu", "routing.cu"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, tmp_path):
    # Only csrc/ on the include path: the kernels are plain CUDA and include no torch header,
    # so this also holds them to that. One nvcc call builds both architectures.
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    command = [NVCC, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", *gencode,
               "-I", os.path.join(REPO, "csrc"), source, "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "kernel.o").stat().st_size > 0


# ----------------------------------------------------------------------------- (b) extension

EXPECTED_SCHEMAS = {
    "topk_gating": "cumo_cuda::topk_gating(Tensor logits, int top_k, bool normalize) -> (Tensor, Tensor)",
    "routing_plan": (
        "cumo_cuda::routing_plan(Tensor top_k_idx, int num_experts)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}


@needs_extension
@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_op_registered(name):
    op = getattr(torch.ops.cumo_cuda, name)
    assert str(op.default._schema) == EXPECTED_SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cumo_cuda::{name}", "CUDA")


@needs_extension
def test_topk_gating_fake_and_autograd_on_meta():
    logits = torch.empty(9, 6, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weights, idx = torch.ops.cumo_cuda.topk_gating(logits, 4, True)
    assert weights.shape == idx.shape == (9, 4)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int64 and weights.device.type == "meta"
    (grad,) = torch.autograd.grad(weights.sum(), logits)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype


@needs_extension
@pytest.mark.parametrize(
    "tokens,top_k,experts",
    [
        (5, 3, 4),  # exactly T*K rows
        (0, 2, 6),  # no tokens: empty rows, E+1 offsets
    ],
)
def test_routing_plan_fake(tokens, top_k, experts):
    idx = torch.empty(tokens, top_k, dtype=torch.int64, device="meta")
    counts, offsets, sorted_slots, slot_rows = torch.ops.cumo_cuda.routing_plan(idx, experts)
    assert [tuple(t.shape) for t in (counts, offsets, sorted_slots, slot_rows)] == [
        (experts,), (experts + 1,), (tokens * top_k,), (tokens * top_k,)
    ]
    assert all(t.dtype == torch.int64 for t in (counts, offsets, sorted_slots, slot_rows))


def test_unavailable_off_gpu():
    assert "CUDA tensors only" in (cuda_backend.unavailable_reason(torch.device("cpu")) or "")
    if not torch.cuda.is_available():
        assert cuda_backend.unavailable_reason(torch.device("cuda")) is not None


def test_named_backend_never_falls_back():
    problem = random_problem(Shape(4, 8, 8, 8, 4, 2))
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.expert_mlp(*problem, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        cuda_backend.expert_mlp(*problem)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        cuda_backend.topk_gating(torch.randn(3, 4), 2)


# ----------------------------------------------------------------------------- (c) torch side on CPU

def _compare_with_reference(problem, activation, glu, run, dtype):
    """Forward and every gradient of `run(...)` against reference.expert_mlp (the shared harness)."""
    assert problem[0].dtype == dtype
    assert_matches_reference(run, problem, activation, glu)


def _from_reference_plan(x, weights, idx, w1, b1, w2, b2, activation, glu):
    plan = build_routing_plan(idx, w1.shape[0])
    return cuda_backend.expert_mlp_from_plan(x, weights, idx, w1, b1, w2, b2, activation, glu, plan)


def _drop_some(idx: torch.Tensor, experts: int) -> torch.Tensor:
    """Marks a few slots dropped (id E, and -1) so the dropped rows' masking is exercised."""
    idx = idx.clone()
    if idx.shape[0] >= 2:
        idx[0, -1] = experts
        idx[-1, 0] = -1
    return idx


@pytest.mark.parametrize("shape,why", ODD_SHAPES, ids=[why for _, why in ODD_SHAPES])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("glu", [False, True])
def test_expert_mlp_torch_side_cpu(shape, why, routing, glu):
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, glu=glu, routing=routing)
    problem = (x, weights, _drop_some(idx, shape.experts), w1, b1, w2, b2)
    _compare_with_reference(problem, "silu" if glu else "gelu", glu, _from_reference_plan, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_mlp_torch_side_cpu_low_precision(dtype):
    shape = Shape(37, 24, 12, 20, 5, 2)  # odd feature sizes: every GEMM is padded to 16 bytes
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, dtype=dtype)
    problem = (x, weights, _drop_some(idx, shape.experts), w1, b1, w2, b2)
    _compare_with_reference(problem, "gelu_tanh", False, _from_reference_plan, dtype)


def test_expert_mlp_torch_side_cpu_no_bias_non_contiguous():
    shape = Shape(21, 16, 8, 12, 4, 2)
    x, weights, idx, w1, _, w2, _ = random_problem(shape, bias=False)
    x = torch.stack([x, x], dim=-1).flatten(1)[:, ::2]  # column stride 2
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)  # column-major expert weights
    assert not x.is_contiguous() and not w1.is_contiguous()
    _compare_with_reference((x, weights, idx, w1, None, w2, None), "quick_gelu", False, _from_reference_plan,
                            torch.float32)


def test_dropped_rows_never_leak():
    # Every slot of token 0 dropped: its output is exactly zero and its input gets zero gradient,
    # even though the grouped GEMM leaves the dropped rows uninitialised.
    shape = Shape(6, 16, 8, 16, 4, 2)
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape)
    idx[0] = torch.tensor([4, 7])
    x.requires_grad_(True)
    y = _from_reference_plan(x, weights, idx, w1, b1, w2, b2, "gelu", False)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and grad[1:].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,out_features", [(16, 8), (13, 7), (3, 1)])
def test_grouped_linear(dtype, in_features, out_features):
    counts = [3, 0, 5, 1]  # an expert with no rows in the middle
    rows = torch.randn(sum(counts) + 2, in_features, dtype=dtype)  # 2 trailing rows past every group
    weight = torch.randn(len(counts), out_features, in_features, dtype=dtype)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = cuda_backend.grouped_linear(rows, weight, ends)
    assert out.shape == (rows.shape[0], out_features)
    start = 0
    for e, count in enumerate(counts):
        expected = rows[start:start + count].float() @ weight[e].float().t()
        assert_close(out[start:start + count].float(), expected, dtype if dtype in RTOL else torch.float32,
                     f"expert {e}")
        start += count


# ----------------------------------------------------------------------------- (d) GPU parity

GATING_CASES = [
    (4, 2),  # CuMo's setting
    (8, 8),  # top_k == num_experts
    (64, 8),  # two logits per lane
    (67, 5),  # E not a multiple of the warp
    (300, 17),  # E far past a warp, large k
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("experts,top_k", GATING_CASES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens", [0, 1, 1000])
@pytest.mark.gpu
@needs_extension
def test_gpu_topk_gating(dtype, experts, top_k, normalize, tokens):
    logits = 3 * torch.randn(tokens, experts, device="cuda", dtype=dtype)
    weights, idx = cuda_backend.topk_gating(logits, top_k, normalize)
    probs = torch.softmax(logits.float(), dim=-1)
    canonical = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(idx, canonical)
    expected = probs.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) if normalize else expected
    assert_close(weights, expected, torch.float32, "weights")
    if dtype in (torch.float32, torch.float64) and tokens:
        ref_weights, ref_idx = reference.topk_gating(logits, top_k, normalize)
        assert torch.equal(idx, ref_idx)
        assert_close(weights, ref_weights, torch.float32, "weights vs reference")


@pytest.mark.gpu
@needs_extension
def test_gpu_topk_gating_non_contiguous_and_grad():
    logits = torch.randn(40, 12, device="cuda").t().contiguous().t().requires_grad_(True)
    weights, idx = cuda_backend.topk_gating(logits, 3, True)
    ref_weights, ref_idx = reference.topk_gating(logits, 3, True)
    assert torch.equal(idx, ref_idx)
    grad_out = torch.randn_like(weights)
    (grad,) = torch.autograd.grad((weights * grad_out).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_weights * grad_out).sum(), logits)
    assert_close(grad, ref_grad, torch.float32, "logit gradient")


ROUTING_CASES = [
    (0, 2, 4),  # no tokens
    (1, 2, 4),  # one token
    (33, 8, 8),  # top_k == num_experts
    (700, 2, 64),  # 1400 slots: several warp chunks and blocks
    (5000, 3, 7),  # long per-expert runs across many chunks
]


@pytest.mark.parametrize("tokens,top_k,experts", ROUTING_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.gpu
@needs_extension
def test_gpu_routing_plan_matches_reference(tokens, top_k, experts, index_dtype):
    idx = torch.randint(-2, experts + 3, (tokens, top_k), device="cuda")  # some dropped: < 0 and >= E
    idx = idx.to(index_dtype)
    plan = cuda_backend.routing_plan(idx, experts)
    expected = build_routing_plan(idx, experts)
    for name in ("expert_counts", "expert_offsets", "sorted_slots", "slot_rows"):
        assert torch.equal(getattr(plan, name), getattr(expected, name)), name


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("experts", [0, 4096])  # below and above the bound [1, kRoutingMaxExperts]
def test_gpu_routing_plan_rejects_bad_arguments(experts):
    idx = torch.zeros(3, 2, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="num_experts"):
        torch.ops.cumo_cuda.routing_plan(idx, experts)


@pytest.mark.gpu
@needs_extension
def test_gpu_no_host_sync_and_graph_capture():
    logits = torch.randn(64, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights, idx = cuda_backend.topk_gating(logits, 4, True)
        plan = cuda_backend.routing_plan(idx, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_weights, graph_idx = cuda_backend.topk_gating(logits, 4, True)
        graph_plan = cuda_backend.routing_plan(graph_idx, 16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_idx, idx) and torch.equal(graph_weights, weights)
    assert torch.equal(graph_plan.sorted_slots, plan.sorted_slots)


@pytest.mark.parametrize("shape,why", ODD_SHAPES, ids=[why for _, why in ODD_SHAPES])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@needs_extension
def test_gpu_expert_mlp(shape, why, routing, glu, dtype):
    x, weights, idx, w1, b1, w2, b2 = random_problem(shape, dtype=dtype, device="cuda", glu=glu, routing=routing)
    problem = (x, weights, _drop_some(idx, shape.experts), w1, b1, w2, b2)
    _compare_with_reference(problem, "silu" if glu else "gelu", glu, cuda_backend.expert_mlp, dtype)


@pytest.mark.gpu
@needs_extension
def test_gpu_expert_mlp_deterministic():
    problem = random_problem(Shape(257, 64, 32, 64, 8, 2), device="cuda")
    first = cuda_backend.expert_mlp(*problem)
    second = cuda_backend.expert_mlp(*problem)
    assert torch.equal(first, second)


@pytest.mark.gpu
@needs_extension
def test_gpu_named_backend_dispatch():
    problem = random_problem(Shape(10, 16, 8, 16, 4, 2), device="cuda")
    assert_close(ops.expert_mlp(*problem, backend="cuda"), reference.expert_mlp(*problem), torch.float32, "ops")



@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16's meta check asks for cuBLASLt, i.e. a GPU
def test_cuda_backend_traces_in_one_graph_without_a_gpu(monkeypatch, dtype):
    """torch.compile(fullgraph=True) of the cuda expert MLP, forward and backward, traced on meta tensors
    standing in for CUDA ones (the fakes and meta kernels are all tracing needs). This is how the
    H200 run's graph break (a branch on an alignment) was found and is kept fixed without a GPU."""
    from moe_kernels import contract

    check_one_device = contract.check_one_device
    monkeypatch.setattr(cuda_backend, "_require", lambda device: None)
    monkeypatch.setattr(contract, "check_one_device", lambda op, named, allow_meta=False: check_one_device(op, named, True))
    x, weights, idx, w1, b1, w2, b2 = [None if t is None else t.to("meta") for t in
                                       random_problem(Shape(37, 64, 96, 64, 8, 2), glu=True)]
    x, w1, b1, w2, b2 = (t.to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2))
    compiled = torch.compile(cuda_backend.expert_mlp, backend="aot_eager", fullgraph=True)
    y = compiled(x, weights, idx, w1, b1, w2, b2, "silu", True)
    y.sum().backward()
    assert y.shape == (37, 64) and y.dtype == dtype
    # The weights' gradients come back through the traced backward graph (x's path runs through
    # aten::where, which has no autograd kernel on meta: its gradient is checked on a GPU instead).
    for name, t in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2)):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, name


@pytest.mark.parametrize("capacity", [None, 3])
def test_moe_mlp_routes_once_torch_side_cpu(monkeypatch, capacity):
    """cuda.moe_mlp on CPU tensors with the reference's gating and plan standing in for the CUDA ops: equal to the
    ops one by one, and the load is the plan's count (capacity: left to the ops one by one)."""
    monkeypatch.setattr(cuda_backend, "_require", lambda device: None)
    monkeypatch.setattr(cuda_backend, "topk_gating", reference.topk_gating)
    monkeypatch.setattr(cuda_backend, "routing_plan", build_routing_plan)
    x, _, _, w1, b1, w2, b2 = random_problem(Shape(9, 16, 8, 12, 4, 2))
    router_weight = torch.randn(4, 16, requires_grad=True)
    got = cuda_backend.moe_mlp(x, None, router_weight, w1, b1, w2, b2, 2, True, "gelu", False, capacity, True)
    if capacity is not None:
        assert got is None
        return
    expected = ops.moe_mlp(x, router_weight, w1, b1, w2, b2, 2, True, "gelu", False, backend="torch",
                           return_logits=True)
    for name, g, e in zip(expected._fields, got, expected):
        if g.is_floating_point():
            assert_close(g, e, torch.float32, name)
        else:
            assert torch.equal(g, e), name
    grads = torch.autograd.grad(got[0].sum(), router_weight)
    assert_close(grads[0], torch.autograd.grad(expected.out.sum(), router_weight)[0], torch.float32, "d router")


@needs_extension
def test_cuda_moe_mlp_traces_in_one_graph_without_a_gpu(monkeypatch):
    """cuda.moe_mlp (router GEMM, the extension's gating and plan, the experts) under torch.compile(fullgraph=True),
    forward and backward, on meta tensors standing in for CUDA ones, as above."""
    from moe_kernels import contract

    check_one_device = contract.check_one_device
    monkeypatch.setattr(cuda_backend, "_require", lambda device: None)
    monkeypatch.setattr(contract, "check_one_device",
                        lambda op, named, allow_meta=False: check_one_device(op, named, True))
    x, _, _, w1, b1, w2, b2 = [None if t is None else t.to("meta") for t in
                               random_problem(Shape(37, 64, 96, 64, 8, 2), glu=True)]
    router_weight = torch.empty(8, 64, device="meta")
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, router_weight, w1, b1, w2, b2)]
    x, router_weight, w1, b1, w2, b2 = leaves

    def layer(x, router_weight, w1, b1, w2, b2):
        return cuda_backend.moe_mlp(x, None, router_weight, w1, b1, w2, b2, 2, True, "silu", True, None, True)

    out, weights, idx, load, logits = torch.compile(layer, backend="aot_eager", fullgraph=True)(*leaves)
    shapes = (out.shape, weights.shape, idx.shape, load.shape, logits.shape)
    assert shapes == ((37, 64), (37, 2), (37, 2), (8,), (37, 8))
    out.sum().backward()
    for name, t in zip(("router_weight", "w1", "b1", "w2", "b2"), leaves[1:]):
        assert t.grad is not None and t.grad.shape == t.shape, name
