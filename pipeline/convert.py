"""Convert a folder of images to FFCV .beton files, once, for `train.py --loader ffcv`.

    python -m pipeline.convert data/fashion-mnist data/fashion-mnist-ffcv    # DATA/{train,val} -> OUT/{train,val}.beton
    python -m pipeline.convert /imagenet/train /ffcv/train.beton --max-resolution 256   # one split -> one file
    python pipeline/convert.py ~/photos photos.beton                  # any folder of images, unlabelled: -> one file

Each file holds an RGBImageField "image" (downscaled so its longest side is at most --max-resolution; PNG and WebP
files are decoded and stored like JPEGs, as --write-mode says) and an IntField "label": the class folder's index in
sorted order, or -1 for every image of a folder without labels (--labels, as train.py's). Images keep the folder's
sorted order, so a seeded --train-limit picks the same images from the folder and from the .beton.
--labels and --skip-bad are train.py's settings (model/config.py); --workers here counts writer processes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import time
from pathlib import Path

import click
import cv2
import numpy as np
from PIL import Image

from model.config import option
from pipeline import require_backend
from pipeline.data import ImageList, scan_split, select, to_rgb
from pipeline.verify import decode_error, jpeg_warning

SPLITS = ("train", "val")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")


class _Decoded:
    """Item i -> (uint8 RGB HWC image, label) for FFCV's writer processes, no longer side than `max_resolution`.

    A file that cannot be decoded is flagged in shared memory and replaced by a 1-pixel image: an exception
    in a writer process would leave FFCV's writer waiting forever, so the caller checks the flags instead.
    `owner` and `stored` (shared too) say which writer process took each image and whether it is written:
    when a process dies, the images it held are the ones it took and did not store.
    """

    DECODE, STORE = 1, 2  # `failed` flags: the file does not decode; FFCV's encoder failed on its pixels

    def __init__(self, images: ImageList, max_resolution: int) -> None:
        self.images, self.max_resolution = images, max_resolution
        self.failed = multiprocessing.Array("b", len(images), lock=False)
        self.owner = multiprocessing.Array("i", len(images), lock=False)
        self.stored = multiprocessing.Array("b", len(images), lock=False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        self.owner[i] = os.getpid()
        label = int(self.images.labels[i])
        try:  # a full decode: a JPEG whose header and end marker are intact but whose data is broken fails here
            with Image.open(self.images.paths[i]) as file:
                if self.max_resolution:
                    # Let the JPEG decoder skip detail the stored size cannot keep (DCT scaling, >= the target).
                    scale = self.max_resolution / max(file.size)
                    if scale < 1:
                        file.draft("RGB", (math.ceil(file.width * scale), math.ceil(file.height * scale)))
                pixels = shrink(np.asarray(to_rgb(file)), self.max_resolution)
            # PIL decodes a JPEG with broken entropy data as garbled pixels: libjpeg-turbo's warning tells.
            if file.format != "JPEG" or jpeg_warning(self.images.paths[i]) is None:
                return pixels, label
        except Exception:  # PIL raises several unrelated types for broken files
            pass
        self.failed[i] = self.DECODE
        return np.zeros((1, 1, 3), dtype=np.uint8), label


def shrink(image: np.ndarray, max_resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) downscaled so that its longer side is at most `max_resolution` (0: as it is), as FFCV's
    writer would (OpenCV's area filter, sides rounded down), but no side below 1 pixel: FFCV's own resize asks
    OpenCV for a 0-pixel side when an image is over `max_resolution` times longer than wide, and its writer
    process dies."""
    height, width = image.shape[:2]
    if not max_resolution or max(height, width) <= max_resolution:
        return image
    ratio = max_resolution / max(height, width)
    size = (max(1, int(ratio * width)), max(1, int(ratio * height)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class WriterDied(Exception):
    """A writer process ended without finishing its share (killed, out of memory, a crash in native code)."""

    def __init__(self, pid: int, exitcode: int) -> None:
        super().__init__(f"FFCV's writer process {pid} ended with exit code {exitcode}")
        self.pid, self.exitcode = pid, exitcode


def _store_samples(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue, dataset):
    """FFCV 1.0.2's `worker_job_indexed_dataset`, with each sample's encode guarded: an image FFCV cannot store is
    flagged (`_Decoded.STORE`) and stored as 1 pixel, so the writer finishes and the caller names the file."""
    from ffcv.writer import handle_sample

    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    names = metadata_type.names
    with allocator:  # every page this process filled is written to the file at the end
        while (chunk := input_queue.get()) is not None:
            for destination, source in chunk:
                image, label = dataset[source]
                try:
                    handle_sample((image, label), destination, names, metadata, allocator, fields)
                except Exception:  # an encoder's error: OpenCV's, FFCV's own checks
                    dataset.failed[source] = _Decoded.STORE
                    blank = np.zeros((1, 1, 3), dtype=np.uint8)
                    handle_sample((blank, label), destination, names, metadata, allocator, fields)
                dataset.stored[source] = 1
            with done_number.get_lock():
                done_number.value += len(chunk)
    allocations_queue.put(allocator.allocations)


def _writer_class():
    """FFCV's DatasetWriter whose wait for its processes ends when one of them dies (`WriterDied`): FFCV 1.0.2
    waits for a count of written samples that a dead process never adds to, forever."""
    import ctypes
    from multiprocessing import Process, Queue, Value

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class Writer(DatasetWriter):
        def from_indexed_dataset(self, dataset: _Decoded, chunksize: int = 100) -> None:
            indices = list(enumerate(range(len(dataset))))
            self._write_common(len(indices), chunks(indices, chunksize), _store_samples, (dataset,))

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):  # FFCV's, watched
            self.num_samples = num_samples
            self.prepare()
            work, allocations = Queue(), Queue()
            for todo in queue_content:
                work.put(todo)
            for _ in range(self.num_workers):
                work.put(None)
            done = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations)
            processes = [Process(target=work_fn, args=(*args, *extra_worker_args)) for _ in range(self.num_workers)]
            try:
                for process in processes:
                    process.start()
                with tqdm(total=self.num_samples) as progress:
                    while progress.n < self.num_samples:
                        for process in processes:
                            if process.exitcode not in (None, 0):
                                raise WriterDied(process.pid, process.exitcode)
                        if done.value > progress.n:
                            progress.update(done.value - progress.n)
                        time.sleep(0.1)
                allocation_list = []
                for _ in processes:
                    while True:  # each process puts its allocations once: wait for them, unless it died
                        try:
                            allocation_list.extend(allocations.get(timeout=1))
                            break
                        except queue.Empty:
                            for process in processes:
                                if process.exitcode not in (None, 0):
                                    raise WriterDied(process.pid, process.exitcode) from None
                self.finalize(allocation_list)
            finally:
                for process in processes:
                    if process.is_alive():
                        process.terminate()
                    process.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return Writer


