"""Tests of cumo_layers/models/merge.py: splicing image tokens into padded text."""

from __future__ import annotations

import pytest
import torch

from cumo_layers.models.merge import IGNORE_INDEX, merge_image_tokens

PLACEHOLDER = 99


def sample_batch():
    """Two samples: one with the placeholder at position 2 and one pad; one without a placeholder."""
    ids = torch.tensor([[5, 6, PLACEHOLDER, 7, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 6, -100, 7, -100], [8, 9, 10, 11, 12]])
    text = torch.randn(2, 5, 4)
    image = torch.randn(2, 3, 4)
    return text, ids, mask, labels, image


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_placeholder_replaced_missing_prepended_padding_repacked(pad_side):
    text, ids, mask, labels, image = sample_batch()
    merged = merge_image_tokens(text, ids, image, PLACEHOLDER, mask, labels, pad_side=pad_side)
    first = torch.cat([text[0, :2], image[0], text[0, 3:4]])  # 6 tokens: the pad and the placeholder are gone
    second = torch.cat([image[1], text[1]])  # 8 tokens: image first
    assert merged.embeds.shape == (2, 8, 4)
    real = slice(0, 6) if pad_side == "right" else slice(2, 8)
    assert torch.equal(merged.embeds[0, real], first) and torch.equal(merged.embeds[1], second)
    assert merged.attention_mask[0].tolist() == ([1] * 6 + [0] * 2 if pad_side == "right" else [0] * 2 + [1] * 6)
    assert merged.position_ids[0, real].tolist() == list(range(6))
    assert merged.position_ids[1].tolist() == list(range(8))
    expected_first = [-100, 6, -100, -100, -100, 7]
    assert merged.labels[0, real].tolist() == expected_first
    assert merged.labels[1].tolist() == [IGNORE_INDEX] * 3 + [8, 9, 10, 11, 12]
    assert (merged.labels[merged.attention_mask == 0] == IGNORE_INDEX).all()


def test_gradients_reach_text_and_image():
    text, ids, mask, labels, image = sample_batch()
    text.requires_grad_(True)
    image.requires_grad_(True)
    merge_image_tokens(text, ids, image, PLACEHOLDER, mask).embeds.sum().backward()
    assert (image.grad == 1).all()
    assert text.grad[0, :2].eq(1).all() and text.grad[0, 2].eq(0).all() and text.grad[0, 4].eq(0).all()


def test_bad_batches_are_refused():
    text, ids, mask, labels, image = sample_batch()
    with pytest.raises(ValueError, match="one image per sample"):
        merge_image_tokens(text, ids, image[:1], PLACEHOLDER, mask)
    ids[1, 0] = ids[1, 3] = PLACEHOLDER
    with pytest.raises(ValueError, match="sample 1 has 2 <image> placeholders"):
        merge_image_tokens(text, ids, image, PLACEHOLDER, mask)
    with pytest.raises(ValueError, match="pad_side"):
        merge_image_tokens(text, ids, image, PLACEHOLDER, pad_side="middle")
