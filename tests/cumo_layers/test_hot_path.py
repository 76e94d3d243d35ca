"""What a CPU-only CI can hold of the GPU launch path (issue 16): the whole layer's kernel launches
under the Triton interpreter, the aten ops the layer runs besides its kernels (an eager inference
forward calls the launchers directly; training goes through the custom ops), and no zero-fill inside
the ops. The GPU timings themselves come from `make gpu-check`."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cumo_layers import SparseMoEMLP
from moe_kernels import ops
from moe_kernels.reference import glu_code

pytest.importorskip("triton")

# Ops that only relabel memory: they launch nothing on a GPU.
METADATA_OPS = {"view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "reshape", "unsqueeze",
                "squeeze", "as_strided", "slice", "select", "permute", "_reshape_alias", "empty", "new_empty",
                "empty_strided", "promote_types"}


class OpLog(TorchDispatchMode):
    """Records every op that reaches dispatch (a custom op is one entry: its inside is not seen)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))

    def compute_ops(self) -> list[str]:
        return [op for op in self.ops if op.split(".")[0] == "aten" and op.split(".")[1] not in METADATA_OPS]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moe_kernels import triton as triton_backend

    if triton_backend.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip(triton_backend.unavailable_reason(torch.device("cpu")))
    triton_backend.reset_launch_counts()
    yield triton_backend
    triton_backend.reset_launch_counts()


@pytest.fixture
def stubbed_launches(interpreter, monkeypatch):
    """Kernel launches only counted, not run: what remains visible to a dispatch mode is the host
    path's own aten ops (the interpreter would add its own while it executes a kernel)."""
    from moe_kernels.triton import runtime

    monkeypatch.setattr(runtime, "launch", lambda spec, interpret, *tensors: interpreter.LAUNCHES.update([spec.name]))
    return interpreter


def _decode_layer(glu: bool = True) -> SparseMoEMLP:
    # Decode-like: 1 token, top-8 of 16 experts; small sizes keep the interpreter fast.
    return SparseMoEMLP(32, 16, num_experts=16, top_k=8, activation="silu", glu=glu, bias=False,
                        backend="triton").eval()


def test_decode_forward_is_three_launches(stubbed_launches):
    """Issue 16 asks for at most six: the router's GEMM, gating and routing plan are one kernel, then fc1, then fc2
    and the combine as one token-major kernel (8 rows over 16 experts); no aten op computes anything besides them."""
    interpreter = stubbed_launches
    layer, x = _decode_layer(), torch.randn(1, 32)
    with torch.no_grad(), OpLog() as log:
        layer(x)
    launches = dict(interpreter.LAUNCHES)
    assert launches == {"route_one_block_kernel": 1, "grouped_gemm_kernel": 1, "fc2_combine_kernel": 1}, launches
    assert not log.compute_ops(), log.compute_ops()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, router", [(12, "route_one_block_kernel"), (40, "route_blocks_kernel")])
