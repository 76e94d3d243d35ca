"""CuMoModel: CLIP vision tower -> MLP connector -> causal LM, LLaVA-style, co-upcyclable to CuMo.

The thin reference model of CuMo (arXiv 2405.05949; DESIGN.md, "CuMo as its released code does it").
Images are encoded by a transformers ``CLIPVisionModel`` (penultimate layer, CLS dropped, optional S2
scales), projected by the LLaVA ``mlp2x_gelu`` connector ``Sequential(Linear(vision, llm), GELU,
Linear(llm, llm))`` into the LM's embedding space, and spliced into the text where the ``<image>``
placeholder id stands. ``upcycle`` turns the vision MLPs and the connector (and optionally the LM's
MLPs) into ``SparseMoEMLP`` blocks whose experts are copies of the dense ones: the output is unchanged
until training moves them apart. A checkpoint is one directory (safetensors + JSON, written atomically
by ``cumo_layers.checkpoint``) holding all three parts and the MoE settings.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cumo_layers.checkpoint import CheckpointError, check_tensors_match, read_config, read_tensors, write_checkpoint
from cumo_layers.models.aux import DEFAULT_BALANCE_COEF, DEFAULT_Z_COEF, TowerLosses, weighted_aux_loss
from cumo_layers.models.merge import IGNORE_INDEX, Merged, merge_image_tokens
from cumo_layers.models.vision import multiscale_patch_tokens, penultimate_patch_tokens
from cumo_layers.moe import SparseMoEMLP
from cumo_layers.upcycle import upcycle, upcycle_model

CONFIG_FORMAT = "cumo-model"
CONFIG_VERSION = 1
IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: outside every vocabulary, never embedded
# The MLP of every transformer block: CLIP's encoder.layers.i.mlp and Llama/Mistral/Qwen2's model.layers.i.mlp.
BLOCK_MLP = r"layers\.\d+\.mlp$"
PARTS = ("vision_tower", "connector", "language_model")


@dataclass
class CuMoOutput:
    """logits: [B, L', vocab] (L' = text + image tokens); with labels, loss = ce_loss + aux_loss.

    aux_losses: the unweighted per-tower averages (``vision_balance``, ``vision_z``,
    ``connector_balance``, ...) of the MoE towers, after a training forward; aux_loss their weighted sum.
    """

    logits: Tensor
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


def mlp2x_gelu(in_features: int, out_features: int) -> nn.Sequential:
    """LLaVA's connector: [..., in_features] -> [..., out_features]."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


