"""Tile tables of the Triton kernels (moe_kernels/triton/tiles.py): the static default, tuned tables per
GPU model, and the checks a tuned table must pass before any launch reads it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_kernels.triton import tiles

GOOD = {
    "device": "Fake GPU 9000",
    "gemm": [[32, 32, 128, 64, 4, 3], [None, 128, 256, 64, 8, 3]],
    "weight_grad": [[None, 64, 128, 64, 8, 4]],
}


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A tuned/ directory of our own, a GPU model name for device 0, and no cached tables."""
    monkeypatch.setattr(tiles, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    tiles.reload_tables()
    yield tmp_path
    tiles.reload_tables()


def test_a_tuned_table_replaces_the_static_one_for_its_gpu_model(tuned_dir):
    (tuned_dir / "fake_gpu_9000.json").write_text(json.dumps(GOOD))
    assert tiles.tuned_name("Fake GPU 9000") == "fake_gpu_9000"
    config = tiles.gemm_config(20, torch.bfloat16, glu=False, device=0)
    assert (config["BLOCK_M"], config["BLOCK_N"], config["num_warps"]) == (32, 128, 4)
    config = tiles.gemm_config(1000, torch.bfloat16, glu=True, device=0)
    assert (config["BLOCK_M"], config["BLOCK_N"]) == (128, 64)  # GLU keeps two accumulators: N capped at 64
    assert tiles.weight_grad_config(5, torch.bfloat16, device=0)["BLOCK_Q"] == 128
    # No GPU (device -1) or a model without a table: the static table.
    assert tiles.gemm_config(1000, torch.bfloat16, glu=False) == tiles.gemm_config(1000, torch.bfloat16, False, -1)
    assert tiles.gemm_config(1000, torch.bfloat16, glu=False)["BLOCK_N"] == tiles.GEMM_TABLE[-1][2]


def test_a_tuned_table_may_hold_one_gemm_table_per_epilogue(tuned_dir):
    """Each epilogue's GEMMs (fc2 and the input-gradient rows; fc1; the d pre-activation) launch with their own
    table's tiles; the names follow grouped_gemm_kernel's EPILOGUE codes."""
    from moe_kernels.triton import expert_launches as ex

    codes = (ex.EPILOGUE_PLAIN, ex.EPILOGUE_ACTIVATION, ex.EPILOGUE_ACTIVATION_GRAD)
    assert [tiles.EPILOGUES[code] for code in codes] == ["plain", "activation", "activation_grad"]
    per_epilogue = {"plain": [[None, 128, 256, 64, 8, 3]], "activation": [[None, 64, 128, 64, 4, 4]],
                    "activation_grad": [[16, 16, 64, 128, 4, 4], [None, 128, 64, 64, 8, 3]]}
    (tuned_dir / "fake_gpu_9000.json").write_text(json.dumps({**GOOD, "gemm": per_epilogue}))
    configs = [tiles.gemm_config(1000, torch.bfloat16, False, 0, code) for code in codes]
    tiles_read = [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in configs]
    assert tiles_read == [(128, 256, 8), (64, 128, 4), (128, 64, 8)]
    assert tiles.gemm_config(2, torch.bfloat16, False, 0, ex.EPILOGUE_ACTIVATION_GRAD)["BLOCK_M"] == 16
    for broken, message in (({k: v for k, v in per_epilogue.items() if k != "plain"}, "one table per epilogue"),
                            ({**per_epilogue, "activation": [[16, 16, 64, 64, 4, 4]]}, "gemm.activation")):
        tiles.reload_tables()
        (tuned_dir / "fake_gpu_9000.json").write_text(json.dumps({**GOOD, "gemm": broken}))
        with pytest.raises(ValueError, match=message):
            tiles.gemm_config(20, torch.bfloat16, glu=False, device=0)


def test_without_a_tuned_table_the_static_one_applies(tuned_dir):
    assert tiles.tables_for(0) == (tiles.GEMM_TABLE, tiles.WEIGHT_GRAD_TABLE)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("gemm"), "gemm"),
    (lambda t: t.update(gemm=[[64, 32, 128, 64, 4, 3], [32, 64, 128, 64, 4, 3], [None, 64, 64, 64, 4, 3]]),
     "must increase"),
    (lambda t: t.update(gemm=[[32, 32, 128, 64, 4, 3]]), "last row must have no bound"),
    (lambda t: t.update(gemm=[[None, 48, 128, 64, 4, 3]]), "powers of two"),
    (lambda t: t.update(gemm=[[None, 8, 128, 64, 4, 3]]), "powers of two"),
    (lambda t: t.update(gemm=[[None, 32, 128, 64, 3, 3]]), "warps"),
    (lambda t: t.update(gemm=[[None, 32, 128, 64, 4]]), "expected"),
    (lambda t: t.update(weight_grad=[[None, 64.0, 128, 64, 8, 4]]), "must be ints"),
    (lambda t: t.update(weight_grad=[]), "non-empty"),
])
def test_a_malformed_tuned_table_is_refused_naming_file_and_entry(tuned_dir, change, message):
    table = json.loads(json.dumps(GOOD))
    change(table)
    path = tuned_dir / "fake_gpu_9000.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message) as info:
        tiles.gemm_config(20, torch.bfloat16, glu=False, device=0)
    assert str(path) in str(info.value)


