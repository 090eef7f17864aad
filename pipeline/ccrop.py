"""ContrastiveCrop (Peng et al. 2022): the box rule on a model's heatmaps, and when to refresh the boxes.

The pass that runs the model over the images is model/localize.py's `localize`. The boxes feed the shared crop
plan (`Loader.boxes`), which samples crop centres inside them with Beta(alpha, alpha); every backend then
applies the same windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def heatmap_boxes(maps: torch.Tensor, size: tuple[int, int], k: float = 0.1) -> torch.Tensor:
    """Feature maps (N, C, h, w) -> boxes (N, 4) float32 [top, left, bottom, right] as fractions of `size`.

    The heatmap is the channel sum, min-max normalised per image to [0, 1] and bilinearly upsampled to
    `size` (H, W); the box is the smallest rectangle holding every position > k, in pixels [top, bottom) x
    [left, right), divided by H and W. A map with no position > k (a constant map, or k >= 1) gives the whole
    image; a single position gives a one-pixel box.
    """
    n, _, h, w = maps.shape
    heat = maps.float().sum(1).view(n, -1)
    heat = heat - heat.min(1, keepdim=True).values
    heat = heat / heat.max(1, keepdim=True).values  # constant map: 0/0 = NaN, never > k
    heat = F.interpolate(heat.view(n, 1, h, w), size=size, mode="bilinear")[:, 0]
    above = heat > k
    rows, cols = above.any(2), above.any(1)  # (N, H), (N, W)
    height, width = size
    top = rows.int().argmax(1)  # 0 when no row is above: the whole image
    bottom = height - rows.flip(1).int().argmax(1)
    left = cols.int().argmax(1)
    right = width - cols.flip(1).int().argmax(1)
    return torch.stack([top / height, left / width, bottom / height, right / width], dim=1).float()


def update_epochs(epochs: int, warmup: int, interval: int) -> list[int]:
    """The epochs (0-based, about to start) before which the boxes are recomputed: after `warmup` epochs of
    RandomResizedCrop, then every `interval` epochs, never after the last one."""
    return list(range(warmup, epochs, max(1, interval))) if warmup < epochs else []