def partial_path(out: Path) -> Path:
    """Where a conversion writes before it is complete: OUT.partial beside OUT (renamed to OUT at the end)."""
    return out.with_name(out.name + ".partial")


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
    publish: bool = True,
) -> int:
    """Write the images under SPLIT (class folders SPLIT/<class>/*.jpg, or any folder of images, labelled as
    `labels` says; see `pipeline.data.scan_split`) to `out` (.beton); returns the image count. The file is
    written as `partial_path(out)` and renamed to `out` only once complete (`publish=False` leaves that to the
    caller): a failed or killed conversion never touches an `out` already there. Files that cannot be decoded
    or stored raise ValueError naming every one (the index pass finds those with a bad header before anything
    is written; the others fail the writer's full decode), or with `skip_bad` are left out and printed (those
    the writer found by writing the file again without them). A writer process that dies ends the conversion
    with a ValueError naming the file it held. BackendUnavailable without FFCV."""
    require_backend("ffcv")  # FFCV is optional: imported here, not when this module is (keeps torch's threads)

    images = scan_split(split_dir, skip_bad=skip_bad, labels=labels)
    for path, reason in images.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    options = (max_resolution, write_mode, jpeg_quality, compress_probability, smart_threshold, workers)
    kept = f"; {out} is unchanged" if out.exists() else ""
    try:
        failed = _write(images, partial, *options)
        if failed and skip_bad:
            for i, reason in failed.items():
                click.echo(f"skipped {images.paths[i]}: {reason}", err=True)
            if len(failed) == len(images):
                raise ValueError(f"none of the {len(images)} images of {split_dir} decodes{kept}")
            images = select(images, np.setdiff1d(np.arange(len(images)), list(failed)))
            failed = _write(images, partial, *options)  # nothing new fails: the same decoder
        if failed:
            listed = "\n  ".join(f"{images.paths[i]}: {reason}" for i, reason in failed.items())
            raise ValueError(
                f"cannot convert {len(failed)} image(s) of {split_dir}; nothing written{kept} (--skip-bad leaves "
                f"them out):\n  {listed}"
            )
    except BaseException:  # an error, Ctrl-C: no partial file stays behind
        partial.unlink(missing_ok=True)
        raise
    if publish:
        os.replace(partial, out)
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
) -> dict[int, str]:
    """Write `images` to `out`; returns {position: why} of those that failed to decode or to be stored (stored
    as 1 pixel). A writer process that dies raises ValueError naming the image it held."""
    from ffcv.fields import IntField, RGBImageField

    source = _Decoded(images, max_resolution)
    field = RGBImageField(
        write_mode=write_mode,
        max_resolution=max_resolution or None,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
        smart_threshold=smart_threshold,
    )
    writer = _writer_class()(
        str(out),
        {"image": field, "label": IntField()},
        page_size=page_size(images, max_resolution),
        num_workers=workers or min(len(images), os.cpu_count() or 1),
    )
    try:
        writer.from_indexed_dataset(source, chunksize=max(1, min(100, len(images) // max(1, writer.num_workers))))
    except WriterDied as died:
        held = [images.paths[i] for i in range(len(images)) if source.owner[i] == died.pid and not source.stored[i]]
        what = f"while storing {', '.join(held)}" if held else "before it took an image"
        raise ValueError(f"{died} {what}; nothing written") from None
    failed = np.frombuffer(source.failed, dtype=np.int8)
    reasons = {}
    for i in np.flatnonzero(failed).tolist():
        if failed[i] == _Decoded.DECODE:
            reasons[i] = decode_error(images.paths[i]) or "does not decode"
        else:
            reasons[i] = f"FFCV cannot store it ({_store_error(source, field, i)})"
    return reasons


def _store_error(source: _Decoded, field, i: int) -> str:
    """Why FFCV's encoder failed on image `i` of `source`, found again in this process (one line)."""
    try:
        destination = np.zeros(1, dtype=field.metadata_type)
        field.encode(destination, source[i][0], lambda size: (0, np.empty(size, dtype=np.uint8)))
    except Exception as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    return "it failed in the writer process only"


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
@option("skip_bad", help="Leave out (and list) images no loader can decode instead of stopping.")
@option(
    "labels",
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
    done = []
    try:
        for split_dir, target in jobs:  # every split to OUT.partial first: OUT's files change together or not at all
            started = time.perf_counter()
            count = convert_split(split_dir, target, **options, publish=False)
            done.append((split_dir, target, count, time.perf_counter() - started))
    except (FileNotFoundError, ValueError) as error:
        for _, target, _, _ in done:
            partial_path(target).unlink(missing_ok=True)
        raise click.ClickException(str(error)) from error
    for split_dir, target, count, seconds in done:
        os.replace(partial_path(target), target)
        size = target.stat().st_size / 2**20
        click.echo(f"{split_dir} -> {target}: {count} images, {size:.1f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
