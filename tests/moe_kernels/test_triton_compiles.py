"""Every Triton kernel the layer launches on a GPU compiles for Hopper (sm_90) and Ampere (sm_80), checked
without a GPU (``python -m benchmarks.kernel_resources --check ARCH``): the layer runs on CPU tensors with
the GPU's launch settings (tiles, dot precision), every launch is recorded instead of run, and each distinct
specialization, specialized by Triton's own JIT binder, goes through Triton's whole compiler down to a cubin
(its bundled ptxas). The interpreter tests check what the kernels compute; this checks that the compiled
path they never take here type-checks and lowers, so a GPU session does not find out first. It runs in a
process of its own: once Triton's interpreter has run a kernel in a process, its compiler fails there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]


def ptxas_missing() -> str | None:
    """Why Triton's NVIDIA backend cannot assemble here (None if it can)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        get_ptxas_version(90)
    except Exception as exc:  # no NVIDIA backend, or its ptxas is missing or broken
        return f"Triton's ptxas is not usable here: {type(exc).__name__}: {exc}"
    return None


# About 70 specializations, ~0.5 s each to compile: Hopper (the GPUs measured) always, Ampere with --runslow.
@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_every_launched_kernel_compiles(arch, tmp_path):
    if ptxas_missing():
        pytest.skip(ptxas_missing())
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}  # compiled here, not found in a cache
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--check", str(arch)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "0 failures" in result.stdout, result.stdout
