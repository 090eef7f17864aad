"""The images of one split as arrays of labels and image sizes, from an ImageNet-layout folder
(SPLIT/<class>/*.jpg). A .beton file's are read by the FFCV backend (`pipeline.backends.ffcv.read_beton`);
`pipeline.backends.load_splits` finds the splits a loader backend reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".JPG", ".JPEG"}
DECODED_FORMATS = ("JPEG", "PNG")  # what DALI, FFCV's converter (through PIL) and PIL all decode to RGB


@dataclass(frozen=True)
class ImageList:
    """The images of one split. `heights`/`widths` are int64 (N,), `labels` int64 (N,).

    Folder data has one JPEG path per image. Data in a .beton has `beton` set, no paths, and `ids`, the
    images' sample ids in that file (int64 (N,)); the sizes are the stored (possibly downscaled) ones.
    """

    paths: list[str]
    labels: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    classes: list[str]
    beton: str | None = None
    ids: np.ndarray | None = None
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of the files --skip-bad left out

    def __len__(self) -> int:
        return len(self.labels)


def scan_split(split_dir: str | Path, limit: int = 0, seed: int = 0, skip_bad: bool = False) -> ImageList:
    """List SPLIT/<class>/*.jpg; with limit > 0 keep a seeded random subset of that many images.

    An index pass reads every kept file's header (no decode): the crop plan needs the sizes, and `check_image`
    finds the files no loader could decode. Those stop the scan with a ValueError naming every one of them,
    or with `skip_bad` are left out and listed in `skipped`.
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
    keep = subset(len(paths), limit, seed)
    paths, labels = [paths[i] for i in keep], np.asarray(labels, dtype=np.int64)[keep]
    heights = np.zeros(len(paths), dtype=np.int64)
    widths = np.zeros(len(paths), dtype=np.int64)
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(tqdm(paths, desc=f"index {split_dir.name}", unit="img", leave=False, mininterval=1)):
        try:
            widths[i], heights[i] = check_image(path)
        except BadImage as error:
            bad.append((i, str(error)))
    if bad and not skip_bad:
        listed = "\n".join(f"  {paths[i]}: {reason}" for i, reason in bad)
        raise ValueError(
            f"{len(bad)} of {len(paths)} images in {split_dir} cannot be decoded (nothing was trained; "
            f"--skip-bad leaves them out):\n{listed}"
        )
    if bad:
        keep = np.setdiff1d(np.arange(len(paths)), [i for i, _ in bad])
        skipped = tuple((paths[i], reason) for i, reason in bad)
        return ImageList([paths[i] for i in keep], labels[keep], heights[keep], widths[keep], classes, skipped=skipped)
    return ImageList(paths, labels, heights, widths, classes)


class BadImage(ValueError):
    """A file no loader can decode; the message says why."""


def check_image(path: str) -> tuple[int, int]:
    """(width, height) of an image every loader decodes, from its header; BadImage otherwise: unreadable,
    empty, not an image, or a JPEG/PNG cut short (no end marker in its last bytes: a truncated download).
    Readable odd files pass: PNG or grayscale/CMYK JPEG data under a .jpg name, tiny or huge images."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 1024))
            tail = file.read()
    except OSError as error:
        raise BadImage(f"unreadable ({error.strerror or error})") from error
    if size == 0:
        raise BadImage("empty file")
    try:
        with Image.open(path) as image:
            width, height, kind = image.width, image.height, image.format
    except Exception as error:  # PIL raises several unrelated types for foreign files
        raise BadImage(f"not an image ({type(error).__name__}: {error})") from error
    if kind not in DECODED_FORMATS:
        raise BadImage(f"{kind} data: the loaders decode {', '.join(DECODED_FORMATS)}")
    if kind == "JPEG" and b"\xff\xd9" not in tail or kind == "PNG" and b"IEND" not in tail:
        raise BadImage(f"truncated {kind} (no end marker)")
    if width < 1 or height < 1:
        raise BadImage(f"{width} x {height} pixels")
    return width, height


def subset(count: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of `limit` of `count` items (all of them when limit is 0).

    Folders and the .beton files converted from them list images in the same order, so one seed picks the
    same images for every backend.
    """
    if 0 < limit < count:
        return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))
    return np.arange(count)


def select(images: ImageList, keep: np.ndarray) -> ImageList:
    """The images at positions `keep` (int array) of a split, from a folder or a .beton alike."""
    keep = np.asarray(keep, dtype=np.int64)
    return ImageList(
        paths=[images.paths[i] for i in keep] if images.paths else [],
        labels=images.labels[keep],
        heights=images.heights[keep],
        widths=images.widths[keep],
        classes=images.classes,
        beton=images.beton,
        ids=None if images.ids is None else images.ids[keep],
    )


def balanced_fraction(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of a seeded, class-balanced `fraction` of the labels: round(fraction x count) of every
    class (at least one each), as the semi-supervised 1% / 10% ImageNet splits take the same share per class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    rng = np.random.default_rng([seed, 7])
    labels = np.asarray(labels)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(keep))
