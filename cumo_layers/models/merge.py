"""Splicing image tokens into a text sequence (LLaVA's ``prepare_inputs_labels_for_multimodal``).

Each sample's ``<image>`` placeholder id is replaced by its N image tokens; a sample without one gets
them before its text. Padding in the input (attention_mask 0) is dropped first and the merged
sequences are padded again on one side: right for training, left for generation (the next token is
then always at the last position). Image and padding positions get label IGNORE_INDEX.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


class Merged(NamedTuple):
    """embeds: [B, L', H]; attention_mask: [B, L'] int64; labels: [B, L'] int64 or None;
    position_ids: [B, L'] int64 (0, 1, ... over each sample's real tokens, 0 on padding)."""

    embeds: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    position_ids: Tensor


def merge_image_tokens(
    text_embeds: Tensor,
    input_ids: Tensor,
    image_tokens: Tensor,
    image_token_id: int,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    pad_side: str = "right",
) -> Merged:
    """text_embeds: [B, L, H]; input_ids: [B, L] int64; image_tokens: [B, N, H];
    attention_mask, labels: [B, L] or None -> Merged with L' = max over samples of (real tokens + N - 1
    if the sample has a placeholder, else real tokens + N). At most one placeholder per sample."""
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    batch, num_image_tokens = image_tokens.shape[0], image_tokens.shape[1]
    if text_embeds.shape[0] != batch:
        raise ValueError(f"{batch} images for {text_embeds.shape[0]} text samples; one image per sample")
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_placeholder = (input_ids == image_token_id) & keep
    counts = is_placeholder.sum(dim=1)
    if bool((counts > 1).any()):
        raise ValueError(
            f"sample {int((counts > 1).nonzero()[0])} has {int(counts.max())} <image> placeholders "
            f"(id {image_token_id}); the model takes one image per sample"
        )
    image_labels = labels.new_full((num_image_tokens,), IGNORE_INDEX) if labels is not None else None
    sequences, sequence_labels = [], []
    for b in range(batch):
        embeds, ids = text_embeds[b][keep[b]], input_ids[b][keep[b]]
        where = (ids == image_token_id).nonzero()
        split = int(where[0]) if len(where) else 0
        after = split + 1 if len(where) else 0
        sequences.append(torch.cat([embeds[:split], image_tokens[b], embeds[after:]]))
        if labels is not None:
            kept = labels[b][keep[b]]
            sequence_labels.append(torch.cat([kept[:split], image_labels, kept[after:]]))
    length = max(len(s) for s in sequences)
    merged = text_embeds.new_zeros(batch, length, text_embeds.shape[-1])
    mask = torch.zeros(batch, length, dtype=torch.int64, device=input_ids.device)
    merged_labels = None if labels is None else labels.new_full((batch, length), IGNORE_INDEX)
    for b, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if pad_side == "right" else slice(length - len(sequence), length)
        merged[b, span] = sequence
        mask[b, span] = 1
        if merged_labels is not None:
            merged_labels[b, span] = sequence_labels[b]
    position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return Merged(merged, mask, merged_labels, position_ids)
