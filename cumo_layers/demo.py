"""`make demo`: co-upcycle a tiny CLIP vision tower to MoE and train it a few steps on CPU.

A random-init CLIPVisionModel (32 px images, 8 px patches, width 64, 4 layers) is upcycled: each
of its 4 MLPs becomes a SparseMoEMLP with 4 experts, top-2, as in CuMo's CLIP-MoE. The demo checks
that the upcycled model still computes the dense model's function, then trains it with AdamW on a
synthetic task whose label is a function of the image (which colour channel is tinted, if any),
printing the task loss, the aux loss and each layer's expert load. Run: python -m cumo_layers.demo
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from cumo_layers import SparseMoEMLP, aux_loss, upcycle_model
from moe_kernels import ops

IMAGE_SIZE = 32
PATCH_SIZE = 8
WIDTH = 64
LAYERS = 4
NUM_EXPERTS = 4
TOP_K = 2
NUM_CLASSES = 4
DATASET_SIZE = 512
BATCH_SIZE = 16
STEPS = 30
LOG_EVERY = 5
LEARNING_RATE = 2e-3
TINT = 0.2
HELD_OUT_SIZE = 256


def synthetic_images(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noise images [N, 3, 32, 32]; label c < 3 tints channel c, label 3 leaves the image grey."""
    images = torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    tinted = labels < 3
    images[tinted, labels[tinted]] += TINT
    return images, labels


class Classifier(nn.Module):
    """CLIP vision tower + linear head on the pooled (CLS) output."""

    def __init__(self) -> None:
        super().__init__()
        config = CLIPVisionConfig(
            hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_act="quick_gelu",
        )
        self.tower = CLIPVisionModel(config)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.tower(pixel_values=images).pooler_output)


def expert_loads(model: nn.Module) -> str:
    loads = [m.last_expert_load.tolist() for m in model.modules() if isinstance(m, SparseMoEMLP)]
    return " ".join(f"L{i}:{load}" for i, load in enumerate(loads))


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    backend = ops.resolve_backend("auto", "cpu").__name__
    print(f"cumo-moe demo: co-upcycling a tiny CLIP vision tower; 'auto' backend on cpu -> {backend}")

    model = Classifier().eval()
    images, labels = synthetic_images(DATASET_SIZE, generator)
    probe = images[:4]
    with torch.no_grad():
        dense_logits = model(probe)
    dense_params = sum(p.numel() for p in model.parameters())
    upcycle_model(model.tower, num_experts=NUM_EXPERTS, top_k=TOP_K)
    with torch.no_grad():
        moe_logits = model(probe)
    moe_count = sum(isinstance(m, SparseMoEMLP) for m in model.modules())
    diff = (moe_logits - dense_logits).abs().max().item()
    print(
        f"upcycled {moe_count} MLPs -> SparseMoEMLP({NUM_EXPERTS} experts, top-{TOP_K}); parameters "
        f"{dense_params:,} -> {sum(p.numel() for p in model.parameters()):,}; "
        f"max |logits(moe) - logits(dense)| = {diff:.2e}"
    )

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    first_loss = last_loss = float("nan")
    for step in range(1, STEPS + 1):
        batch = torch.randint(0, DATASET_SIZE, (BATCH_SIZE,), generator=generator)
        logits = model(images[batch])
        task_loss = F.cross_entropy(logits, labels[batch])
        moe_loss = aux_loss(model)
        (task_loss + moe_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = task_loss.item()
        if step == 1:
            first_loss = last_loss
        if step == 1 or step % LOG_EVERY == 0:
            accuracy = (logits.argmax(dim=-1) == labels[batch]).float().mean().item()
            print(
                f"step {step:3d}  loss {last_loss:.4f}  aux {moe_loss.item():.4f}  acc {accuracy:.2f}  "
                f"expert load {expert_loads(model)}"
            )
    model.eval()
    test_images, test_labels = synthetic_images(HELD_OUT_SIZE, generator)
    with torch.no_grad():
        test_accuracy = (model(test_images).argmax(dim=-1) == test_labels).float().mean().item()
    trend = "down" if last_loss < first_loss else "NOT down"
    print(
        f"loss {first_loss:.4f} -> {last_loss:.4f} ({trend}) in {STEPS} steps; held-out accuracy "
        f"{test_accuracy:.2f} on {HELD_OUT_SIZE} fresh images; {time.perf_counter() - start:.1f} s, backend {backend}"
    )


if __name__ == "__main__":
    main()
