"""Tests of cumo_layers/models/data.py: the generated shapes task."""

from __future__ import annotations

import pytest
import torch

from cumo_layers.models import data


@pytest.mark.parametrize("shapes_per_image", [1, 2])
def test_answers_can_be_read_off_the_image(shapes_per_image):
    split = data.make_split(64, seed=0, shapes_per_image=shapes_per_image)
    half = data.IMAGE_SIZE // 2
    for image, ids, answer in zip(split.images, split.prompt_ids, split.answers):
        question = data.decode(ids[2:]).replace(" <pad>", "")
        if question.startswith("what colour"):
            colour = torch.tensor(data.COLOURS[answer])[:, None, None]
            assert (image == colour).all(dim=0).sum() >= 30, (question, answer)  # a filled shape of that colour
        if question.startswith("what is at the"):
            rows, cols = question.split()[4:6]
            quadrant = image[:, (rows == "bottom") * half :][:, : half, (cols == "right") * half :][:, :, :half]
            occupied = bool((quadrant.abs() == 1).all(dim=0).sum() >= 30)
            assert occupied == (answer != "nothing"), (question, answer)
        occupied_quadrants = sum(int((image[:, r : r + half, c : c + half].abs() == 1).all(dim=0).sum()) >= 30
                                 for r in (0, half) for c in (0, half))
        assert occupied_quadrants == shapes_per_image


def test_labels_cover_the_answer_and_eos_only():
    split = data.make_split(16, seed=0)
    for ids, labels, prompt_mask, answer in zip(split.input_ids, split.labels, split.prompt_mask, split.answers):
        labelled = ids[labels != -100].tolist()
        assert labelled == data.encode(answer) + [data.EOS_ID]
        assert (labels[: int(prompt_mask.sum())] == -100).all()
        assert ids[1] == data.IMAGE_ID


def test_splits_are_reproducible_and_disjoint():
    assert torch.equal(data.make_split(8, seed=3).images, data.make_split(8, seed=3).images)
    assert not torch.equal(data.make_split(8, seed=3).images, data.make_split(8, seed=4).images)
    answers = set(data.make_split(256, seed=0).answers)
    assert {"red", "nothing", "top left"} <= answers and any(" " in a and a.split()[1] in data.SHAPES for a in answers)


def test_unknown_words_and_empty_splits_are_refused():
    with pytest.raises(ValueError, match=r"\['purple'\]"):
        data.encode("what colour is purple")
    with pytest.raises(ValueError, match="count"):
        data.make_split(0, seed=0)
    with pytest.raises(ValueError, match="shapes_per_image"):
        data.make_split(4, seed=0, shapes_per_image=4)
