"""ContrastiveCrop's localisation pass: the query encoder, in eval mode, boxes every training image with the
box rule of pipeline/ccrop.py (`heatmap_boxes`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.augment import normalize
from pipeline.ccrop import heatmap_boxes
from pipeline.loader import Loader


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
