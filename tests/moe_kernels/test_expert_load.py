"""ops.expert_load (assignments per expert; ids outside [0, E) not counted) on every backend that runs here,
against the reference and against a count in plain Python; the Triton kernel under TRITON_INTERPRET=1,
its launches counted."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from moe_kernels import ops, reference
from tests.helpers import cpu_backends

# (T, K, E): empty, one token, all on one expert, several slot blocks (E=64: 64 slots a block), top_k == E.
SHAPES = [(0, 2, 4), (1, 2, 4), (9, 1, 1), (300, 8, 64), (33, 8, 8)]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the Triton backend take CPU tensors


def counted(ids: torch.Tensor, num_experts: int) -> list[int]:
    counts = Counter(i for i in ids.reshape(-1).tolist() if 0 <= i < num_experts)
    return [counts[e] for e in range(num_experts)]


def random_ids(tokens: int, top_k: int, experts: int, dropped: bool) -> torch.Tensor:
    ids = torch.randint(0, experts, (tokens, top_k))
    if dropped and ids.numel():  # capacity drops and expert-parallel sentinels: -1, E, far beyond
        ids.view(-1)[::3] = torch.tensor([-1, experts, experts + 5]).repeat(ids.numel())[: ids.view(-1)[::3].numel()]
    return ids


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("tokens,top_k,experts", SHAPES)
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_counts_every_kept_assignment(backend, tokens, top_k, experts, dropped, dtype):
    torch.manual_seed(tokens + experts)
    ids = random_ids(tokens, top_k, experts, dropped).to(dtype)
    load = ops.expert_load(ids, experts, backend=backend)
    assert load.dtype == torch.int64 and load.shape == (experts,)
    assert load.tolist() == counted(ids, experts) == reference.expert_load(ids, experts).tolist()


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_ids(backend):
    ids = torch.randint(0, 6, (4, 10)).t()  # [10, 4], not contiguous
    assert ops.expert_load(ids, 6, backend=backend).tolist() == counted(ids, 6)


def test_triton_launches_one_histogram_and_sums_blocks_only_when_several():
    pytest.importorskip("triton")
    from moe_kernels.triton import LAUNCHES, reset_launch_counts

    reset_launch_counts()
    ops.expert_load(torch.randint(0, 64, (4, 8)), 64, backend="triton")  # 32 slots: one block
    assert dict(LAUNCHES) == {"routing_histogram_kernel": 1}
    reset_launch_counts()
    ids = torch.randint(0, 64, (300, 8))  # 2400 slots: 38 blocks
    assert ops.expert_load(ids, 64, backend="triton").tolist() == counted(ids, 64)
    assert dict(LAUNCHES) == {"routing_histogram_kernel": 1}


def test_triton_custom_op_passes_opcheck_and_compiles():
    pytest.importorskip("triton")
    from moe_kernels.triton import routing

    ids = torch.randint(-1, 9, (20, 3))
    torch.library.opcheck(routing._expert_load_op, (ids, 8))
    compiled = torch.compile(lambda t: ops.expert_load(t, 8, backend="triton"), fullgraph=True, backend="eager")
    assert compiled(ids).tolist() == counted(ids, 8)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ids,experts,error,match", [
    (torch.zeros(4, dtype=torch.int64), 4, ValueError, "2 dims"),
    (torch.zeros(2, 2), 4, TypeError, "integer expert ids"),
    (torch.zeros(2, 2, dtype=torch.int64), 0, ValueError, "num_experts must be an int >= 1"),
    (torch.zeros(2, 2, dtype=torch.int64), True, ValueError, "num_experts must be an int >= 1"),
])
def test_bad_arguments_raise_the_same_error_everywhere(backend, ids, experts, error, match):
    with pytest.raises(error, match=match):
        ops.expert_load(ids, experts, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,top_k,experts", [(1, 8, 64), (16384, 8, 128), (777, 2, 4)])
def test_compiled_triton_kernel_on_gpu(monkeypatch, tokens, top_k, experts):
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels(monkeypatch)
    ids = random_ids(tokens, top_k, experts, dropped=True).cuda()
    assert ops.expert_load(ids, experts, backend="triton").tolist() == counted(ids.cpu(), experts)
