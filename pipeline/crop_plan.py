"""The one crop-plan sampler: crop windows for every image of an epoch, from image sizes, optional
ContrastiveCrop boxes and a seed.

Every loader backend (DALI, FFCV, torchvision) only *applies* these windows, so the same seed gives the same
crops everywhere. A window is (top, left, height, width) in pixels of the decoded image, int64. A
ContrastiveCrop box is (top, left, bottom, right) as fractions of the image's height and width, float.
"""

from __future__ import annotations

import math

import numpy as np

SCALE = (0.2, 1.0)  # MoCo-v2's pre-training crops
SUPERVISED_SCALE = (0.08, 1.0)  # torchvision's default: MoCo's main_lincls (linear probe) and fine-tuning
RATIO = (3 / 4, 4 / 3)


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """Independent, reproducible generator for one (seed, epoch, stream); resume replays it exactly."""
    return np.random.default_rng([seed, epoch, stream])


def random_resized_crop(
    heights: np.ndarray,
    widths: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
    tries: int = 10,
    boxes: np.ndarray | None = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """RandomResizedCrop windows, vectorised over images: (N,) sizes -> (N, 4) [top, left, h, w] int64.

    Same rule as torchvision: up to `tries` draws of area fraction ~ U(scale) and log-ratio ~ U(log ratio);
    the first draw that fits is used, else a central crop with the ratio clamped into range.

    With `boxes` (N, 4) this is ContrastiveCrop's centre-suppressed sampling (same size rule): the crop's
    top-left may range from [box edge - crop size // 2] clamped to [0, H - h] (rows; columns alike), and is
    min + floor((max - min) * u) with u ~ Beta(alpha, alpha) drawn for rows and columns independently, as in
    the reference code. alpha < 1 favours the ends of that range, so crop centres land near the box edges.
    """
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    n = len(heights)
    area = (heights * widths).astype(np.float64)
    target = area[:, None] * rng.uniform(scale[0], scale[1], size=(n, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(n), first]
    h, w = h[np.arange(n), first], w[np.arange(n), first]

    # Fallback: the whole image, cropped to the nearest allowed ratio.
    in_ratio = widths / heights
    fh, fw = heights.copy(), widths.copy()
    wide, tall = in_ratio > ratio[1], in_ratio < ratio[0]
    fw[wide] = np.round(heights[wide] * ratio[1]).astype(np.int64)
    fh[tall] = np.round(widths[tall] / ratio[0]).astype(np.int64)
    h, w = np.where(found, h, fh), np.where(found, w, fw)

    if boxes is None:
        u = rng.random((n, 2))
        first_top, first_left = np.zeros(n), np.zeros(n)
        top_range, left_range = heights - h + 1, widths - w + 1
    else:
        u = rng.beta(alpha, alpha, size=(n, 2))
        first_top, last_top = _start_range(heights, h, boxes[:, 0], boxes[:, 2])
        first_left, last_left = _start_range(widths, w, boxes[:, 1], boxes[:, 3])
        top_range, left_range = last_top - first_top, last_left - first_left
    top = np.where(found, first_top + np.floor(u[:, 0] * top_range), (heights - h) // 2).astype(np.int64)
    left = np.where(found, first_left + np.floor(u[:, 1] * left_range), (widths - w) // 2).astype(np.int64)
    return np.stack([top, left, h, w], axis=1)


def _start_range(size: np.ndarray, crop: np.ndarray, low: np.ndarray, high: np.ndarray):
    """(first, last) start of a crop of length `crop` whose centre should lie in [low, high] * size."""
    limit = size - crop
    first = np.minimum(np.maximum((size * low).astype(np.int64) - crop // 2, 0), limit)
    last = np.minimum(np.maximum((size * high).astype(np.int64) - crop // 2, 0), limit)
    return first, last


def crop_plan(
    heights: np.ndarray,
    widths: np.ndarray,
    seed: int,
    epoch: int,
    views: int = 2,
    boxes: np.ndarray | None = None,
    alpha: float = 0.6,
    scale: tuple[float, float] = SCALE,
) -> np.ndarray:
    """Windows of every image for one epoch: (N, views, 4) int64, row i belongs to image i. With `boxes`
    (N, 4) the windows are ContrastiveCrop's; the views share the box and sample their own crops. `scale` is
    RandomResizedCrop's range of area fractions: MoCo-v2's pre-training (0.2, 1) by default, (0.08, 1) for the
    supervised protocols (MoCo's main_lincls)."""
    rng = epoch_rng(seed, epoch, stream=1)
    crops = [random_resized_crop(heights, widths, rng, scale, boxes=boxes, alpha=alpha) for _ in range(views)]
    return np.stack(crops, axis=1)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch (int64 indices), shared by every backend."""
    return epoch_rng(seed, epoch, stream=0).permutation(n)


def center_crop(heights: np.ndarray, widths: np.ndarray, fraction: float = 0.875) -> np.ndarray:
    """Windows (N, 4) int64 of the evaluation center crop: the central square whose side is `fraction` of the
    shorter side (ImageNet's resize-to-256, center-crop-224 when fraction = 224/256), to be resized to S x S."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    side = np.maximum(1, np.round(np.minimum(heights, widths) * fraction)).astype(np.int64)
    return np.stack([(heights - side) // 2, (widths - side) // 2, side, side], axis=1)


def random_crop_test(heights: np.ndarray, widths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Windows (N, 4) int64 of LeOCLR's random-crop test (Table 7): the image resized to a square, then
    torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) of that square. Drawn on a 1024 x 1024 square
    and mapped back to each image's pixels, so the squashing is applied exactly as the resize would."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    square = np.full(len(heights), 1024, dtype=np.int64)
    top, left, h, w = random_resized_crop(square, square, rng, scale=(0.08, 1.0)).T / 1024
    rows = np.stack([top * heights, h * heights], axis=1)
    columns = np.stack([left * widths, w * widths], axis=1)
    start = np.floor(np.stack([rows[:, 0], columns[:, 0]], axis=1)).astype(np.int64)
    size = np.maximum(1, np.round(np.stack([rows[:, 1], columns[:, 1]], axis=1))).astype(np.int64)
    size = np.minimum(size, np.stack([heights, widths], axis=1) - start)
    return np.stack([start[:, 0], start[:, 1], size[:, 0], size[:, 1]], axis=1)
