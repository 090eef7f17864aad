"""Convert a folder of images to FFCV .beton files, once, for `train.py --loader ffcv`.

    python -m pipeline.convert data/fashion-mnist data/fashion-mnist-ffcv    # DATA/{train,val} -> OUT/{train,val}.beton
    python -m pipeline.convert /imagenet/train /ffcv/train.beton --max-resolution 256   # one split -> one file
    python pipeline/convert.py ~/photos photos.beton                  # any folder of images, unlabelled: -> one file

Each file holds an RGBImageField "image" (downscaled so its longest side is at most --max-resolution; PNG and WebP
files are decoded and stored like JPEGs, as --write-mode says) and an IntField "label": the class folder's index in
sorted order, or -1 for every image of a folder without labels (--labels, as train.py's). Images keep the folder's
sorted order, so a seeded --train-limit picks the same images from the folder and from the .beton.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

if not __package__:  # run as a file (python pipeline/convert.py): import the project from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline import require_backend
from pipeline.data import LABELS, ImageList, scan_split, select, to_rgb
from pipeline.verify import decode_error

SPLITS = ("train", "val")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")


class _Decoded:
    """Item i -> (uint8 RGB HWC image, label) for FFCV's writer processes.

    A file that cannot be decoded is flagged in shared memory and replaced by a 1-pixel image: an exception
    in a writer process would leave FFCV's writer waiting forever, so the caller checks the flags instead.
    """

    def __init__(self, images: ImageList, max_resolution: int) -> None:
        self.images, self.max_resolution = images, max_resolution
        self.failed = multiprocessing.Array("b", len(images), lock=False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        label = int(self.images.labels[i])
        try:  # a full decode: a JPEG whose header and end marker are intact but whose data is broken fails here
            with Image.open(self.images.paths[i]) as file:
                if self.max_resolution:
                    # Let the JPEG decoder skip detail the stored size cannot keep (DCT scaling, >= the target).
                    scale = self.max_resolution / max(file.size)
                    if scale < 1:
                        file.draft("RGB", (math.ceil(file.width * scale), math.ceil(file.height * scale)))
                return np.asarray(to_rgb(file)), label
        except Exception:  # PIL raises several unrelated types for broken files
            self.failed[i] = 1
            return np.zeros((1, 1, 3), dtype=np.uint8), label


def convert_split(
    split_dir: Path,
    out: Path,
    max_resolution: int = 256,
    write_mode: str = "jpg",
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    smart_threshold: int | None = None,
    workers: int = 0,
    skip_bad: bool = False,
    labels: str = "auto",
) -> int:
    """Write the images under SPLIT (class folders SPLIT/<class>/*.jpg, or any folder of images, labelled as
    `labels` says; see `pipeline.data.scan_split`) to `out` (.beton); returns the image count. Files that cannot
    be decoded raise ValueError naming every one (the index pass finds those with a bad header before anything is
    written; the others fail the writer's full decode, and the file is removed), or with `skip_bad` are left out
    and printed (those the writer found by writing the file again without them); no partial file is left behind.
    BackendUnavailable without FFCV."""
    require_backend("ffcv")  # FFCV is optional: imported here, not when this module is (keeps torch's threads)

    images = scan_split(split_dir, skip_bad=skip_bad, labels=labels)
    for path, reason in images.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = (max_resolution, write_mode, jpeg_quality, compress_probability, smart_threshold, workers)
    failed = _write(images, out, *options)
    if failed and skip_bad:
        for i in failed:
            click.echo(f"skipped {images.paths[i]}: {decode_error(images.paths[i]) or 'does not decode'}", err=True)
        if len(failed) == len(images):
            out.unlink(missing_ok=True)
            raise ValueError(f"none of the {len(images)} images of {split_dir} decodes")
        images = select(images, np.setdiff1d(np.arange(len(images)), failed))
        failed = [images.paths[i] for i in _write(images, out, *options)]  # nothing new fails: the same decoder
    else:
        failed = [images.paths[i] for i in failed]
    if failed:
        out.unlink(missing_ok=True)
        listed = "\n  ".join(failed)
        raise ValueError(
            f"cannot decode {len(failed)} image(s) of {split_dir}; nothing written (--skip-bad leaves them out):"
            f"\n  {listed}"
        )
    return len(images)


def _write(
    images: ImageList,
    out: Path,
    max_resolution: int,
    write_mode: str,
    jpeg_quality: int,
    compress_probability: float,
    smart_threshold: int | None,
    workers: int,
) -> list[int]:
    """Write `images` to `out`; returns the positions of those that failed to decode (stored as 1 pixel)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    source = _Decoded(images, max_resolution)
    field = RGBImageField(
        write_mode=write_mode,
        max_resolution=max_resolution or None,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
        smart_threshold=smart_threshold,
    )
    writer = DatasetWriter(
        str(out),
        {"image": field, "label": IntField()},
        page_size=page_size(images, max_resolution),
        num_workers=workers or min(len(images), os.cpu_count() or 1),
    )
    writer.from_indexed_dataset(source, chunksize=max(1, min(100, len(images) // max(1, writer.num_workers))))
    return np.flatnonzero(np.frombuffer(source.failed, dtype=np.int8)).tolist()


def page_size(images: ImageList, max_resolution: int) -> int:
    """FFCV's allocation unit: a power of two holding the largest stored image twice, at least 2 MiB.
    (Each writer process fills its own pages, so FFCV's 8 MiB default makes small files mostly padding.)"""
    from ffcv.writer import MIN_PAGE_SIZE

    scale = np.minimum(1.0, max_resolution / np.maximum(images.heights, images.widths)) if max_resolution else 1.0
    largest = int(np.max(np.ceil(images.heights * scale) * np.ceil(images.widths * scale) * 3)) + 2**16
    return max(MIN_PAGE_SIZE, 1 << (2 * largest - 1).bit_length())


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--max-resolution", type=int, default=256, help="Downscale so the longest side is at most this (0 = keep size)."
)
@click.option(
    "--write-mode",
    type=click.Choice(WRITE_MODES),
    default="jpg",
    help="FFCV's storage: jpg (re-encoded), raw (pixels: fastest to read, largest), smart (jpg only for images "
    "over --smart-threshold bytes), proportion (jpg with probability --compress-probability).",
)
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, help="Quality of the stored JPEGs.")
@click.option("--compress-probability", type=click.FloatRange(0, 1), default=0.5, help="For --write-mode proportion.")
@click.option("--smart-threshold", type=int, default=None, help="Raw-size bytes above which smart mode stores JPEG.")
@click.option("--workers", type=int, default=0, help="Writer processes (0 = one per CPU core).")
@click.option("--skip-bad", is_flag=True, help="Leave out (and list) images no loader can decode instead of stopping.")
@click.option(
    "--labels",
    type=click.Choice(LABELS),
    default="auto",
    help="Labels from class folders (SPLIT/<class>/...), none (every image stored with label -1), or auto: class "
    "folders when every image sits exactly one folder down, none for flat folders and mixed depths.",
)
def main(src: Path, out: Path, **options) -> None:
    """Convert SRC to .beton: SRC holding train/ (and val/) split folders gives OUT/train.beton (and
    OUT/val.beton); any other SRC is one split (class folders SRC/<class>/*.jpg, or any folder of JPEG, PNG and
    WebP images, flat or nested) and gives the file OUT."""
    require_backend("ffcv")  # one line saying how to install FFCV, before any work
    splits = [split for split in SPLITS if (src / split).is_dir()]
    if splits and out.suffix == ".beton":
        raise click.BadParameter(f"{src} holds the splits {', '.join(splits)}: give a folder", param_hint="OUT")
    if options["write_mode"] == "smart" and options["smart_threshold"] is None:
        raise click.BadParameter("smart mode needs a threshold in bytes", param_hint="--smart-threshold")
    jobs = [(src / split, out / f"{split}.beton") for split in splits] or [(src, out)]
    for split_dir, target in jobs:
        started = time.perf_counter()
        try:
            count = convert_split(split_dir, target, **options)
        except (FileNotFoundError, ValueError) as error:
            raise click.ClickException(str(error)) from error
        size = target.stat().st_size / 2**20
        seconds = time.perf_counter() - started
        click.echo(f"{split_dir} -> {target}: {count} images, {size:.1f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