def test_a_file_that_is_not_json_is_refused(tuned_dir):
    (tuned_dir / "fake_gpu_9000.json").write_text("{not json")
    with pytest.raises(ValueError, match="fake_gpu_9000.json"):
        tiles.tables_for(0)


def test_every_shipped_tuned_table_loads():
    for path in sorted(tiles.TUNED_DIR.glob("*.json")):
        gemm, weight_grad = tiles.load_tables(path)
        for table in (*(gemm.values() if isinstance(gemm, dict) else [gemm]), weight_grad):
            assert table[-1][0] == math.inf, path


@pytest.mark.parametrize("rows_per_expert", [0.1, 1, 16, 17, 64, 65, 4096, 10**6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("glu", [False, True])
def test_tile_table_covers_every_row_count(rows_per_expert, dtype, glu):
    pytest.importorskip("triton")
    from moe_kernels.triton import runtime

    gemm = tiles.gemm_config(rows_per_expert, dtype, glu)
    grad = tiles.weight_grad_config(rows_per_expert, dtype)
    for config in (gemm, grad):
        for name, value in config.items():
            if name.startswith("BLOCK"):
                assert value >= 16 and value & (value - 1) == 0, (name, value)  # tl.dot needs >= 16
    assert (gemm["BLOCK_M"] <= 32) == (rows_per_expert <= 64)  # thin tiles exactly where experts see few rows
    assert not any("autotune" in Path(module.__file__).read_text() for module in (runtime, tiles))


def test_launches_built_before_a_table_is_installed_are_rebuilt_after_reload(tuned_dir):
    """The launchers keep each shape's Launch (runtime.shape_cache); reload_tables drops those with the
    tables, so a newly installed tuned table reaches the very next launch."""
    pytest.importorskip("triton")
    from moe_kernels.triton.expert_launches import gemm_launch

    def gemm_tiles():  # 20 rows per expert, bf16, no GLU, on (fake) device 0
        meta = gemm_launch(160, 64, 32, 8, (32, 1, 2048, 1, 32, 0, 64, 1, 64, 1), 2, True, False, False, 0,
                           (0, False, 0.0, 0.0), "gelu", False, torch.bfloat16, 0, False, False).constexprs
        return meta["BLOCK_M"], meta["BLOCK_N"]

    static = gemm_tiles()
    (tuned_dir / "fake_gpu_9000.json").write_text(json.dumps(GOOD))
    assert gemm_tiles() == static  # cached until the tables are reloaded
    tiles.reload_tables()
    assert gemm_tiles() == (32, 128) != static
