"""Tiny towers saved once per session, so every model test runs the real loading path."""

import pytest

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
