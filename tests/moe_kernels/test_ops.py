"""Backend dispatch (moe_kernels/ops.py): names, availability, no silent fallback."""

import pytest
import torch

from moe_kernels import ops, reference
from tests.helpers import Shape, random_problem


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'.*'auto'.*'torch'"):
        ops.resolve_backend("tpu", "cpu")


def test_torch_backend_is_the_reference():
    assert ops.resolve_backend("torch", "cpu") is reference


def test_auto_on_cpu_prefers_compiled_backend_when_it_runs():
    module = ops.resolve_backend("auto", "cpu")
    expected = "moe_kernels.cpu" if ops.unavailable_reason("cpu", "cpu") is None else "moe_kernels.reference"
    assert module.__name__ == expected


def test_auto_passes_over_a_backend_that_does_not_take_the_dtype(monkeypatch):
    """On a GPU "auto" tries triton first, which computes in fp32/fp16/bf16: float64 (a gradcheck) goes to the
    reference instead of raising TypeError; a named backend still raises. Shown on CPU with triton first (its
    interpreter) in the CPU order."""
    pytest.importorskip("triton")
    import moe_kernels.triton as triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(ops.AUTO_ORDER, "cpu", ("triton", "torch"))
    assert ops.resolve_backend("auto", "cpu", torch.float32) is triton_backend
    assert ops.resolve_backend("auto", "cpu", torch.float64) is reference
    assert ops.resolve_backend("auto", "cpu") is triton_backend  # integer ops (the load) name no dtype
    problem = list(random_problem(Shape(5, 8, 4, 6, 3, 2), torch.float64))
    router = torch.randn(3, 8, dtype=torch.float64)
    triton_backend.reset_launch_counts()
    got = ops.moe_mlp(problem[0], router, *problem[3:], 2)
    assert not triton_backend.LAUNCHES and got.out.dtype == torch.float64
    assert torch.equal(got.out, ops.moe_mlp(problem[0], router, *problem[3:], 2, backend="torch").out)
    with pytest.raises(TypeError, match="float64"):
        ops.moe_mlp(problem[0], router, *problem[3:], 2, backend="triton")
    got = ops.moe_mlp(problem[0].float(), router.float(), *[t.float() for t in problem[3:]], 2)
    assert triton_backend.LAUNCHES  # fp32 on triton


def test_available_backends_reports_every_backend():
    report = ops.available_backends("cpu")
    assert set(report) == {"torch", "cpu", "triton", "cuda"}
    assert report["torch"] is None
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason), name


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_explicit_backend_that_cannot_run_raises(name):
    device = "meta"  # no compiled backend runs on meta tensors
    with pytest.raises(ops.BackendUnavailableError, match=f"backend '{name}' cannot run on meta"):
        ops.resolve_backend(name, device)


def test_cuda_backend_without_gpu_raises_not_falls_back():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    x, weights, idx, w1, b1, w2, b2 = random_problem(Shape(4, 8, 4, 8, 2, 1))
    with pytest.raises(ops.BackendUnavailableError):
        ops.expert_mlp(x, weights, idx, w1, b1, w2, b2, backend="cuda")


def test_expert_mlp_op_matches_reference_through_dispatch():
    problem = random_problem(Shape(9, 8, 6, 5, 3, 2), torch.float64)
    assert torch.equal(ops.expert_mlp(*problem, backend="torch"), reference.expert_mlp(*problem))


def test_package_works_without_compiled_extensions():
    """With the extensions missing, imports succeed, `auto` runs the reference, and `cpu` says why not."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['moe_kernels._C'] = None; sys.modules['moe_kernels._cuda'] = None\n"
        "import torch, moe_kernels\n"
        "from cumo_layers import SparseMoEMLP\n"
        "reason = moe_kernels.available_backends('cpu')['cpu']\n"
        "assert reason and 'not built' in reason, reason\n"
        "assert moe_kernels.resolve_backend('auto', 'cpu').__name__ == 'moe_kernels.reference'\n"
        "print(SparseMoEMLP(8, 6)(torch.randn(3, 8)).shape)\n"
        "try:\n"
        "    SparseMoEMLP(8, 6, backend='cpu')(torch.randn(3, 8))\n"
        "except moe_kernels.BackendUnavailableError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([3, 8])" in result.stdout
    assert "refused: backend 'cpu' cannot run on cpu" in result.stdout
