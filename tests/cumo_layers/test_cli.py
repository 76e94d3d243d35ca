"""cumo-upcycle on tiny checkpoints saved to disk: the real loading path, good and bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cumo_layers import SparseMoEMLP, load_upcycled  # noqa: E402
from cumo_layers.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FP32_RTOL = 1e-5
LM = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


def tree_hash(directory: Path) -> str:
    """Names, bytes and modification times of every file under ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def saved(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def relative_error(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("config_class,moe_class", [
    ("LlamaConfig", "MixtralForCausalLM"),  # Llama -> native Mixtral
    ("Qwen2Config", "Qwen2MoeForCausalLM"),  # Qwen2 (qkv bias) -> native Qwen2-MoE
])
def test_causal_lm_becomes_a_native_moe_checkpoint(tmp_path, capsys, config_class, moe_class):
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**LM)).eval()
    source = saved(dense, tmp_path / "dense")
    before = tree_hash(source)
    code, out, err = run_cli(capsys, "--model", source, "--out", tmp_path / "moe", "--experts", 4, "--top-k", 2)
    assert code == 0, err
    assert "probe: max |upcycled - dense|" in out
    assert "upcycling layers" in err and "2/2" in err  # the progress bar over layers
    assert tree_hash(source) == before
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == moe_class
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(moe(input_ids=ids).logits, dense(input_ids=ids).logits) <= FP32_RTOL
    experts = moe.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape[0] == 4
    assert torch.equal(experts.down_proj[3], dense.model.layers[1].mlp.down_proj.weight)


def tiny_clip() -> transformers.CLIPVisionModel:
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(config).eval()


def test_clip_vision_becomes_a_cumo_checkpoint(tmp_path, capsys):
    dense = tiny_clip()
    source = saved(dense, tmp_path / "clip")
    before = tree_hash(source)
    code, out, err = run_cli(capsys, "--model", source, "--out", tmp_path / "moe", "--experts", 4, "--top-k", 2)
    assert code == 0, err
    assert "probe: max" in out and "3/3" in err
    assert tree_hash(source) == before
    moe = load_upcycled(tmp_path / "moe").eval()
    assert sum(isinstance(m, SparseMoEMLP) for m in moe.modules()) == 3
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = dense(pixel_values=pixels).last_hidden_state
        assert relative_error(moe(pixel_values=pixels).last_hidden_state, expected) <= FP32_RTOL


def test_match_and_dtype(tmp_path, capsys):
    source = saved(tiny_clip(), tmp_path / "clip")
    code, _, err = run_cli(capsys, "--model", source, "--out", tmp_path / "moe", "--match", r"layers\.[02]\.mlp$",
                           "--dtype", "bf16")
    assert code == 0, err
    moe = load_upcycled(tmp_path / "moe", lambda: tiny_clip().to(torch.bfloat16))
    names = [n for n, m in moe.named_modules() if isinstance(m, SparseMoEMLP)]
    assert names == ["encoder.layers.0.mlp", "encoder.layers.2.mlp"]
    assert moe.encoder.layers[0].mlp.w1.dtype == torch.bfloat16


def test_refuses_an_existing_destination_without_force(tmp_path, capsys):
    source = saved(tiny_clip(), tmp_path / "clip")
    destination = tmp_path / "moe"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--model", source, "--out", destination)
    assert code == 1 and "exists; pass --force" in err
    assert (destination / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "--model", source, "--out", destination, "--force")
    assert code == 0, err
    assert not (destination / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe.")]  # no staging left behind


class Marker:
    """Unpickling this creates a file: proof that a checkpoint was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def bad_source(kind: str, tmp_path: Path) -> Path:
    source = tmp_path / "src"
    if kind == "missing":
        return source
    source.mkdir()
    if kind == "not a checkpoint":
        (source / "notes.txt").write_text("hello")
    elif kind == "unsupported":
        (source / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(source / "model.safetensors"))
    elif kind == "pickle only":
        (source / "config.json").write_text(json.dumps({"model_type": "llama", **LM}))
        (source / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(tmp_path / "UNPICKLED")))
    elif kind == "truncated weights":
        saved(transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LM)), source)
        weights = source / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return source


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file or directory"),
    ("not a checkpoint", "is not a Hugging Face checkpoint: config.json is missing"),
    ("unsupported", "unsupported architecture 'bert' .* supported: llama .*mistral.*qwen2.*clip_vision_model.*llava"),
    ("pickle only", r"holds only pickle weights \(pytorch_model.bin\); they are never unpickled"),
    ("truncated weights", r"--model .*/src: a weights file is truncated or corrupt"),
])
def test_bad_inputs_get_one_line_and_a_nonzero_exit(tmp_path, capsys, kind, message):
    source = bad_source(kind, tmp_path)
    capsys.readouterr()  # what making the source printed
    code, out, err = run_cli(capsys, "--model", source, "--out", tmp_path / "out")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cumo-upcycle: error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "UNPICKLED").exists()


def test_python_dash_m_runs_the_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "cumo_layers.cli", "--model", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"cumo-upcycle: error: --model {tmp_path / 'nope'}: no such file or directory"]


def test_llava_projector_becomes_a_cumo_checkpoint(tmp_path, capsys):
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**LM),
                                      image_token_id=5)
    torch.manual_seed(0)
    dense = transformers.LlavaForConditionalGeneration(config).eval()
    source = saved(dense, tmp_path / "llava")
    before = tree_hash(source)
    code, out, err = run_cli(capsys, "--model", source, "--out", tmp_path / "moe", "--experts", 4, "--top-k", 2)
    assert code == 0, err
    assert "probe: max" in out and tree_hash(source) == before
    moe = load_upcycled(tmp_path / "moe").eval()
    names = [n for n, m in moe.named_modules() if isinstance(m, SparseMoEMLP)]
    assert len(names) == 1 and names[0].endswith("multi_modal_projector")
    features = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = dense.get_submodule(names[0])(features)
        assert relative_error(moe.get_submodule(names[0])(features), expected) <= FP32_RTOL
