"""Every Triton kernel the layer launches on a GPU compiles for Hopper (sm_90) and Ampere (sm_80), checked
without a GPU: the layer runs on CPU tensors with the GPU's launch settings (tiles, dot precision), every
launch is recorded instead of run, and each distinct kernel specialization goes through Triton's whole
compiler down to a cubin (its bundled ptxas). The interpreter tests check what the kernels compute; this
checks that the compiled path they never take here type-checks and lowers, so a GPU session does not find
out first."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.kernel_resources import recording_gpu_launches, specialize  # noqa: E402
from moe_kernels.reference import GluSpec  # noqa: E402
from moe_kernels.triton import runtime  # noqa: E402

# About 70 specializations, ~0.5 s each to compile: Hopper (the GPUs measured) always, Ampere with --runslow.
TARGETS = [pytest.param(GPUTarget("cuda", 90, 32), id="sm_90"),
           pytest.param(GPUTarget("cuda", 80, 32), id="sm_80", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def recorded():
    """Launches of the layer as a GPU would issue them (compiled-mode settings), one per specialization."""
    from cumo_layers import SparseMoEMLP

    configurations = [  # (dtype, activation, glu, bias): every epilogue and dtype the kernels specialize on
        (torch.bfloat16, "silu", True, False),
        (torch.float16, "gelu", False, True),
        (torch.float32, "quick_gelu", GluSpec("clamped", interleaved=True, limit=7.0, up_offset=1.0), True),
    ]
    with recording_gpu_launches() as recording:
        for dtype, activation, glu, bias in configurations:
            for tokens in (1, 300):  # one routing block, and several (histogram, scan, scatter)
                layer = SparseMoEMLP(64, 32, num_experts=8, top_k=2, activation=activation, glu=glu, bias=bias,
                                     backend="triton", dtype=dtype).train()
                x = torch.randn(tokens, 64, dtype=dtype, requires_grad=True)
                out = layer(x)
                torch.autograd.grad(out.float().sum() + layer.last_aux_loss, [x, *layer.parameters()])
                with torch.no_grad():
                    layer.eval()(x)
    return recording.launches


def ptxas_missing() -> str | None:
    """Why Triton's NVIDIA backend cannot assemble here (None if it can)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        get_ptxas_version(90)
    except Exception as exc:  # no NVIDIA backend, or its ptxas is missing or broken
        return f"Triton's ptxas is not usable here: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("target", TARGETS)
def test_every_launched_kernel_compiles(recorded, target, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache; nothing left in ~
    if ptxas_missing():
        pytest.skip(ptxas_missing())
    if runtime._library_is_interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its own library cannot compile")
    names = {key[0] for key in recorded}
    assert {"topk_gating_kernel", "topk_gating_backward_kernel", "router_losses_kernel",
            "router_losses_reduce_kernel", "router_losses_backward_kernel", "routing_one_block_kernel",
            "routing_histogram_kernel", "routing_scan_kernel", "routing_scatter_kernel", "grouped_gemm_kernel",
            "combine_kernel", "topk_weight_grad_kernel", "grouped_weight_grad_kernel"} <= names, names
    failures = []
    for kernel, args, constexprs in recorded.values():
        try:
            source, options = specialize(kernel, args, constexprs, target)
            triton.compile(source, target=target, options=options)
        except Exception as exc:  # collected: every failing specialization is reported at once
            failures.append(f"{kernel.__name__} {constexprs}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    assert not failures, "\n".join(failures)
