"""ContrastiveCrop (Peng et al. 2022): the box rule on a model's heatmaps, and when to refresh the boxes.

The pass that runs the model over the images is model/localize.py's `localize`. The boxes feed the shared crop
plan (`Loader.boxes`), which samples crop centres inside them with Beta(alpha, alpha); every backend then
applies the same windows.
"""

from __future__ import annotations

import numpy as np
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
    """The epochs (0-based, about to start) before which the boxes are recomputed, as the reference code
    (xyupeng/ContrastiveCrop) schedules them: once e epochs are done, where e >= `warmup`, e % `interval` == 0
    and 1 <= e < `epochs`. Never before the first epoch (a network with random weights has no heatmap worth
    a box, so a warm-up of 0 waits for `interval` epochs) and never after the last."""
    interval = max(1, interval)
    return [done for done in range(max(1, warmup), epochs) if done % interval == 0]


def forward_refresh_start(updates: list[int]) -> int | None:
    """The first epoch (0-based) whose training steps refresh the boxes from LeOCLR's forward (--ccrop-boxes
    forward), given `update_epochs`: the one before the first update (those boxes come from weights trained
    about as long as the pass's), but never the first epoch (random weights); None without updates."""
    return max(1, updates[0] - 1) if updates else None


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """(N,) areas of boxes (N, 4) [top, left, bottom, right] in fractions of the image: each a fraction of it."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def mean_box_area(boxes: np.ndarray) -> float:
    """Mean area of ContrastiveCrop boxes (N, 4), as a fraction of the image."""
    return float(np.mean(box_areas(boxes)))


def whole_image_boxes(n: int) -> np.ndarray:
    """(n, 4) float32 boxes [0, 0, 1, 1]: the reference's boxes before the first update."""
    return np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32), (n, 1))


def alpha_for(image_size: int) -> float:
    """ContrastiveCrop's Beta(alpha, alpha) by training resolution S, as the reference configs set it: 0.1 for
    every small-image set (CIFAR 32 px, Tiny ImageNet 64 px, STL-10 96 px), 0.6 for ImageNet (224 px). The line
    is drawn above the largest of those: S <= 96 -> 0.1, S > 96 -> 0.6."""
    return 0.1 if image_size <= SMALL_IMAGES else 0.6


SMALL_IMAGES = 96  # STL-10's side, the largest small-image config of the reference (alpha 0.1)
