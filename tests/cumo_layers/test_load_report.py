"""Expert-load report of a whole upcycled model: per-layer counts and the heatmap file."""

from __future__ import annotations

import pytest
import torch

from cumo_layers import SparseMoEMLP
from cumo_layers.load_report import record_expert_load
from tests.cumo_layers.test_serialization import IDS, Tower, upcycled_tower


def test_counts_sum_over_forwards_and_match_each_layer():
    model = upcycled_tower()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseMoEMLP)}
    expected = {name: torch.zeros(4, dtype=torch.int64) for name in layers}
    with record_expert_load(model) as report:
        for seed in range(3):
            ids = torch.randint(0, 10, (2, 5 + seed), generator=torch.Generator().manual_seed(seed))
            model(ids)
            for name, layer in layers.items():
                expected[name] += layer.last_expert_load.to(torch.int64)
    assert list(report.counts) == ["blocks.0.mlp", "blocks.1.mlp"]
    for name in layers:
        assert torch.equal(report.counts[name], expected[name])
        assert int(report.counts[name].sum()) == 2 * (5 + 6 + 7) * 2  # tokens x top_k
        assert report.forwards[name] == 3
    shares = report.shares()["blocks.0.mlp"]
    assert abs(float(shares.sum()) - 1.0) < 1e-12
    assert 1.0 <= report.imbalance()["blocks.0.mlp"] <= 4.0
    assert "blocks.1.mlp" in report.table()
    model(IDS)  # hooks are gone after the block
    assert report.forwards["blocks.0.mlp"] == 3


def test_heatmap_is_written(tmp_path):
    model = upcycled_tower()
    with record_expert_load(model) as report:
        model(IDS)
    path = report.heatmap(tmp_path / "plots" / "load.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_a_model_without_moe_is_refused():
    with pytest.raises(ValueError, match="no MoE layer"):
        with record_expert_load(Tower()):
            pass