class CuMoModel(nn.Module):
    """vision_tower: transformers CLIPVisionModel; language_model: a transformers causal LM
    (Llama, Mistral, Qwen2, ...); the connector is built here.

    image_token_id: the placeholder in input_ids that one image's tokens replace.
    s2_scales: (1,) for plain features; CuMo's (1, 3) concatenates 1x and pooled 3x features.
    balance_coef, z_coef: weights of the per-tower averaged router losses (CuMo: 0.1, 0.01).
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        language_model: nn.Module,
        image_token_id: int = IMAGE_TOKEN_ID,
        s2_scales: Sequence[int] = (1,),
        balance_coef: float = DEFAULT_BALANCE_COEF,
        z_coef: float = DEFAULT_Z_COEF,
    ) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        if not isinstance(vision_tower, CLIPVisionModel):
            raise TypeError(f"vision_tower must be a transformers CLIPVisionModel, got {type(vision_tower).__name__}")
        if not hasattr(language_model, "get_input_embeddings"):
            raise TypeError(f"language_model must be a transformers causal LM, got {type(language_model).__name__}")
        scales = tuple(s2_scales)
        if not scales or scales[0] != 1 or any(not isinstance(s, int) or s < 1 for s in scales):
            raise ValueError(f"s2_scales must be positive ints starting with 1, e.g. (1,) or (1, 3); got {s2_scales}")
        self.vision_tower = vision_tower
        self.language_model = language_model
        vision_width = vision_tower.config.hidden_size * len(scales)
        language_width = language_model.get_input_embeddings().embedding_dim
        self.connector = mlp2x_gelu(vision_width, language_width).to(next(language_model.parameters()).dtype)
        self.image_token_id = int(image_token_id)
        self.s2_scales = scales
        self.balance_coef = float(balance_coef)
        self.z_coef = float(z_coef)
        self.moe: dict[str, Any] | None = None

    @classmethod
    def from_pretrained_parts(
        cls, vision: str | os.PathLike, language: str | os.PathLike, dtype: torch.dtype = torch.float32, **options: Any
    ) -> "CuMoModel":
        """Local Hugging Face checkpoints (safetensors) of the two towers + a fresh connector.

        vision: a CLIPVisionModel directory; language: an AutoModelForCausalLM directory;
        options: CuMoModel's keyword arguments (image_token_id, s2_scales, balance_coef, z_coef).
        """
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        for what, directory in (("vision", vision), ("language", language)):
            if not Path(directory).is_dir():
                raise FileNotFoundError(f"{what}={str(directory)!r} is not a directory (a local checkpoint is needed)")
        load = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
        vision_tower = CLIPVisionModel.from_pretrained(vision, **load)
        language_model = AutoModelForCausalLM.from_pretrained(language, **load)
        return cls(vision_tower, language_model, **options)

    def config_dict(self) -> dict[str, Any]:
        """Everything from_pretrained needs to rebuild the modules before it loads the tensors."""
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "vision_config": self.vision_tower.config.to_dict(),
            "language_config": self.language_model.config.to_dict(),
            "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
            "image_token_id": self.image_token_id,
            "s2_scales": list(self.s2_scales),
            "balance_coef": self.balance_coef,
            "z_coef": self.z_coef,
            "moe": self.moe,
        }

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The state dict with tied aliases (e.g. lm_head tied to embed_tokens) kept once."""
        tensors, seen = {}, set()
        for name, tensor in self.state_dict().items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                tensors[name] = tensor
        return tensors

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write model.safetensors + config.json into ``directory`` (``checkpoint.write_checkpoint``: each file
        atomically, other files there kept); returns its path."""
        return write_checkpoint(directory, self.checkpoint_tensors(), self.config_dict(), overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CuMoModel":
        """A model written by ``save_pretrained`` (dense or upcycled); CheckpointError if the directory is
        missing, partial, corrupt, or its tensors do not fit its config."""
        config = read_config(directory)
        if config.get("format") != CONFIG_FORMAT:
            raise CheckpointError(f"{directory} holds a {config.get('format')!r} checkpoint, not a {CONFIG_FORMAT!r} one")
        if not isinstance(config.get("version"), int) or config["version"] > CONFIG_VERSION:
            raise CheckpointError(f"{directory} has {CONFIG_FORMAT} version {config.get('version')!r}; this code reads "
                                  f"versions up to {CONFIG_VERSION}")
        model = cls._from_config(config, directory)
        tensors = read_tensors(directory)
        expected = model.checkpoint_tensors()
        check_tensors_match(tensors, expected, where=str(directory))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        untied = set(missing) - (set(model.state_dict()) - set(expected))
        if untied or unexpected:
            raise CheckpointError(f"{directory}: tensors {sorted(untied)[:5]} were not loaded")
        return model

    @classmethod
    def _from_config(cls, config: dict[str, Any], directory: str | os.PathLike) -> "CuMoModel":
        from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

        try:
            dtype = getattr(torch, config["dtype"])
            vision_tower = CLIPVisionModel(CLIPVisionConfig.from_dict(config["vision_config"])).to(dtype)
            language_config = AutoConfig.for_model(**config["language_config"])
            language_model = AutoModelForCausalLM.from_config(language_config, dtype=dtype)
            model = cls(
                vision_tower, language_model, image_token_id=config["image_token_id"],
                s2_scales=config["s2_scales"], balance_coef=config["balance_coef"], z_coef=config["z_coef"],
            )
            moe = config["moe"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{directory}/config.json does not describe a CuMo model: {exc!r}") from None
        if moe is not None:
            model.upcycle(**{k: v for k, v in moe.items() if k != "options"}, **moe["options"])
        return model

    def upcycle(
        self, num_experts: int = 4, top_k: int = 2, vision: bool = True, connector: bool = True,
        language: bool = False, **kw: Any,
    ) -> "CuMoModel":
        """Co-upcycle in place: every MLP of the vision tower (CLIP-MoE), the connector (MLP-MoE) and,
        with language=True, every MLP of the LM becomes a SparseMoEMLP of ``num_experts`` copies.

        kw: SparseMoEMLP options (CuMo's third stage: ``balance_loss="cumo"``). Right after, the model
        computes the dense model's function (top-k weights sum to 1). Returns self.
        """
        if self.moe is not None:
            raise RuntimeError(f"the model is already upcycled ({self.moe}); upcycle a dense model")
        if not (vision or connector or language):
            raise ValueError("upcycle needs at least one of vision, connector, language")
        try:
            json.dumps(kw)
        except TypeError:
            raise TypeError(f"upcycle options must be JSON values (they go into the checkpoint's config), got {kw}")
        if vision:
            upcycle_model(self.vision_tower, num_experts, top_k, match=BLOCK_MLP, **kw)
        if connector:
            self.connector = upcycle(self.connector, num_experts, top_k, **kw)
        if language:
            upcycle_model(self.language_model, num_experts, top_k, match=BLOCK_MLP, **kw)
        self.moe = {"num_experts": num_experts, "top_k": top_k, "vision": vision, "connector": connector,
                    "language": language, "options": dict(kw)}
        return self

    def expert_loads(self) -> dict[str, Tensor]:
        """Qualified name -> [E] int64 assignment counts of each MoE block's last forward."""
        return {name: m.last_expert_load for name, m in self.named_modules()
                if isinstance(m, SparseMoEMLP) and m.last_expert_load is not None}

    def set_trainable(self, parts: Iterable[str]) -> None:
        """requires_grad on exactly the named parts (of PARTS), off on the others."""
        parts = set(parts)
        if not parts <= set(PARTS):
            raise ValueError(f"unknown parts {sorted(parts - set(PARTS))}; the parts are {PARTS}")
        for name in PARTS:
            getattr(self, name).requires_grad_(name in parts)

    def encode_images(self, pixel_values: Tensor, project: bool = True) -> Tensor:
        """pixel_values: [B, 3, S, S] float -> [B, N, llm width] image tokens (project=False: the
        [B, N, vision width * len(s2_scales)] features before the connector), N = (S / patch)^2."""
        return self._image_tokens(pixel_values, None, project)

    def _image_tokens(self, pixel_values: Tensor, losses: dict[str, TowerLosses] | None, project: bool = True) -> Tensor:
        size = self.vision_tower.config.image_size
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be [B, 3, {size}, {size}], got {got}")
        pixel_values = pixel_values.to(next(self.vision_tower.parameters()).dtype)

        def encode(images: Tensor) -> Tensor:
            tokens = penultimate_patch_tokens(self.vision_tower, images)
            if losses is not None:
                losses["vision"].collect()
            return tokens

        features = encode(pixel_values) if self.s2_scales == (1,) else multiscale_patch_tokens(
            encode, pixel_values, self.s2_scales)
        if not project:
            return features
        tokens = self.connector(features)
        if losses is not None:
            losses["connector"].collect()
        return tokens

    def _embed(
        self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None,
        pad_side: str, losses: dict[str, TowerLosses] | None,
    ) -> Merged:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be a [B, L] int64 tensor, got {getattr(input_ids, 'shape', input_ids)}")
        for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} {tuple(tensor.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        is_placeholder = input_ids == self.image_token_id
        embed = self.language_model.get_input_embeddings()
        text = embed(input_ids.masked_fill(is_placeholder, 0))
        if pixel_values is None:
            if bool(is_placeholder.any()):
                raise ValueError(f"input_ids hold the <image> placeholder {self.image_token_id} but no pixel_values")
            image_tokens = text.new_zeros(text.shape[0], 0, text.shape[-1])
        else:
            image_tokens = self._image_tokens(pixel_values, losses).to(text.dtype)
        return merge_image_tokens(text, input_ids, image_tokens, self.image_token_id, attention_mask, labels, pad_side)

    def forward(
        self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None, labels: Tensor | None = None,
    ) -> CuMoOutput:
        """pixel_values: [B, 3, S, S] or None; input_ids, attention_mask, labels: [B, L] int64.

        labels: next-token targets aligned with input_ids (IGNORE_INDEX where no loss is wanted);
        the loss is the mean CE over the text positions that have a label (image and padding
        positions never do) plus the weighted tower aux losses after a training forward.
        """
        losses = {"vision": TowerLosses(self.vision_tower), "connector": TowerLosses(self.connector),
                  "language": TowerLosses(self.language_model)}
        merged = self._embed(pixel_values, input_ids, attention_mask, labels, "right", losses)
        logits = self.language_model(
            inputs_embeds=merged.embeds, attention_mask=merged.attention_mask, position_ids=merged.position_ids,
            use_cache=False,
        ).logits
        losses["language"].collect()
        parts = {}
        for tower, collected in losses.items():
            averages = collected.averages()
            if averages is not None:
                parts[f"{tower}_balance"], parts[f"{tower}_z"] = averages
        output = CuMoOutput(logits, aux_loss=weighted_aux_loss(parts, self.balance_coef, self.z_coef), aux_losses=parts)
        if merged.labels is not None:
            output.ce_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), merged.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            output.loss = output.ce_loss if output.aux_loss is None else output.ce_loss + output.aux_loss
        return output

    def _cache_argument(self, output: Any) -> dict[str, Any]:
        """The KV cache of ``output`` as the LM's forward takes it (``cache`` since transformers 5.24,
        ``past_key_values`` before)."""
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = output.past_key_values
        if "cache" in inspect.signature(self.language_model.forward).parameters:
            return {"cache": cache}
        return {"past_key_values": cache}

    @torch.no_grad()
    def generate(
        self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
        max_new_tokens: int = 16, eos_token_id: int | None = None, pad_token_id: int | None = None,
    ) -> Tensor:
        """Greedy decoding (eval mode, KV cache) -> [B, <= max_new_tokens] int64 new tokens.

        A sample that produced ``eos_token_id`` (default: the LM config's) is padded with
        ``pad_token_id`` (default: the eos id) afterwards; decoding stops when all have.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = self.language_model.config.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.int64)
        pad = pad_token_id if pad_token_id is not None else int(eos_ids[0]) if len(eos_ids) else 0
        was_training = self.training
        self.eval()
        try:
            merged = self._embed(pixel_values, input_ids, attention_mask, None, "left", None)
            mask, positions = merged.attention_mask, merged.position_ids[:, -1:]
            out = self.language_model(inputs_embeds=merged.embeds, attention_mask=mask,
                                      position_ids=merged.position_ids, use_cache=True)
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            tokens = []
            for _ in range(max_new_tokens):
                next_token = out.logits[:, -1].argmax(dim=-1).masked_fill(finished, pad)
                tokens.append(next_token)
                finished |= torch.isin(next_token, eos_ids.to(next_token.device))
                if bool(finished.all()) or len(tokens) == max_new_tokens:
                    break
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions + 1
                out = self.language_model(input_ids=next_token[:, None], attention_mask=mask, position_ids=positions,
                                          use_cache=True, **self._cache_argument(out))
        finally:
            self.train(was_training)
        return torch.stack(tokens, dim=1)
