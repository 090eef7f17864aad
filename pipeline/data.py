"""An ImageNet-layout split (SPLIT/<class>/*.jpg) as arrays of paths, labels and image sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".JPG", ".JPEG"}


@dataclass(frozen=True)
class ImageList:
    """The images of one split. `heights`/`widths` are int64 (N,), `labels` int64 (N,)."""

    paths: list[str]
    labels: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def scan_split(split_dir: str | Path, limit: int = 0, seed: int = 0) -> ImageList:
    """List SPLIT/<class>/*.jpg; with limit > 0 keep a seeded random subset of that many images.

    Image sizes come from the JPEG headers (no decode): the crop plan needs them.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} is not a folder (expected SPLIT/<class>/*.jpg)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"no JPEG files in {split_dir}/<class>/ (expected an ImageNet-layout folder)")
    labels = np.asarray(labels, dtype=np.int64)
    if 0 < limit < len(paths):
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
        paths, labels = [paths[i] for i in keep], labels[keep]
    heights = np.empty(len(paths), dtype=np.int64)
    widths = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(tqdm(paths, desc=f"sizes {split_dir.name}", unit="img", leave=False, mininterval=1)):
        widths[i], heights[i] = read_size(path)
    return ImageList(paths, labels, heights, widths, classes)


def read_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header; a file PIL cannot read raises ValueError naming it."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # PIL raises several unrelated types for broken files
        raise ValueError(f"cannot read image {path}: {error}") from error
