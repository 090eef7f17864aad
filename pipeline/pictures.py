"""Pictures of what training sees: a grid of images of a training epoch, each row the original view (the whole
image resized, as the query encoder gets it) with its ContrastiveCrop box (white) and the two crop windows
(orange, cyan) drawn on it, then crop 1 and crop 2 as the loader emits them, before colour augmentation.
`python -m pipeline.views` draws it to a PNG; a run's TensorBoard (model.board) logs it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.backends import make_loader
from pipeline.data import ImageList
from pipeline.loader import BadFiles, LoaderSpec

BOX, WINDOWS = (255, 255, 255), ((255, 140, 0), (0, 220, 255))


def outline(pen: ImageDraw.ImageDraw, top, left, bottom, right, colour) -> None:
    """The rectangle [top, bottom) x [left, right) in panel pixels, at least one pixel wide."""
    pen.rectangle([left, top, max(left, right - 1), max(top, bottom - 1)], outline=colour)


def draw(batch, windows: np.ndarray, boxes: np.ndarray | None, heights, widths, count: int) -> Image.Image:
    """A grid of `count` rows x 3 panels from one training batch; windows (N, 2, 4) and sizes of its images."""
    size = batch.original.shape[-1]
    grid = Image.new("RGB", (3 * size + 8, count * (size + 4)), (40, 40, 40))
    for row in range(count):
        panels = [Image.fromarray(v[row].permute(1, 2, 0).cpu().numpy()) for v in batch[:3]]
        pen = ImageDraw.Draw(panels[0])
        sy, sx = size / heights[row], size / widths[row]
        if boxes is not None:
            top, left, bottom, right = boxes[row] * size
            outline(pen, top, left, bottom, right, BOX)
        for (top, left, h, w), colour in zip(windows[row], WINDOWS):
            outline(pen, top * sy, left * sx, (top + h) * sy, (left + w) * sx, colour)
        for column, panel in enumerate(panels):
            grid.paste(panel, (column * (size + 4), row * (size + 4)))
    return grid


def picture(
    backend: str,
    images: ImageList,
    seed: int,
    epoch: int,
    boxes: np.ndarray | None = None,
    alpha: float = 0.6,
    count: int = 8,
    size: int = 128,
    bad_files: BadFiles | None = None,
) -> Image.Image:
    """The grid `draw` makes of the first `count` images of a training epoch, read through `backend` on the CPU at
    `size` px panels: the windows and crops of that epoch with the seed, boxes (N, 4) and alpha given; a run's
    `bad_files` stay out of it as they do of its training batches."""
    workers = 0 if backend == "torchvision" else 1
    spec = LoaderSpec(backend, size, count, torch.device("cpu"), train=True, seed=seed, workers=workers)
    loader = make_loader(spec, images, bad_files=bad_files)
    try:
        loader.boxes, loader.alpha = boxes, alpha
        order, windows, _ = loader.schedule(epoch)
        batches = loader.epoch(epoch)
        batch = next(batches)
        batches.close()
    finally:
        loader.close()
    picked = order[:count]
    chosen = None if boxes is None else boxes[picked]
    return draw(batch, windows[:count], chosen, images.heights[picked], images.widths[picked], count)