def test_inference_forward_runs_no_aten_op(stubbed_launches, dtype, tokens, router):
    """12 tokens x 8 slots fit the one-block router kernel; 40 do not, and the router's GEMM runs in the gating
    kernel, which counts the routing blocks for the plan's scatter: no aten op either way (no GEMM, cast, fill or
    copy)."""
    layer, x = _decode_layer().to(dtype), torch.randn(tokens // 4, 4, 32, dtype=dtype)
    with torch.no_grad(), OpLog() as log:
        layer(x)
    assert not log.compute_ops(), log.ops
    plan = {} if router == "route_one_block_kernel" else {"routing_scatter_kernel": 1}
    assert dict(stubbed_launches.LAUNCHES) == {router: 1, **plan, "grouped_gemm_kernel": 2, "combine_kernel": 1}


def test_training_step_aten_ops(stubbed_launches):
    """A training step besides its kernels. Forward: none; the router's GEMM runs in the gating kernel, the expert
    load and the losses are kernels (one routing block here: no sum over blocks), and the loss kernel reads the load
    as Switch's balance weights and scales it (it was a cast and a scale kernel before it).
    Backward: the test's own loss (sum, add, the seed), three gradient buffers and the router GEMM's two
    products, one an addmm onto the experts' input gradient (the logits' gradients from the gating and from
    the losses are added in the gating backward kernel: the layer is one autograd node). Each aten op costs
    ~10-20 us of host time on a GPU host (and PyTorch's logsumexp is nine kernels): a guard against the
    loss code growing back (the forward was 21 ops, then 16 with PyTorch's softmax, logsumexp, loss
    arithmetic and the expert load's scatter, then 3 with a cast and a scale of the balance weights, then the
    router's GEMM alone; the backward 23, then 10 with two adds)."""
    layer = _decode_layer()
    x = torch.randn(4, 32, requires_grad=True)
    with OpLog() as log:
        out = layer.train()(x)
    assert not log.compute_ops(), log.compute_ops()
    with OpLog() as log:
        (out.sum() + layer.last_aux_loss).backward()
    assert len(log.compute_ops()) <= 8, log.compute_ops()
    assert "aten.add" not in log.compute_ops()[2:], log.compute_ops()  # the first add is the test's loss


@pytest.mark.parametrize("tokens", [5, 300])
def test_training_step_launch_counts(interpreter, tokens):
    """Forward and backward of the whole layer (router included), every parameter trained. Routed once: one plan,
    whose counts are the balance loss's expert load and which the backward reuses. The router's GEMM runs in the
    gating kernel, which keeps the logits for the backward; past one routing block (300 tokens x 2 slots) it counts
    the blocks and the plan is the scatter, which scans those counts."""
    layer = SparseMoEMLP(32, 16, num_experts=4, top_k=2, activation="gelu", backend="triton")
    x = torch.randn(tokens, 32, requires_grad=True)
    (layer(x).square().mean() + layer.last_aux_loss).backward()
    launches = dict(interpreter.LAUNCHES)
    one_block = {"routing_one_block_kernel": 1}
    routing = one_block if tokens == 5 else {"routing_scatter_kernel": 1}
    assert launches == {
        "route_blocks_kernel": 1, "topk_gating_backward_kernel": 1,
        "router_losses_kernel": 1, "router_losses_reduce_kernel": 1, "router_losses_backward_kernel": 1, **routing,
        "grouped_gemm_kernel": 4, "combine_kernel": 2, "topk_weight_grad_kernel": 1, "grouped_weight_grad_kernel": 2,
    }, launches


FILLS = ("fill_", "zero_", "zeros", "zeros_like")


def test_no_zero_fill_inside_the_expert_op(interpreter):
    """The kernels write every element of the buffers they return: nothing is zero-filled first."""
    from moe_kernels.triton import experts as triton_ops

    layer = _decode_layer()
    x = torch.randn(6, 32)
    weights, idx = layer.router(x)[:2]
    body = triton_ops._expert_mlp_forward_op._init_fn  # the op's Python body, so the mode sees inside
    with torch.no_grad(), OpLog() as log:
        out = body(x, weights, idx, layer.w1, None, layer.w2, None, "silu", *glu_code(True), False, False)[0]
    assert not [op for op in log.ops if op.endswith(FILLS)], log.ops
    torch.testing.assert_close(out, ops.expert_mlp(x, weights, idx, layer.w1, None, layer.w2, None, "silu", True,
                                                   backend="torch"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 40])
def test_no_zero_fill_on_the_fused_inference_path(stubbed_launches, tokens):
    layer, x = _decode_layer(), torch.randn(tokens, 32)
    with torch.no_grad(), OpLog() as log:
        ops.moe_mlp(x, layer.router.weight, layer.w1, None, layer.w2, None, 8, True, "silu", True, backend="triton")
    assert not [op for op in log.ops if op.endswith(FILLS)], log.ops


def test_capacity_drops_run_as_kernels(stubbed_launches):
    """A training forward with capacity: the drops are a routing plan of the ids in priority order and one kernel
    (whose plan's counts are the balance loss's load). Besides the kernels: the router's GEMM, the priority-order
    copy of the ids, the balance weights (a cast and a scale) and the load's clamp. PyTorch's apply_capacity was
    about 25 aten ops (a sort among them), and the load a histogram kernel of its own: 33 ops in all."""
    layer = SparseMoEMLP(32, 16, num_experts=16, top_k=8, activation="silu", glu=True, bias=False,
                         capacity_factor=1.0, backend="triton").train()
    x = torch.randn(4, 32, requires_grad=True)
    with OpLog() as log:
        layer(x)
    assert len(log.compute_ops()) <= 5, log.compute_ops()
    assert stubbed_launches.LAUNCHES["capacity_kernel"] == 1
    assert "routing_histogram_kernel" not in stubbed_launches.LAUNCHES


def test_decode_gemm_grid_holds_the_tiles_a_routing_can_have(interpreter, monkeypatch):
    """At decode (R = K = 8 rows over E = 16 experts) at most 8 experts have rows, so fc1's grid holds
    cdiv(R, BLOCK_M) + min(E, R) = 1 + 8 row tiles (not E + 1 = 17, most of them exiting at once), and every
    output is still right."""
    from moe_kernels.triton import runtime

    grids, real_launch = [], runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda spec, interpret, *tensors: (
        grids.append((spec.name, spec.grid, spec.constexprs.get("BLOCK_N"))), real_launch(spec, interpret, *tensors)))
    layer, x = _decode_layer(), torch.randn(1, 32)
    with torch.no_grad():
        out = layer(x)
    (fc1, fc1_block_n), (fc2, fc2_block_n) = [(grid, block_n) for name, grid, block_n in grids
                                              if name in ("grouped_gemm_kernel", "fc2_combine_kernel")]
    # fc1: N = H = 16 columns in row tiles; fc2 (with the combine): the token's 32 output columns.
    assert fc1 == ((1 + 8) * -(-16 // fc1_block_n), 1, 1)
    assert fc2 == (1, -(-32 // fc2_block_n), 1)
    expected = ops.moe_mlp(x, layer.router.weight, layer.w1, None, layer.w2, None, 8, True, "silu", True,
                           backend="torch").out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
