"""A generated visual question answering task: coloured shapes at positions, nothing to download.

Each image (3 x 32 x 32, values in [-1, 1]) holds one shape (square, circle, triangle; or two
different ones, ``shapes_per_image=2``) in a quadrant at a random offset, in one of four colours, on a
dark noisy background. Each image comes with one question in a tiny word-level vocabulary whose answer
can only be read off the image:

    <bos> <image> what colour is the circle ?   red <eos>
    <bos> <image> where is the square ?         bottom left <eos>
    <bos> <image> what is at the top right ?    green triangle <eos>   (or: nothing <eos>)

Labels cover the answer and <eos> only (the question is the prompt, as in LLaVA's instruction data).
Splits are drawn from disjoint seeds, so the held-out images are new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cumo_layers.models.merge import IGNORE_INDEX

IMAGE_SIZE = 32
SPECIALS = ("<pad>", "<bos>", "<eos>", "<image>")
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}
POSITIONS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
WORDS = ("what", "colour", "is", "the", "where", "at", "?", "top", "bottom", "left", "right", "nothing")
VOCAB = SPECIALS + WORDS + SHAPES + tuple(COLOURS)
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = (TOKEN_ID[s] for s in SPECIALS)
SHAPE_SIZE = 10  # pixels; a quadrant is 16, so a shape sits at one of 7 x 7 offsets in it
BACKGROUND = -0.8
NOISE = 0.1
SHAPES_PER_IMAGE = 1  # 2 asks the model to bind a shape to its colour and place: far harder


def encode(words: str) -> list[int]:
    """'what colour is the circle ?' -> token ids; ValueError naming an unknown word."""
    unknown = [w for w in words.split() if w not in TOKEN_ID]
    if unknown:
        raise ValueError(f"words {unknown} are not in the vocabulary {VOCAB}")
    return [TOKEN_ID[w] for w in words.split()]


def decode(ids: list[int] | Tensor) -> str:
    """Token ids -> words, up to the first <eos> (exclusive)."""
    words = []
    for i in ids.tolist() if isinstance(ids, Tensor) else ids:
        if i == EOS_ID:
            break
        words.append(VOCAB[i])
    return " ".join(words)


def shape_mask(shape: str) -> Tensor:
    """[SHAPE_SIZE, SHAPE_SIZE] bool."""
    row, col = torch.meshgrid(torch.arange(SHAPE_SIZE), torch.arange(SHAPE_SIZE), indexing="ij")
    centre = (SHAPE_SIZE - 1) / 2
    if shape == "square":
        return torch.ones(SHAPE_SIZE, SHAPE_SIZE, dtype=torch.bool)
    if shape == "circle":
        return (row - centre) ** 2 + (col - centre) ** 2 <= (SHAPE_SIZE / 2) ** 2
    # triangle: apex at the top centre, base along the bottom row
    return (col - centre).abs() <= row / 2

@dataclass
class Split:
    """images: [N, 3, 32, 32] float32; input_ids, attention_mask, labels: [N, L] int64 (question and
    answer, right-padded); prompt_ids, prompt_mask: [N, P] int64 (question only, right-padded);
    answers: the N answers as words."""

    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    answers: list[str]

    def __len__(self) -> int:
        return len(self.answers)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        """The model's training inputs for the samples ``index`` ([n] int64)."""
        return {"pixel_values": self.images[index], "input_ids": self.input_ids[index],
                "attention_mask": self.attention_mask[index], "labels": self.labels[index]}


def _pad(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.int64)
    mask = torch.zeros(len(rows), length, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def make_split(count: int, seed: int, shapes_per_image: int = SHAPES_PER_IMAGE) -> Split:
    """``count`` fresh images with one question each, reproducible from ``seed``. With one shape per
    image every question is a read-out; with two, a question about one shape must tell it from the other."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 1 <= shapes_per_image <= len(SHAPES):
        raise ValueError(f"shapes_per_image must be in [1, {len(SHAPES)}], got {shapes_per_image}")
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> int:
        return int(torch.randint(n, (), generator=generator))

    images = BACKGROUND + NOISE * torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    masks = {shape: shape_mask(shape) for shape in SHAPES}
    colour_names = list(COLOURS)
    prompts, answers = [], []
    half = IMAGE_SIZE // 2
    for i in range(count):
        shapes = torch.randperm(len(SHAPES), generator=generator)[:shapes_per_image].tolist()
        quadrants = torch.randperm(len(POSITIONS), generator=generator)[:shapes_per_image].tolist()
        placed = {}
        for shape_index, quadrant in zip(shapes, quadrants):
            shape, colour = SHAPES[shape_index], colour_names[draw(len(COLOURS))]
            top = (quadrant // 2) * half + draw(half - SHAPE_SIZE + 1)
            left = (quadrant % 2) * half + draw(half - SHAPE_SIZE + 1)
            region = images[i, :, top : top + SHAPE_SIZE, left : left + SHAPE_SIZE]
            region[:, masks[shape]] = torch.tensor(COLOURS[colour])[:, None]
            placed[shape] = (colour, quadrant)
        kind = draw(3)
        if kind == 0:
            shape = SHAPES[shapes[draw(shapes_per_image)]]
            question, answer = f"what colour is the {shape} ?", placed[shape][0]
        elif kind == 1:
            shape = SHAPES[shapes[draw(shapes_per_image)]]
            question, answer = f"where is the {shape} ?", " ".join(POSITIONS[placed[shape][1]])
        else:
            quadrant = draw(len(POSITIONS))
            there = [f"{colour} {shape}" for shape, (colour, q) in placed.items() if q == quadrant]
            question, answer = f"what is at the {' '.join(POSITIONS[quadrant])} ?", there[0] if there else "nothing"
        prompts.append([BOS_ID, IMAGE_ID] + encode(question))
        answers.append(answer)
    full = [p + encode(a) + [EOS_ID] for p, a in zip(prompts, answers)]
    input_ids, attention_mask = _pad(full, PAD_ID)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for i, prompt in enumerate(prompts):
        labels[i, : len(prompt)] = IGNORE_INDEX
    prompt_ids, prompt_mask = _pad(prompts, PAD_ID)
    return Split(images.clamp(-1, 1), input_ids, attention_mask, labels, prompt_ids, prompt_mask, answers)
