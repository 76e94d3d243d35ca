"""torch.export of an eval SparseMoEMLP with a dynamic token count, on every backend that runs here: the exported
program computes the eager layer's output on token counts and shapes it was not traced with; AOTInductor packages
it for deployment and the loaded package does the same."""

import pytest
import torch

from cumo_layers import SparseMoEMLP
from moe_kernels import ops
from tests.helpers import RTOL, cpu_backends

TOKENS = torch.export.Dim("tokens", min=0, max=1 << 16)
# What a forward leaves on the module (its load, its losses) is not stored under export, which would warn.
pytestmark = pytest.mark.filterwarnings("error:The tensor attribute .* was assigned during export")


def tiny_moe(backend: str) -> SparseMoEMLP:
    return SparseMoEMLP(16, 24, num_experts=4, top_k=2, glu=True, activation="silu", backend=backend).eval()


def assert_runs_as_eager(exported, moe: SparseMoEMLP, contiguous_only: bool = False) -> None:
    inputs = [
        torch.randn(0, 16),  # no tokens (an expert-parallel rank may hold none)
        torch.randn(1, 16),  # decode
        torch.randn(37, 16),  # an odd count
        torch.randn(300, 16),  # past one routing block
    ]
    if not contiguous_only:
        inputs.append(torch.randn(40, 32)[:, ::2])  # a non-contiguous view
    for x in inputs:
        with torch.no_grad():
            torch.testing.assert_close(exported(x), moe(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [False, True])  # with gradients on, export traces the parameters' autograd too
def test_export_with_dynamic_tokens_runs_as_eager(backend, grad, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors
    moe = tiny_moe(backend)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(moe, (torch.randn(5, 16),), dynamic_shapes={"x": {0: TOKENS}})
    assert_runs_as_eager(program.module(), moe)


@pytest.mark.parametrize("backend", cpu_backends())
def test_export_of_a_batch_of_sequences(backend, monkeypatch):
    """[B, N, D] as a ViT or an LLM calls it, batch and sequence both dynamic."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    moe = tiny_moe(backend)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=1024)
    program = torch.export.export(moe, (torch.randn(2, 5, 16),), dynamic_shapes={"x": {0: batch, 1: seq}})
    for shape in [(1, 1, 16), (3, 197, 16), (4, 9, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), moe(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_aot_inductor_package_runs_as_eager(backend, tmp_path):
    """The CPU deployment path: export, compile ahead of time to a .pt2 package, load it back (7-15 s each). Like
    any AOTInductor package, it reads its input with the strides it was compiled for, unchecked unless
    AOTI_RUNTIME_CHECK_INPUTS=1 was set at compile time: contiguous inputs only."""
    if ops.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(ops.unavailable_reason(backend, "cpu"))
    moe = tiny_moe(backend)
    with torch.no_grad():
        program = torch.export.export(moe, (torch.randn(5, 16),), dynamic_shapes={"x": {0: TOKENS}})
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "moe.pt2"))
    assert_runs_as_eager(torch._inductor.aoti_load_package(path), moe, contiguous_only=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_export_on_gpu_runs_as_eager(backend):
    """The GPU backends' custom ops under torch.export, dynamic tokens; the cuda backend in bf16 (the dtype it
    traces), triton in fp32, where the exported router GEMM (cuBLAS) and the eager one (in the gating kernel) cannot
    round a logit differently enough to flip a near tie in the top-k."""
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    moe = tiny_moe(backend).to("cuda", dtype)
    program = torch.export.export(moe, (torch.randn(5, 16, device="cuda", dtype=dtype),),
                                  dynamic_shapes={"x": {0: TOKENS}})
    for tokens in (0, 1, 37, 3000):
        x = torch.randn(tokens, 16, device="cuda", dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), moe(x), rtol=RTOL[dtype], atol=RTOL[dtype] / 10)
