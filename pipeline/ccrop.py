"""ContrastiveCrop (Peng et al. 2022): per-image boxes from the model's own heatmaps, and when to refresh them.

The boxes feed the shared crop plan (`Loader.boxes`), which samples crop centres inside them with
Beta(alpha, alpha); every backend then applies the same windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.augment import normalize
from pipeline.loader import Loader


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


@torch.no_grad()
def localize(
    encoder: torch.nn.Module,
    loader: Loader,
    k: float = 0.1,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Boxes (N, 4) float32 of every image of an evaluation loader (no augmentation, whole image resized):
    the encoder's `feature_map` in eval mode, one heatmap box per image, row i for image i."""
    was_training = encoder.training
    encoder.eval()
    boxes = np.zeros((len(loader.images), 4), dtype=np.float32)
    size = (loader.image_size, loader.image_size)
    bar = tqdm(loader.epoch(0), total=len(loader), desc="  boxes", leave=False, unit="batch", disable=loader.rank > 0)
    for batch in bar:
        with context():
            maps = encoder.feature_map(normalize(batch.original))
        boxes[batch.indices.cpu().numpy()] = heatmap_boxes(maps, size, k).cpu().numpy()
    encoder.train(was_training)
    return boxes
