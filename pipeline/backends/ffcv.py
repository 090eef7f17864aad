"""FFCV backend: a .beton file read through FFCV's memory-mapped storage and numba-compiled pipeline, with our
own decoder that decodes each JPEG once and resizes the whole image (the original) and the two planned crop
windows out of that one decode (FFCV's stock decoders fuse one crop into every decode: one decode per view).

How the windows reach compiled code: numba freezes arrays a compiled function captures, but FFCV hands the
reader's metadata table to the decoder as an argument at every batch. Each epoch therefore gets a fresh
table with one row per scheduled sample (the image's storage pointer and size plus its views' windows), and
FFCV walks positions 0..n-1 of it. New windows (a new epoch, ContrastiveCrop's new boxes) reach the decoder
without recompiling or restarting anything, and an iterator still running keeps the table it started with.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as FfcvPipeline
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from pipeline.data import ImageList, subset
from pipeline.loader import Batch, Loader, to_batch

# FFCV's import sets torch to one thread: everything here imports FFCV first through pipeline.missing_backend
# (make_loader, load_splits, the converter; the tests' collection), which restores the count.

IMAGE_FIELD, LABEL_FIELD = "image", "label"
JPEG_MODE = int(IMAGE_MODES["jpg"])  # the other mode stores raw RGB
_decode_jpeg, _resize = Compiler.compile(imdecode), Compiler.compile(resize_crop)


def _stored_pixels(data, scratch, height, width, mode):
    """A stored image's uint8 (height, width, 3) pixels: a JPEG decoded into `scratch`, raw bytes reshaped."""
    if mode == JPEG_MODE:
        _decode_jpeg(data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
        return scratch[: 3 * height * width].reshape(height, width, 3)
    return data.reshape(height, width, 3)


_pixels = Compiler.compile(_stored_pixels)
_READ_ONLY_BYTES = numba.types.Array(numba.uint8, 1, "C", readonly=True)
# Fields of a stored image that a table row repeats for the image its last crop comes from.
_SECOND = {"data_ptr": "second_ptr", "height": "second_height", "width": "second_width", "mode": "second_mode"}


def _os_cache_state_type(self) -> numba.types.Tuple:
    return numba.types.Tuple([_READ_ONLY_BYTES, numba.uint64[::1], numba.uint64[::1]])


def _os_cache_reader(self):
    def read(address, state):  # FFCV's reader: the bytes of the sample stored at `address`
        size = state[2][np.searchsorted(state[1], address)]
        return state[0][address : address + size]

    return Compiler.compile(read, _READ_ONLY_BYTES(numba.uint64, self.state_type))


# FFCV 1.0.2's OSCacheManager builds its types by setting `.mutable = False` on numba's shared, interned
# `uint8[::1]`: that changes the type's hash under every dict keyed by it, and later compiles fail with a
# KeyError inside numba (a dead loader thread, a hang). Same types, built without mutating anything:
OSCacheManager.state_type = property(_os_cache_state_type)
OSCacheManager.compile_reader = _os_cache_reader


def read_beton(path: str | Path, limit: int = 0, seed: int = 0) -> ImageList:
    """The images of a .beton with an RGBImageField "image" and an IntField "label" (what `pipeline.convert`
    and ffcv-imagenet write); with limit > 0 a seeded subset chosen as `scan_split` chooses from a folder."""
    path = Path(path)
    check_complete(path)
    try:
        reader = Reader(str(path))
    except Exception as error:  # FFCV raises assertion/value errors or numpy's for foreign files
        raise ValueError(f"cannot read {path} as an FFCV .beton file: {error}") from error
    fields = reader.handlers
    if not isinstance(fields.get(IMAGE_FIELD), RGBImageField) or not isinstance(fields.get(LABEL_FIELD), IntField):
        found = ", ".join(f"{name} ({type(field).__name__})" for name, field in fields.items())
        raise ValueError(f"{path} must hold an RGBImageField 'image' and an IntField 'label'; it holds {found}")
    names = list(fields)
    images = reader.metadata[f"f{names.index(IMAGE_FIELD)}"]
    labels = reader.metadata[f"f{names.index(LABEL_FIELD)}"].astype(np.int64)
    ids = subset(len(labels), limit, seed)
    classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    return ImageList(
        paths=[],
        labels=labels[ids],
        heights=images["height"][ids].astype(np.int64),
        widths=images["width"][ids].astype(np.int64),
        classes=classes,
        beton=str(path),
        ids=ids.astype(np.int64),
    )


def check_complete(path: Path) -> None:
    """ValueError (one line) unless `path` is a whole .beton: FFCV's writer fills in the header's pointer to the
    allocation table last, so a file whose writer was killed (or is still writing) has none, or one past its end."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype=HeaderType, count=1) if size >= HeaderType.itemsize else None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error
    if header is None:
        raise ValueError(f"cannot read {path} as an FFCV .beton file: {size} bytes, shorter than its header")
    table = int(header[0]["alloc_table_ptr"])
    if table == 0 or table > size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise ValueError(
            f"{path} is an incomplete .beton (its conversion did not finish): convert the folder again with "
            "python -m pipeline.convert"
        )


class ViewsDecoder(Operation):
    """Decodes each image once (JPEG or raw) and resizes `views` windows of it to size x size.

    The windows (views, 4) = [top, left, height, width] in stored-image pixels come from the "window" column
    of the metadata row being decoded. A row whose "second_*" fields name another image (a SePP-ID pair
    sample) takes its last view from that image, decoded once into a second scratch buffer.
    The batch is written view-major, uint8 (views, n, size, size, 3), so each view is one contiguous NHWC
    block (channels_last after a permute, no copy); FFCV sees it as (n, views * size * size * 3). With
    `fresh` every batch gets new memory (CPU: the trainer's tensors are never overwritten by later batches);
    without it the batch goes into FFCV's pinned buffers, the source of its asynchronous copy to the GPU.
    """

    def __init__(self, size: int, views: int, fresh: bool, pairs: bool = False) -> None:
        super().__init__()
        self.size, self.views, self.fresh, self.pairs = size, views, fresh, pairs

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        largest = np.uint64(self.metadata["height"].max()) * np.uint64(self.metadata["width"].max())
        # views = 0 decodes only (a benchmark) and gives one byte per sample: FFCV needs a non-empty output.
        shape, uint8 = (max(1, self.views * self.size * self.size * 3),), np.dtype("u1")
        state = replace(previous_state, jit_mode=True, shape=shape, dtype=uint8)
        # FFCV's output slots (unused when fresh), and one scratch image per sample: the decode views come from.
        output = AllocationQuery((1,) if self.fresh else shape, uint8)
        scratch = AllocationQuery((largest * np.uint64(3),), uint8)
        second = scratch if self.pairs else AllocationQuery((1,), uint8)  # untouched without pair samples
        return state, (output, scratch, second)

    def generate_code(self):
        read, pixels, resize = self.memory_read, _pixels, _resize
        loop, views, size, fresh = Compiler.get_iterator(), self.views, self.size, self.fresh

        def decode(positions, buffers, table, storage_state):
            slots, scratch, second_scratch = buffers
            n = len(positions)
            if views == 0:
                out = np.zeros((1, n, 1, 1, 1), dtype=np.uint8)
            elif fresh:
                out = np.empty((views, n, size, size, 3), dtype=np.uint8)
            else:
                out = slots.reshape(-1)[: views * n * size * size * 3].reshape(views, n, size, size, 3)
            for k in loop(n):
                row = table[positions[k]]
                data = read(row["data_ptr"], storage_state)
                height, width = np.uint32(row["height"]), np.uint32(row["width"])
                image = pixels(data, scratch[k], height, width, row["mode"])
                window = row["window"]
                for v in range(views):
                    source = image
                    if v == views - 1 and row["second_ptr"] != row["data_ptr"]:
                        data = read(row["second_ptr"], storage_state)
                        h2, w2 = np.uint32(row["second_height"]), np.uint32(row["second_width"])
                        source = pixels(data, second_scratch[k], h2, w2, row["second_mode"])
                    top, left = window[v, 0], window[v, 1]
                    resize(source, top, top + window[v, 2], left, left + window[v, 3], out[v, k])
            return out.reshape(n, -1)

        decode.is_parallel = True
        return decode


class _EpochPositions(TraversalOrder):
    """FFCV calls a custom order object with its Loader; this one then walks positions 0..n-1 of the epoch's
    table. FFCV caps an epoch at the length seen at construction: the split's size plus its pair samples."""

    def __init__(self, count: int) -> None:
        self.positions = np.arange(count, dtype=np.uint64)

    def __call__(self, _loader) -> _EpochPositions:
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.positions


class FfcvLoader(Loader):
    def __init__(self, images: ImageList, *args, **kwargs) -> None:
        if images.beton is None:
            raise ValueError("the ffcv loader reads .beton files: convert the folder with python -m pipeline.convert")
        super().__init__(images, *args, **kwargs)
        if self.interpolation != "bilinear":
            raise ValueError(
                f"the ffcv loader cannot resize {self.interpolation}: its decoder has libffcv's resize, OpenCV's "
                "area filter and no other; use --loader dali or torchvision on the image folder"
            )
        self._views = self.original + self.crops
        self._positions = _EpochPositions(len(images) + (0 if self.pairs is None else len(self.pairs)))
        cuda = self.device.type == "cuda"
        to_device = [ToDevice(self.device, non_blocking=True)] if cuda else []
        threads = torch.get_num_threads()  # FFCV sets torch's thread count to its worker count
        self._pipeline = FfcvPipeline(
            images.beton,
            batch_size=self.batch_size,
            num_workers=max(1, self.worker_count),
            order=self._positions,
            os_cache=True,  # memory-mapped file, shared with the page cache (see the fix above)
            drop_last=False,  # the schedule already holds whole batches when training
            batches_ahead=2,
            pipelines={
                IMAGE_FIELD: PipelineSpec(
                    IMAGE_FIELD,
                    decoder=ViewsDecoder(self.image_size, self._views, fresh=not cuda, pairs=self.pairs is not None),
                    transforms=[ToTensor(), *to_device],
                ),
                **{name: None for name in Reader(images.beton).handlers if name != IMAGE_FIELD},
            },
        )
        torch.set_num_threads(threads)
        # The compiled code reads the image field's column by its position in the file, "f<index>".
        self._column = f"f{list(self._pipeline.reader.handlers).index(IMAGE_FIELD)}"
        stored = self._pipeline.reader.metadata[self._column]
        self._stored = stored[images.ids]
        columns = [(name, stored.dtype[name]) for name in stored.dtype.names]
        window = ("window", "<i4", (max(1, self._views), 4))  # numpy drops a zero-length axis: keep one
        second = [(field, stored.dtype[name]) for name, field in _SECOND.items()]
        self._table_dtype = np.dtype([(self._column, [*columns, window, *second])])

    def _table(self, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None) -> np.ndarray:
        """One metadata row per scheduled sample: its stored image, the windows of its views and the image its
        last crop comes from (itself unless it is a pair sample)."""
        table = np.empty(len(order), dtype=self._table_dtype)
        rows = table[self._column]
        for name in self._stored.dtype.names:
            rows[name] = self._stored[name][order]
        for name, field in _SECOND.items():
            rows[field] = self._stored[name][order if second is None else second]
        whole = np.zeros((len(order), int(self.original and not self.original_crop), 4), dtype=np.int32)
        whole[:, :, 2], whole[:, :, 3] = self.images.heights[order, None], self.images.widths[order, None]
        crops = np.zeros((len(order), 0, 4)) if windows is None else windows
        if self._views:
            rows["window"] = np.concatenate([whole, crops.astype(np.int32)], axis=1)
        return table

    def _batches(self, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None) -> Iterator[Batch]:
        # A new table per epoch: the running compiled code reads it through the metadata argument.
        self._pipeline.reader.metadata = self._table(order, windows, second)
        self._positions.positions = np.arange(len(order), dtype=np.uint64)
        threads = torch.get_num_threads()
        epoch = iter(self._pipeline)
        torch.set_num_threads(threads)
        # FFCV's worker thread dying (an exception in compiled code) would leave us waiting on its queue
        # forever: a watcher ends the iteration instead, and the count below turns that into an error.
        threading.Thread(target=lambda: (epoch.join(), epoch.output_queue.put(None)), daemon=True).start()
        labels, indices = torch.from_numpy(self.images.labels[order]), torch.from_numpy(order.astype(np.int64))
        done, cuda = 0, self.device.type == "cuda"
        try:
            for block, *_ in epoch:
                n, size = len(block), self.image_size
                views = block.view(self._views, n, size, size, 3) if self._views else block[:0]  # view-major
                if cuda:  # FFCV reuses its GPU buffers for later batches
                    views = views.clone()
                part = slice(done, done + n)
                done += n
                yield to_batch(self, list(views), labels[part], indices[part])
        finally:
            # An abandoned epoch's thread may be blocked putting a batch (or its final None, which FFCV puts
            # without a timeout) into the full queue: drain it until the thread has ended, then close.
            epoch.terminate_event.set()
            while epoch.is_alive():
                with contextlib.suppress(queue.Empty):
                    epoch.output_queue.get(timeout=0.05)
            epoch.close()
            # FFCV's finished worker thread leaves frames in a reference cycle with its EpochIterator, so the
            # epoch's buffers (batch slots and decode scratch, ~37 MiB at 224 px) waited for the cyclic GC:
            # RSS grew by that much per epoch. The thread is gone: nothing reads them any more.
            epoch.memory_allocations = None
        if done < len(order):
            raise RuntimeError(f"FFCV's loader thread stopped after {done} of {len(order)} images (error above)")

    def close(self) -> None:
        self._pipeline = None
