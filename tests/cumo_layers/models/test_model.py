"""Tests of cumo_layers/models/model.py: CuMoModel against transformers, upcycling, checkpoints, aux losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, CLIPVisionModel

from cumo_layers import SparseMoEMLP
from cumo_layers.checkpoint import WEIGHTS_NAME, CheckpointError, read_tensors
from cumo_layers.models import CuMoModel, data
from tests import helpers

RTOL = helpers.RTOL[torch.float32]


def build(tower_dirs, model_type="llama", **options) -> CuMoModel:
    vision, language = tower_dirs(model_type)
    return CuMoModel.from_pretrained_parts(vision, language, image_token_id=data.IMAGE_ID, **options)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def batch(count=4, seed=1):
    return data.make_split(count, seed).batch(torch.arange(count))


def perturb(model: torch.nn.Module) -> None:
    """Move every weight off its init (a round trip of an untouched model would hide swapped tensors)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))


def test_vision_features_are_clip_penultimate_patch_tokens(tower_dirs):
    model = build(tower_dirs).eval()
    clip = CLIPVisionModel.from_pretrained(tower_dirs("llama")[0]).eval()
    pixels = torch.randn(3, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    with torch.no_grad():
        expected = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = model.encode_images(pixels, project=False)
        tokens = model.encode_images(pixels)
    assert features.shape == (3, (data.IMAGE_SIZE // 8) ** 2, clip.config.hidden_size)
    torch.testing.assert_close(features, expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(tokens, model.connector(features), rtol=RTOL, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_text_logits_equal_transformers(tower_dirs, model_type):
    model = build(tower_dirs, model_type).eval()
    reference = AutoModelForCausalLM.from_pretrained(tower_dirs(model_type)[1]).eval()
    ids = torch.randint(0, len(data.VOCAB), (2, 9))
    ids[ids == data.IMAGE_ID] = data.BOS_ID
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(ids).logits, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("placeholder", [3, None])  # in the middle of the text; absent: image goes first
def test_image_tokens_replace_the_placeholder(tower_dirs, placeholder):
    model = build(tower_dirs).eval()
    ids = torch.randint(4, len(data.VOCAB), (2, 7))
    if placeholder is not None:
        ids[:, placeholder] = data.IMAGE_ID
    pixels = torch.randn(2, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    embed = model.language_model.get_input_embeddings()
    with torch.no_grad():
        image = model.encode_images(pixels)
        cut = 0 if placeholder is None else placeholder
        after = 0 if placeholder is None else placeholder + 1
        embeds = torch.cat([embed(ids[:, :cut]), image, embed(ids[:, after:])], dim=1)
        expected = model.language_model(inputs_embeds=embeds).logits
        actual = model(pixel_values=pixels, input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-6)


def test_loss_is_cross_entropy_on_labelled_text_positions(tower_dirs):
    model = build(tower_dirs).eval()
    inputs = batch()
    with torch.no_grad():
        output = model(**inputs)
    n_image = model.encode_images(inputs["pixel_values"]).shape[1]
    # Undo the splice by hand: image tokens sit where the placeholder was (position 1 of every sample).
    labels = torch.cat([inputs["labels"][:, :1], torch.full((4, n_image), -100), inputs["labels"][:, 2:]], dim=1)
    expected = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert output.aux_losses == {} and output.aux_loss is None
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize("parts, s2_scales", [
    ({}, (1,)),  # CuMo: CLIP-MoE + MLP-MoE
    ({"vision": False}, (1,)),  # MLP-MoE only
    ({"language": True}, (1,)),  # the LM's GLU MLPs too
    ({}, (1, 2)),  # S2: the tower runs on the 1x image and the 2x crops
])
def test_upcycle_leaves_the_output_unchanged(tower_dirs, parts, s2_scales):
    model = build(tower_dirs, s2_scales=s2_scales)
    perturb(model)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        dense = model(**inputs).logits
        model.upcycle(num_experts=4, top_k=2, **parts)
        moe = model(**inputs).logits
    blocks = [name for name, m in model.named_modules() if isinstance(m, SparseMoEMLP)]
    vision_layers = model.vision_tower.config.num_hidden_layers
    language_layers = model.language_model.config.num_hidden_layers
    expected = vision_layers * parts.get("vision", True) + 1 + language_layers * parts.get("language", False)
    assert len(blocks) == expected, blocks
    assert relative_error(moe, dense) < RTOL


def test_upcycle_twice_or_of_nothing_is_refused(tower_dirs):
    model = build(tower_dirs)
    with pytest.raises(ValueError, match="at least one"):
        model.upcycle(vision=False, connector=False)
    model.upcycle()
    with pytest.raises(RuntimeError, match="already upcycled"):
        model.upcycle()


@pytest.mark.parametrize("upcycled", [False, True])
def test_checkpoint_round_trip(tower_dirs, tmp_path, upcycled):
    model = build(tower_dirs, s2_scales=(1, 2))
    if upcycled:
        model.upcycle(balance_loss="cumo")
    perturb(model)  # routers included: they are saved, not re-drawn
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CuMoModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.moe == model.moe and loaded.s2_scales == (1, 2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)


def test_corrupt_or_partial_checkpoints_raise_clear_errors(tower_dirs, tmp_path):
    model = build(tower_dirs).upcycle()
    path = model.save_pretrained(tmp_path / "ckpt")
    weights = path / WEIGHTS_NAME
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        CuMoModel.from_pretrained(path)

    from safetensors.torch import save_file

    weights.write_bytes(good)
    tensors = read_tensors(path)
    del tensors["connector.router.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="missing tensors.*connector.router.weight"):
        CuMoModel.from_pretrained(path)

    dense_dir = build(tower_dirs).save_pretrained(tmp_path / "dense")
    (path / "config.json").write_text((dense_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing tensors"):
        CuMoModel.from_pretrained(path)  # a dense config beside MoE tensors

    (path / "config.json").write_text('{"format": "cumo-model", "version": 2}')
    with pytest.raises(CheckpointError, match="version 2; this code reads versions up to 1"):
        CuMoModel.from_pretrained(path)
    (path / "config.json").write_text('{"format": "cumo-model", "version": 1}')
    with pytest.raises(CheckpointError, match="does not describe a CuMo model"):
        CuMoModel.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        CuMoModel.from_pretrained(path)


def test_an_interrupted_save_keeps_the_old_checkpoint(tower_dirs, tmp_path, monkeypatch):
    model = build(tower_dirs)
    path = model.save_pretrained(tmp_path / "ckpt")
    before = (path / WEIGHTS_NAME).read_bytes()
    model.upcycle()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert CuMoModel.from_pretrained(path).moe is None


def capture_router_losses(model: CuMoModel) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per tower, every router call's (balance, z) in the next forward, read by forward hooks."""
    captured = {"vision": [], "connector": []}
    for tower, module in (("vision", model.vision_tower), ("connector", model.connector)):
        for block in module.modules():
            if isinstance(block, SparseMoEMLP):
                block.router.register_forward_hook(
                    lambda router, args, out, tower=tower: captured[tower].append(
                        (router.last_balance_loss.detach(), router.last_z_loss.detach())))
    return captured


def test_bzloss_is_averaged_per_tower_over_layers_and_scales(tower_dirs):
    model = build(tower_dirs, s2_scales=(1, 2)).upcycle(balance_loss="cumo", backend="torch")  # the averaging is the same on every backend
    captured = capture_router_losses(model)
    connector_inputs = []
    model.connector.register_forward_hook(lambda module, args, out: connector_inputs.append(args[0].detach()))
    model.train()
    output = model(**batch())
    assert len(captured["vision"]) == 2 * model.vision_tower.config.num_hidden_layers  # two S2 scales
    expected = {}
    for tower, values in captured.items():
        expected[f"{tower}_balance"] = torch.stack([b for b, _ in values]).mean()
        expected[f"{tower}_z"] = torch.stack([z for _, z in values]).mean()
    assert set(output.aux_losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(output.aux_losses[name].detach(), value, msg=name)
    weighted = 0.1 * (expected["vision_balance"] + expected["connector_balance"]) + 0.01 * (
        expected["vision_z"] + expected["connector_z"])
    torch.testing.assert_close(output.loss.detach(), output.ce_loss.detach() + weighted)

    # CuMo's balance by hand for the connector: per sample E * sum_e f_e P_e (f_e: top-1 share), mean over samples.
    (features,) = connector_inputs
    probs = torch.softmax(features @ model.connector.router.weight.detach().T, dim=-1)  # [B, N, E]
    share = F.one_hot(probs.argmax(dim=-1), 4).float().mean(dim=1)
    by_hand = (4 * (share * probs.mean(dim=1)).sum(dim=-1)).mean()
    torch.testing.assert_close(output.aux_losses["connector_balance"].detach(), by_hand)


def naive_greedy(model: CuMoModel, pixels, prompt: list[int], steps: int) -> list[int]:
    """One sample, no cache, no padding: the whole sequence is re-run for every token."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(pixel_values=pixels[None], input_ids=torch.tensor([tokens])).logits
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == data.EOS_ID:
            break
    return tokens[len(prompt):]


def test_generate_is_greedy_decoding_with_the_cache(tower_dirs):
    model = build(tower_dirs)
    perturb(model)
    split = data.make_split(3, seed=5)  # questions of different lengths: left padding in generate
    model.train()
    generated = model.generate(split.images, split.prompt_ids, split.prompt_mask, max_new_tokens=5)
    assert model.training and generated.dtype == torch.int64 and generated.shape[0] == 3
    model.eval()
    with torch.no_grad():
        for i in range(3):
            prompt = split.prompt_ids[i][split.prompt_mask[i].bool()].tolist()
            expected = naive_greedy(model, split.images[i], prompt, 5)
            assert generated[i, : len(expected)].tolist() == expected


def test_generate_without_an_image_is_the_language_model_alone(tower_dirs):
    model = build(tower_dirs).eval()
    perturb(model)
    prompt = torch.tensor([[data.BOS_ID] + data.encode("what colour is the square ?")])
    generated = model.generate(None, prompt, max_new_tokens=4, eos_token_id=data.EOS_ID)
    tokens = prompt
    with torch.no_grad():
        for _ in range(generated.shape[1]):
            next_token = model.language_model(tokens).logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert generated.tolist() == tokens[:, prompt.shape[1]:].tolist()


def test_bad_inputs_are_refused(tower_dirs):
    model = build(tower_dirs)
    inputs = batch(2)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(**{**inputs, "pixel_values": torch.randn(2, 3, 16, 16)})
    two = inputs["input_ids"].clone()
    two[:, 3] = data.IMAGE_ID
    with pytest.raises(ValueError, match="2 <image> placeholders"):
        model(**{**inputs, "input_ids": two})
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="labels"):
        model(**{**inputs, "labels": inputs["labels"][:, :3]})
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CuMoModel.from_pretrained_parts("/nonexistent/clip", tower_dirs("llama")[1])


def test_set_trainable(tower_dirs):
    model = build(tower_dirs)
    model.set_trainable(["connector"])
    assert all(p.requires_grad for p in model.connector.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    with pytest.raises(ValueError, match="unknown parts"):
        model.set_trainable(["projector"])


def test_tied_embeddings_round_trip(tower_dirs, tmp_path):
    """Qwen2-style LMs tie lm_head to the input embeddings: saved once, tied again after loading."""
    from cumo_layers.models import towers

    config = towers.tiny_language_config("qwen2")
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied-lm")
    model = CuMoModel.from_pretrained_parts(tower_dirs("llama")[0], tmp_path / "tied-lm", image_token_id=data.IMAGE_ID)
    assert model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight
    perturb(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert "language_model.lm_head.weight" not in read_tensors(tmp_path / "ckpt")
    loaded = CuMoModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.language_model.lm_head.weight is loaded.language_model.get_input_embeddings().weight
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)
