"""save_upcycled / load_upcycled: round trips, and bad files that must leave the model untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cumo_layers import SparseMoEMLP, load_upcycled, save_upcycled, upcycle_model
from cumo_layers.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError


class Tower(nn.Module):
    """Two CLIP-style blocks (an MLP beside a non-MLP layer) and an output head tied to the input embedding."""

    def __init__(self, width: int = 16, hidden: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(width),
                           "mlp": nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))})
            for _ in range(2)
        )
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["mlp"](block["norm"](x))
        return self.head(x)


def upcycled_tower(seed: int = 0, **kw) -> Tower:
    torch.manual_seed(seed)
    model = upcycle_model(Tower(**kw), num_experts=4, top_k=2, balance_loss_coef=0.5)
    with torch.no_grad():  # experts that differ, as after training: a wrong expert order would show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


IDS = torch.randint(0, 10, (3, 7), generator=torch.Generator().manual_seed(1))


def test_round_trip_into_a_fresh_base(tmp_path):
    model = upcycled_tower()
    save_upcycled(model, tmp_path / "ckpt")
    loaded = load_upcycled(tmp_path / "ckpt", lambda: Tower()).eval()
    moes = {n: m for n, m in loaded.named_modules() if isinstance(m, SparseMoEMLP)}
    assert sorted(moes) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert moes["blocks.0.mlp"].router.balance_loss_coef == 0.5 and moes["blocks.0.mlp"].top_k == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.head.weight is loaded.embed.weight  # still tied
    torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)
    manifest = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert manifest["aliases"] == {"head.weight": "embed.weight"}


def test_round_trip_of_a_transformers_model_without_a_base(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = upcycle_model(transformers.CLIPVisionModel(config).eval(), num_experts=4, top_k=2, match=r"mlp$")
    base = {"architecture": "CLIPVisionModel", "config": config.to_dict()}
    save_upcycled(model, tmp_path / "clip", base=base)
    loaded = load_upcycled(tmp_path / "clip").eval()
    pixels = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(pixel_values=pixels).last_hidden_state,
                               model(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)


def test_a_loaded_transformers_model_saves_again_without_a_base(tmp_path):
    """save_upcycled records a transformers model's class and config by itself, so a checkpoint loaded without
    a base model saves to one that loads the same way (it used to drop the base and refuse to load)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = upcycle_model(transformers.CLIPVisionModel(config).eval(), num_experts=4, top_k=2, match=r"mlp$")
    save_upcycled(model, tmp_path / "clip")
    save_upcycled(load_upcycled(tmp_path / "clip"), tmp_path / "copy")
    copy = load_upcycled(tmp_path / "copy").eval()
    pixels = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(copy(pixel_values=pixels).last_hidden_state,
                               model(pixel_values=pixels).last_hidden_state, rtol=0, atol=0)


def test_saving_into_a_directory_keeps_its_other_files(tmp_path, monkeypatch):
    """A tokenizer or notes saved beside the weights survive a save (Hugging Face's save_pretrained writes into
    the directory too), also into the working directory itself, and nothing temporary is left."""
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "tokenizer.json").write_text("{}")
    save_upcycled(upcycled_tower(), directory)
    save_upcycled(upcycled_tower(seed=1), directory)
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"]
    torch.testing.assert_close(load_upcycled(directory, Tower()).embed.weight, upcycled_tower(seed=1).embed.weight)
    monkeypatch.chdir(directory)
    save_upcycled(upcycled_tower(seed=2), ".")
    assert Path.cwd() == directory and (directory / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"]


@pytest.mark.parametrize("failure", ["weights", "config"])
def test_a_save_that_fails_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """A failure while the weights are written (a full disk, an interrupt) or a manifest that is not JSON: the
    previous checkpoint loads as before and no temporary file is left."""
    import safetensors.torch

    model = upcycled_tower()
    save_upcycled(model, tmp_path / "ckpt")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "ckpt").iterdir())
    if failure == "weights":
        def interrupted(tensors, path, metadata=None):
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_upcycled(upcycled_tower(seed=1), tmp_path / "ckpt")
    else:
        with pytest.raises(TypeError, match="JSON serializable"):
            save_upcycled(upcycled_tower(seed=1), tmp_path / "ckpt", base={"architecture": object()})
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "ckpt").iterdir()) == before
    torch.testing.assert_close(load_upcycled(tmp_path / "ckpt", Tower())(IDS), model(IDS), rtol=0, atol=0)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    model = upcycled_tower()
    save_upcycled(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save_upcycled(model, tmp_path / "ckpt", overwrite=False)
    save_upcycled(upcycled_tower(seed=1), tmp_path / "ckpt")
    assert not torch.equal(load_upcycled(tmp_path / "ckpt", Tower()).embed.weight, model.embed.weight)


def test_a_model_without_moe_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no SparseMoEMLP"):
        save_upcycled(Tower(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def bad_json(path):
    path.parent.joinpath(CONFIG_NAME).write_text("{not json")


def other_dtype(model):
    return model.double()


@pytest.mark.parametrize("damage,target,match", [
    (truncate, WEIGHTS_NAME, "truncated or corrupt"),  # the write was cut off
    (corrupt_header, WEIGHTS_NAME, "truncated or corrupt"),  # bytes flipped in the header
    (bad_json, WEIGHTS_NAME, "not valid JSON"),  # the manifest is damaged
])
def test_damaged_files_leave_the_model_untouched(tmp_path, damage, target, match):
    save_upcycled(upcycled_tower(), tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / target)
    base = Tower()
    before = snapshot(base)
    with pytest.raises(CheckpointError, match=match):
        load_upcycled(tmp_path / "ckpt", base)
    assert not any(isinstance(m, SparseMoEMLP) for m in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("moe_modules"), "'moe_modules' must map module names to SparseMoEMLP settings, got NoneType"),
    (lambda m: m.update(moe_modules=["blocks.0.mlp"]), "'moe_modules' must map .* got list"),
    (lambda m: m.update(moe_modules={"blocks.0.mlp": 4}), "'moe_modules' must map .* got dict"),
    (lambda m: m.update(aliases=["head.weight"]), "'aliases' must map tensor names to tensor names, got list"),
])
def test_a_hand_edited_manifest_of_the_wrong_shape_is_refused(tmp_path, edit, match):
    """Valid JSON of the right format and version whose entries have the wrong types: a CheckpointError naming
    the entry (it was a KeyError or an AttributeError), the model untouched."""
    save_upcycled(upcycled_tower(), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / CONFIG_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    base = Tower()
    with pytest.raises(CheckpointError, match=match):
        load_upcycled(tmp_path / "ckpt", base)
    assert not any(isinstance(m, SparseMoEMLP) for m in base.modules())


@pytest.mark.parametrize("make_base,match", [
    (lambda: Tower(width=8), r"embed\.weight is \(10, 16\) torch\.float32, expected \(10, 8\)"),  # another size
    (lambda: Tower().double(), r"torch\.float32, expected \(10, 16\) torch\.float64"),  # another dtype
    (lambda: nn.Sequential(nn.Linear(16, 16)), "has no module 'blocks.0.mlp'"),  # another model
])
def test_a_base_that_does_not_fit_is_refused_untouched(tmp_path, make_base, match):
    save_upcycled(upcycled_tower(), tmp_path / "ckpt")
    base = make_base()
    before = snapshot(base)
    with pytest.raises(CheckpointError, match=match):
        load_upcycled(tmp_path / "ckpt", base)
    assert not any(isinstance(m, SparseMoEMLP) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
