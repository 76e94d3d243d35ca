"""Tests of cumo_layers/models/recipe.py and train.py: stage freezing, resumable stages, the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil

import pytest
import torch

from cumo_layers import SparseMoEMLP
from cumo_layers.models import CuMoModel, data, recipe, train

TINY = ["--steps", "stage1=2", "--steps", "stage2=2", "--steps", "stage3=2", "--train-size", "16",
        "--heldout-size", "8", "--batch-size", "4", "--no-progress"]


def built(tower_dirs) -> CuMoModel:
    vision, language = tower_dirs("llama")
    return CuMoModel.from_pretrained_parts(vision, language, image_token_id=data.IMAGE_ID)


def grads_after_one_step(model: CuMoModel) -> dict[str, bool]:
    model.train()
    model(**data.make_split(4, seed=3).batch(torch.arange(4))).loss.backward()
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()}


@pytest.mark.parametrize("stage", recipe.STAGES, ids=lambda s: s.name)
def test_stage_trains_exactly_its_parts(tower_dirs, stage):
    config = recipe.RecipeConfig(backend="torch")
    model = recipe.prepare(built(tower_dirs), stage, config)
    grads = grads_after_one_step(model)
    layers = model.vision_tower.config.num_hidden_layers
    # CLIP's last layer and post-layernorm feed only the CLS head, whose output the model discards; once
    # the layer is an MoE, its router's aux loss reaches everything before the router (not the experts).
    last = f"vision_tower.encoder.layers.{layers - 1}."
    unused = (last + "mlp.w", last + "mlp.b") if stage.upcycle_vision else (last,)
    for name, has_grad in grads.items():
        part = name.split(".")[0]
        trainable = part in stage.trainable
        assert model.get_parameter(name).requires_grad == trainable, name
        if not trainable:
            assert not has_grad, f"{stage.name}: frozen {name} got a gradient"
        elif name.startswith(unused + ("vision_tower.post_layernorm.",)):
            assert not has_grad, name
        else:
            assert has_grad, f"{stage.name}: {name} got no gradient"
    moe_blocks = [n for n, m in model.named_modules() if isinstance(m, SparseMoEMLP)]
    assert len(moe_blocks) == (layers + 1 if stage.upcycles else 0)
    if stage.upcycles:  # the last CLIP layer's router still learns, from the aux loss alone (as in CuMo)
        assert grads[f"vision_tower.encoder.layers.{layers - 1}.mlp.router.weight"]
        assert model.connector.router.balance_loss == "cumo"


def test_ablation_variants(tower_dirs):
    config = recipe.RecipeConfig(backend="torch")
    variants = dict((stage.name, stage) for _, stage in recipe.ABLATION)
    dense = recipe.prepare(built(tower_dirs), variants["ablation-dense"], config)
    assert dense.moe is None
    mlp_moe = recipe.prepare(built(tower_dirs), variants["ablation-mlp-moe"], config)
    assert mlp_moe.moe["connector"] and not mlp_moe.moe["vision"]
    assert (mlp_moe.balance_coef, mlp_moe.z_coef) == (0.0, 0.0)
    mlp_moe.train()
    output = mlp_moe(**data.make_split(4, seed=3).batch(torch.arange(4)))
    torch.testing.assert_close(output.loss, output.ce_loss)  # no bzloss in this row
    assert variants["stage3"] is recipe.STAGES[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The three stages and the two ablation runs, a few steps each: (run directory, histories, stdout lines)."""
    out = tmp_path_factory.mktemp("recipe") / "run"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        histories = train.main(["--out", str(out), *TINY, "--ablation"])
    return out, histories, capture.getvalue().splitlines()


