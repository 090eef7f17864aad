"""The images of one split as arrays of labels and image sizes, from a folder: ImageNet-layout class folders
(SPLIT/<class>/*.jpg) or any folder of images, flat or nested, whose subfolders mean nothing (no labels). A .beton
file's are read by the FFCV backend (`pipeline.backends.ffcv.read_beton`); `pipeline.backends.load_splits` finds
the splits a loader backend reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# What the folder listing takes as images (any case: .JPG, .Jpeg, ...). DALI, FFCV's converter and PIL all decode
# these formats to RGB; files with other image suffixes are listed too, so that the index pass names them.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DECODED_FORMATS = ("JPEG", "PNG", "WEBP")
OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".jxl", ".ppm", ".pgm")
# --labels: class folders (SPLIT/<class>/...), none (every image label -1), or auto (class folders when every
# image sits exactly one folder down, SPLIT/<class>/<image>; none for flat folders and mixed depths)
LABELS = ("auto", "folders", "none")
UNLABELLED = -1


@dataclass(frozen=True)
class ImageList:
    """The images of one split. `heights`/`widths` are int64 (N,), `labels` int64 (N,): the class folder's index
    in `classes`, or -1 for every image of unlabelled data (`classes` empty).

    Folder data has one path per image. Data in a .beton has `beton` set, no paths, and `ids`, the
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

    @property
    def labelled(self) -> bool:
        """Whether the images have class labels (the kNN monitor and the evaluation protocols need them)."""
        return len(self.classes) > 0


def list_images(split_dir: Path) -> list[Path]:
    """Every file under `split_dir` with an image suffix, at any depth, in sorted order of their relative paths'
    parts (for class folders: by class, then file, as the .beton files converted from them). Hidden files and
    folders are left out; linked folders are followed (each real folder once)."""
    found: list[Path] = []
    seen: set[str] = set()

    def walk(folder: str) -> None:
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            return
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    folder_entry = entry.is_dir()
                except OSError:  # a link loop (ELOOP): listed by its suffix, the index pass names it as unreadable
                    folder_entry = False
                if folder_entry:
                    walk(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES + OTHER_IMAGE_SUFFIXES:
                    found.append(Path(entry.path))

    walk(str(split_dir))
    return sorted(found, key=lambda path: path.relative_to(split_dir).parts)


def folder_labels(split_dir: Path, files: list[Path], labels: str = "auto") -> tuple[np.ndarray, list[str]]:
    """(labels int64 (N,), classes) of `files` under `split_dir` by `labels` (see `LABELS`): with class folders
    the first folder under the split is the class, and `classes` are the split's subfolders (empty ones too, so
    train and val number them alike); otherwise every label is -1 and there are no classes. ValueError when
    `labels` is "folders" and images sit directly in the split."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {', '.join(LABELS)}, not {labels!r}")
    parts = [path.relative_to(split_dir).parts for path in files]
    if labels == "auto":
        labels = "folders" if all(len(p) == 2 for p in parts) else "none"
    if labels == "none":
        return np.full(len(files), UNLABELLED, dtype=np.int64), []
    loose = [str(files[i]) for i, p in enumerate(parts) if len(p) == 1]
    if loose:
        raise ValueError(
            f"--labels folders: {len(loose)} images sit directly in {split_dir}, not in a class folder "
            f"(e.g. {loose[0]}); --labels none trains on them without labels"
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    index = {name: label for label, name in enumerate(classes)}
    return np.asarray([index[p[0]] for p in parts], dtype=np.int64), classes


def scan_split(
    split_dir: str | Path, limit: int = 0, seed: int = 0, skip_bad: bool = False, labels: str = "auto"
) -> ImageList:
    """List the images under SPLIT (class folders SPLIT/<class>/*.jpg, or any folder of images, flat or nested:
    `list_images`), labelled as `labels` says (`folder_labels`); with limit > 0 keep a seeded random subset of
    that many images.

    An index pass reads every kept file's header (no decode): the crop plan needs the sizes, and `check_image`
    finds the files no loader could decode. Those stop the scan with a ValueError naming every one of them,
    or with `skip_bad` are left out and listed in `skipped`.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} is not a folder (expected a folder of images)")
    files = list_images(split_dir)
    if not files:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        raise FileNotFoundError(f"no images ({suffixes}) in {split_dir} or its subfolders")
    all_labels, classes = folder_labels(split_dir, files, labels)
    keep = subset(len(files), limit, seed)
    paths, labels = [str(files[i]) for i in keep], all_labels[keep]
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
    empty, not an image, a format the loaders do not decode (GIF, TIFF, ...), or a JPEG/PNG/WebP cut short (a
    truncated download: no JPEG/PNG end marker in the last bytes, or fewer bytes than the WebP header's RIFF
    size). Readable odd files pass: PNG or WebP data under a .jpg name, grayscale/CMYK JPEGs, tiny or huge images."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 1024))
            tail = file.read()
    except OSError as error:
        raise BadImage(f"unreadable ({error.strerror or error})") from error
    if size == 0:
        raise BadImage("empty file")
    # RIFF....WEBP: bytes 4-8 hold the size of what follows them (little-endian); PIL cannot open a WebP cut short
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and size < 8 + int.from_bytes(head[4:8], "little"):
        raise BadImage("truncated WEBP (fewer bytes than its header says)")
    try:
        with Image.open(path) as image:
            width, height, kind = image.width, image.height, image.format
    except Exception as error:  # PIL raises several unrelated types for foreign files
        raise BadImage(f"not an image ({type(error).__name__}: {error})") from error
    if kind == "MPO":  # a camera's multi-picture JPEG: every loader decodes its first picture
        kind = "JPEG"
    if kind not in DECODED_FORMATS:
        raise BadImage(f"{kind} data: the loaders decode {', '.join(DECODED_FORMATS)}")
    if kind == "JPEG" and b"\xff\xd9" not in tail or kind == "PNG" and b"IEND" not in tail:
        raise BadImage(f"truncated {kind} (no end marker)")
    if width < 1 or height < 1:
        raise BadImage(f"{width} x {height} pixels")
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as RGB, as DALI decodes it: 16-bit grayscale scaled to 8 bits (round(v / 257); PIL's own
    conversion clips it at 255), everything else through PIL's convert (alpha dropped, palettes expanded)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        levels = np.round(np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
        return Image.fromarray(levels).convert("RGB")
    return image.convert("RGB")


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
