"""Shared test options, markers and the per-dtype tolerance table."""

import os

import pytest
import torch

# Relative tolerances per dtype (STYLE.md): fp64 1e-10, fp32 1e-5, fp16/bf16 ~1e-2.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh but reproducible random inputs for every test."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("CUMO_RANDOM_SEED") else 0)
    yield
