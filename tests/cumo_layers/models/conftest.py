"""Tiny towers saved once per session, so every model test runs the real loading path."""

import pytest
import torch

pytest.importorskip("transformers")

from cumo_layers.models import towers  # noqa: E402


@pytest.fixture(scope="session")
def tower_dirs(tmp_path_factory):
    """model_type -> (vision_dir, language_dir) of tiny random-init towers on disk, built on first use."""
    root = tmp_path_factory.mktemp("towers")
    built = {}

    def get(model_type: str = "llama"):
        if model_type not in built:
            built[model_type] = towers.save_tiny_towers(root, seed=0, model_type=model_type)
        return built[model_type]

    return get


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are 64 wide: a second thread gains little, and on a busy machine it makes every op
    wait for a free core (ten times slower). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