def test_the_three_stages_run_and_write_their_checkpoints(tiny_run):
    out, histories, printed = tiny_run
    assert list(histories) == ["stage1", "stage2", "stage3", "ablation-dense", "ablation-mlp-moe"]
    for name, history in histories.items():
        assert len(history["loss"]) == 2 and 0.0 <= history["heldout"]["accuracy"] <= 1.0
        assert (out / name / "model" / "model.safetensors").is_file()
    assert histories["stage1"]["moe"] is None and histories["stage3"]["moe"]["vision"]
    assert set(histories["stage3"]["aux_losses"]) == {"vision_balance", "vision_z", "connector_balance", "connector_z"}
    assert len(histories["stage3"]["expert_load"]["connector"]) == 2
    assert CuMoModel.from_pretrained(out / "stage3" / "model").moe["options"]["balance_loss"] == "cumo"
    assert (out / "recipe.png").stat().st_size > 0
    assert any("held-out accuracy" in line for line in printed) and not any("skipped" in line for line in printed)


def test_ablation_table(tiny_run):
    _, histories, printed = tiny_run
    table = [line for line in printed if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == [label for label, _ in recipe.ABLATION]
    assert histories["ablation-dense"]["moe"] is None and not histories["ablation-mlp-moe"]["moe"]["vision"]


def test_a_rerun_skips_finished_stages_and_refuses_other_settings(tiny_run, capsys):
    out, histories, _ = tiny_run
    stage2_weights = (out / "stage2" / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "stage3")  # as if the run had been interrupted in stage 3
    again = train.main(["--out", str(out), *TINY])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed if "skipped" in line] == ["stage1", "stage2"]
    assert (out / "stage2" / "model" / "model.safetensors").read_bytes() == stage2_weights
    assert again["stage1"] == json.loads(json.dumps(histories["stage1"]))
    assert again["stage3"]["loss"] == histories["stage3"]["loss"]  # same seed, same start: same run
    with pytest.raises(SystemExit, match="other settings"):
        train.main(["--out", str(out), *TINY, "--seed", "1"])


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    config = recipe.RecipeConfig(out=str(tmp_path / "whole"), steps={"stage1": 1, "stage2": 1, "stage3": 6},
                                 train_size=16, heldout_size=4, batch_size=4, checkpoint_every=2)
    splits = recipe.make_splits(config)
    for stage in recipe.STAGES[:2]:
        recipe.run_stage(stage, config, splits, progress=False)
    shutil.copytree(tmp_path / "whole", tmp_path / "interrupted")
    whole, _ = recipe.run_stage(recipe.STAGES[2], config, splits, progress=False)

    interrupted = dataclasses.replace(config, out=str(tmp_path / "interrupted"))
    forward, calls = CuMoModel.forward, []

    def crash_in_step_five(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CuMoModel, "forward", crash_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        recipe.run_stage(recipe.STAGES[2], interrupted, splits, progress=False)
    partial = tmp_path / "interrupted" / "stage3.partial"
    assert not (tmp_path / "interrupted" / "stage3").exists()
    assert len(json.loads((partial / "state" / "config.json").read_text())["history"]["loss"]) == 4

    training_steps = []

    def count_training_steps(self, *args, **kwargs):
        training_steps.extend([1] if self.training else [])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CuMoModel, "forward", count_training_steps)
    resumed, skipped = recipe.run_stage(recipe.STAGES[2], interrupted, splits, progress=False)
    assert len(training_steps) == 2  # steps 5 and 6 only
    assert not skipped and not partial.exists()
    assert resumed["loss"] == whole["loss"] and resumed["expert_load"] == whole["expert_load"]
    assert resumed["heldout"] == whole["heldout"]


def test_cli_help_and_bad_settings(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    assert "--ablation" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["--steps", "stage4=3"])
    assert "STAGE=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="must all be > 0"):
        train.main(["--out", str(tmp_path), "--lr", "stage2=0"])
    config = tmp_path / "recipe.json"
    config.write_text('{"learning_rate": 1e-3}')
    with pytest.raises(SystemExit, match="unknown recipe settings"):
        train.main(["--config", str(config)])


def test_warmup_cosine_schedule():
    factor = recipe.warmup_cosine(100)
    values = [factor(step) for step in range(100)]
    assert values[0] == pytest.approx(1 / 3) and values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:])) and values[-1] < 0.01
