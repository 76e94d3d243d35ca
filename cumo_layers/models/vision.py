"""Image features for the connector: CLIP's penultimate-layer patch tokens, optionally multi-scale (S2).

CuMo and LLaVA feed the connector the *input* of CLIP's last layer (``hidden_states[-2]``), CLS
dropped: the last layer was trained for the contrastive CLS head, the one before it keeps more
spatial detail. CuMo adds S2 (Shi et al., "When do we not need larger vision models?"): the image is
also resized to 3x, cut into 3x3 crops of the base size, each crop encoded by the same tower, the
crops' token grids stitched back into one 3x grid and average-pooled down to the 1x grid; the scales
are concatenated on channels (CLIP-L/336: 576 tokens x 2048 channels into the connector).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PatchEncoder = Callable[[Tensor], Tensor]


def penultimate_patch_tokens(tower: nn.Module, pixel_values: Tensor) -> Tensor:
    """pixel_values: [B, 3, S, S] float -> [B, (S/patch)^2, D]: ``hidden_states[-2][:, 1:]``.

    The whole tower runs (its last layer too, as in CuMo, whose aux losses count every layer).
    """
    hidden_states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return hidden_states[-2][:, 1:]


def multiscale_patch_tokens(encode: PatchEncoder, pixel_values: Tensor, scales: Sequence[int]) -> Tensor:
    """S2 features: pixel_values [B, 3, S, S] -> [B, G*G, D * len(scales)], G the 1x token grid side.

    ``encode`` maps [n, 3, S, S] images to [n, G*G, D] tokens. Scale s resizes the image to s*S
    (bicubic), encodes its s*s crops of S x S, stitches the crops' grids into an [s*G, s*G] grid and
    area-pools it to [G, G] (s2wrapper's ``multiscale_forward`` with ``max_split_size = S``).
    """
    batch, channels, size, _ = pixel_values.shape
    features = []
    for scale in scales:
        if scale == 1:
            images = pixel_values
        else:
            images = F.interpolate(pixel_values, size=(scale * size, scale * size), mode="bicubic", align_corners=False)
        # [B, C, s*S, s*S] -> [B * s * s, C, S, S], crops in row-major order within each image.
        crops = images.reshape(batch, channels, scale, size, scale, size).permute(0, 2, 4, 1, 3, 5)
        tokens = encode(crops.reshape(batch * scale * scale, channels, size, size))
        grid = int(round(tokens.shape[1] ** 0.5))
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"S2 needs a square token grid, got {tokens.shape[1]} tokens per crop")
        width = tokens.shape[-1]
        # [B, s, s, G, G, D] -> [B, D, s*G, s*G]: crop (i, j) lands at rows i*G.., columns j*G..
        stitched = tokens.reshape(batch, scale, scale, grid, grid, width).permute(0, 5, 1, 3, 2, 4)
        stitched = stitched.reshape(batch, width, scale * grid, scale * grid)
        pooled = F.interpolate(stitched, size=(grid, grid), mode="area") if scale != 1 else stitched
        features.append(pooled.flatten(2).transpose(1, 2))
    return features[0] if len(features) == 1 else torch.cat(features, dim=-1)
