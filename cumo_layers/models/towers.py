"""Tiny random-init towers for the recipe and the tests, written with ``save_pretrained`` first so that
``CuMoModel.from_pretrained_parts`` runs the same loading path as for CLIP ViT-L and Mistral-7B."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cumo_layers.checkpoint import atomic_directory
from cumo_layers.models import data

VISION_WIDTH = 64
VISION_LAYERS = 3
LANGUAGE_WIDTH = 64
LANGUAGE_LAYERS = 2
PATCH_SIZE = 8


def tiny_clip_config(width: int = VISION_WIDTH, layers: int = VISION_LAYERS, image_size: int = data.IMAGE_SIZE):
    """A CLIPVisionConfig with ViT-L's structure (quick_gelu MLPs of 4x width) at toy size."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=PATCH_SIZE, hidden_act="quick_gelu",
    )


def tiny_language_config(model_type: str = "llama", width: int = LANGUAGE_WIDTH, layers: int = LANGUAGE_LAYERS,
                         vocab_size: int = len(data.VOCAB)):
    """A Llama, Mistral or Qwen2 config at toy size (the task's vocabulary and special ids)."""
    from transformers import AutoConfig

    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type must be 'llama', 'mistral' or 'qwen2', got {model_type!r}")
    return AutoConfig.for_model(
        model_type, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
        bos_token_id=data.BOS_ID, eos_token_id=data.EOS_ID, pad_token_id=data.PAD_ID, tie_word_embeddings=False,
    )


def save_tiny_towers(directory: str | os.PathLike, seed: int = 0, model_type: str = "llama") -> tuple[Path, Path]:
    """Build both towers from configs (random init, ``seed``) and save them under ``directory``;
    returns (vision_dir, language_dir). Each is written atomically; existing ones are kept (a
    rerun of the recipe starts from the same towers)."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    directory = Path(directory)
    vision_dir, language_dir = directory / "clip-vision", directory / f"tiny-{model_type}"
    torch.manual_seed(seed)
    if not vision_dir.is_dir():
        with atomic_directory(vision_dir) as staging:
            CLIPVisionModel(tiny_clip_config()).save_pretrained(staging)
    if not language_dir.is_dir():
        with atomic_directory(language_dir) as staging:
            AutoModelForCausalLM.from_config(tiny_language_config(model_type)).save_pretrained(staging)
    return vision_dir, language_dir
