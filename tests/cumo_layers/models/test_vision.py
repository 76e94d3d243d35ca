"""Tests of cumo_layers/models/vision.py: S2 multi-scale features against a crop-by-crop loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cumo_layers.models.vision import multiscale_patch_tokens

SIZE, GRID, WIDTH = 8, 2, 5


def patch_encoder(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, 8, 8] -> [n, 4, 5]: a fixed random linear map of each 4x4 patch (position-dependent output)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * 16, WIDTH, generator=generator, dtype=images.dtype)
    patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # [n, 4, 48]
    return patches @ weight


def test_scale_one_is_the_plain_features():
    images = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    torch.testing.assert_close(multiscale_patch_tokens(patch_encoder, images, (1,)), patch_encoder(images))


def test_scale_three_stitches_crops_and_pools_them_to_the_base_grid():
    images = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    features = multiscale_patch_tokens(patch_encoder, images, (1, 3))
    assert features.shape == (2, GRID * GRID, 2 * WIDTH)
    torch.testing.assert_close(features[..., :WIDTH], patch_encoder(images))
    large = F.interpolate(images, size=(3 * SIZE, 3 * SIZE), mode="bicubic", align_corners=False)
    grid = torch.zeros(2, WIDTH, 3 * GRID, 3 * GRID, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            crop = large[:, :, i * SIZE : (i + 1) * SIZE, j * SIZE : (j + 1) * SIZE]
            tokens = patch_encoder(crop).transpose(1, 2).reshape(2, WIDTH, GRID, GRID)
            grid[:, :, i * GRID : (i + 1) * GRID, j * GRID : (j + 1) * GRID] = tokens
    pooled = F.avg_pool2d(grid, kernel_size=3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(features[..., WIDTH:], pooled)
