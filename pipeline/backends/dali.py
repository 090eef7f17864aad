"""DALI backend: an external source that serves each scheduled sample (bytes, crop windows, label, index),
one decode per image (`mixed` = nvJPEG on the GPU when CUDA is present, else CPU with device_id=None), then
one resize per view straight from the decoded image: the whole image for the original, the crop window's ROI
for each crop. Outputs stay HWC, so the NCHW tensors the trainer sees are channels_last without a copy.

The external source runs in the thread that asks DALI for a batch (the trainer's); the files themselves are
read by a thread pool, the next batches' while the current one trains, so that thread only hands DALI
bytes already in memory.

DALI cannot skip a sample inside a pipeline (DALI issue 3913): a file its decoder rejects fails the whole
pipeline ("Critical error in pipeline ... Failed to decode sample #k"), which is unusable afterwards. The
iterator's error is caught here, the pipeline rebuilt, and `Undecodable` raised with DALI's sample number; the
loader finds the bad files of that batch and serves it again without them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.loader import Batch, Loader, Undecodable, machine_workers, to_batch

# NVIDIA's DALI ResNet-50 example (docs/examples/use_cases/pytorch/resnet50): nvJPEG's buffers sized for the
# largest ImageNet image up front, so no batch reallocates them; hw_decoder_load is the decoder's
# documented 0.65 (the share of images sent to the A100/H100 JPEG engine). The mixed decoder only.
MIXED_DECODER = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
    hw_decoder_load=0.65,
)
READ_AHEAD = 2  # batches whose files are read while the current one trains
# Resampling filters; with antialias DALI widens either filter's support when reducing, as PIL does.
INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def machine_threads(workers: int | None) -> tuple[int, int]:
    """(DALI threads, prefetch queue depth). `workers` given: that many threads, depth 2. None: this
    process's share of the cores it may run on (torchrun's processes on this node share them), less one
    for the trainer's thread; a queue of 3 where there are 8 or more cores to keep it full, else 2."""
    if workers is not None:
        return max(1, workers), 2
    threads = machine_workers()
    return threads, 3 if threads >= 7 else 2


def _read(path: str | None) -> np.ndarray:
    return _EMPTY if path is None else np.fromfile(path, dtype=np.uint8)


class _ScheduledSource:
    """Batch-mode external source over one epoch's schedule: call k returns the k-th batch, then StopIteration.

    The schedule is replaced only between epochs (before the iterator is reset), so DALI's prefetching never
    sees a half-updated plan. Call k submits the reads of batches k+1 .. k+READ_AHEAD to `readers` threads
    before it waits for batch k's (already submitted by an earlier call, or by `start`).
    """

    def __init__(self, loader: Loader, readers: int) -> None:
        self.paths, self.labels, self.batch_size = loader.images.paths, loader.images.labels, loader.batch_size
        self.order, self.windows, self.next_batch = np.empty(0, np.int64), None, 0
        self.pairs, self.second = loader.pairs is not None, None
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="dali-read")
        self._reads: dict[int, list[Future]] = {}

    def start(self, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None = None) -> None:
        self.order, self.windows, self.second, self.next_batch = order, windows, second, 0
        self._reads = {}  # a previous epoch's reads finish unused
        for k in range(READ_AHEAD):
            self._submit(k)

    def _submit(self, k: int) -> None:
        """Queue the reads of batch k's files (pair samples: then their second images, None = not read)."""
        begin = k * self.batch_size
        indices = self.order[begin : begin + self.batch_size]
        if k in self._reads or len(indices) == 0:
            return
        paths = [self.paths[i] for i in indices]
        if self.pairs:
            second = self.second[begin : begin + len(indices)]
            paths += [self.paths[b] if a != b else None for a, b in zip(indices, second)]
        self._reads[k] = [self._pool.submit(_read, path) for path in paths]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self):
        k = self.next_batch
        begin = k * self.batch_size
        indices = self.order[begin : begin + self.batch_size]
        if len(indices) == 0:
            raise StopIteration
        self.next_batch += 1
        for each in range(k, k + READ_AHEAD + 1):
            self._submit(each)
        files = [read.result() for read in self._reads.pop(k)]
        jpegs = files[: len(indices)]
        labels = [np.array(self.labels[i], dtype=np.int64) for i in indices]
        positions = [np.array(i, dtype=np.int64) for i in indices]
        seconds = []
        if self.pairs:  # pair samples: the second image's bytes and a flag; others an empty array, not decoded
            second = self.second[begin : begin + len(indices)]
            seconds = [files[len(indices) :], [np.array(a != b) for a, b in zip(indices, second)]]
        rois = []
        if self.windows is not None:
            windows = self.windows[begin : begin + len(indices)].astype(np.float32)  # (n, crops, 4) top, left, h, w
            for v in range(windows.shape[1]):
                rois += [list(windows[:, v, :2]), list(windows[:, v, :2] + windows[:, v, 2:])]
        return jpegs, *seconds, *rois, labels, positions


_EMPTY = np.zeros(0, dtype=np.uint8)


@pipeline_def(enable_conditionals=True)
def _views_pipeline(
    source: _ScheduledSource,
    decode_device: str,
    size: int,
    original: bool,
    crops: int,
    pairs: bool,
    original_crop: bool,
    interpolation: str,
):
    jpegs, *rest = fn.external_source(
        source=source, num_outputs=3 + 2 * (crops + original_crop) + 2 * pairs, batch=True, parallel=False
    )
    # No EXIF orientation (DALI applies it by default): the crop plan's windows are in stored pixels, as PIL and
    # FFCV decode; a rotated or mirrored decode moves them (out of bounds for orientations 5-8: sides swap).
    decode = partial(
        fn.decoders.image,
        device=decode_device,
        output_type=types.RGB,
        adjust_orientation=False,
        **(MIXED_DECODER if decode_device == "mixed" else {}),
    )
    images = decode(jpegs)
    sources = [images] * crops
    if pairs:  # a Python bool: the graph has this branch only for SePP-ID loaders
        second_jpegs, is_pair, *rest = rest
        # DALI's conditional runs the decoder on the pair samples only; the others reuse their one decode.
        if is_pair:
            second = decode(second_jpegs)
        else:
            second = images
        sources[-1] = second
    *rois, labels, indices = rest
    resize = partial(fn.resize, size=[size, size], interp_type=INTERPOLATION[interpolation], antialias=True)
    views = [resize(images)] if original and not original_crop else []
    if original_crop:  # the original's own window comes first
        start, end, *rois = rois
        views = [resize(images, roi_start=start, roi_end=end, roi_relative=False)]
    # ROI in (y, x) pixels of the decoded image: crop + resize in one op, no intermediate copy.
    views += [
        resize(image, roi_start=s, roi_end=e, roi_relative=False) for image, s, e in zip(sources, rois[::2], rois[1::2])
    ]
    if not views:  # decode only (a benchmark): the decoded shapes keep the decoder in the graph
        views = [images.shape()]
    return (*views, labels, indices)


class DaliLoader(Loader):
    def __init__(self, images, *args, **kwargs) -> None:
        super().__init__(images, *args, **kwargs)
        self.workers, self._depth = machine_threads(self.workers)
        self._source = _ScheduledSource(self, readers=self.workers)
        self._names = ["original"] * self.original + ["crop1", "crop2"][: self.crops] or ["shapes"]
        self._pipe = self._pipeline()
        self._iterator: DALIGenericIterator | None = None

    def _pipeline(self):
        cuda = self.device.type == "cuda"
        return _views_pipeline(
            source=self._source,
            decode_device="mixed" if cuda else "cpu",
            size=self.image_size,
            original=self.original,
            crops=self.crops,
            pairs=self.pairs is not None,
            original_crop=self.original_crop,
            interpolation=self.interpolation,
            batch_size=self.batch_size,
            num_threads=self.workers,
            device_id=(self.device.index or 0) if cuda else None,
            seed=self.seed,
            prefetch_queue_depth=self._depth,
        )

    def _batches(self, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None) -> Iterator[Batch]:
        self._source.start(order, windows, second)
        views = self._names if self._names != ["shapes"] else []
        try:
            if self._iterator is None:  # building the iterator already prefetches from the schedule just set
                self._iterator = DALIGenericIterator(
                    self._pipe,
                    [*self._names, "label", "index"],
                    auto_reset=False,
                    last_batch_policy=LastBatchPolicy.PARTIAL,
                )
            else:
                self._iterator.reset()
            while True:
                try:
                    (outputs,) = next(self._iterator)
                except StopIteration:
                    return
                yield to_batch(self, [outputs[name] for name in views], outputs["label"], outputs["index"])
        except RuntimeError as error:  # "Critical error in pipeline": this pipeline can serve nothing more
            self._iterator = None
            del self._pipe
            self._pipe = self._pipeline()
            sample = re.search(r"Failed to decode sample #(\d+)", str(error))
            lines = [line.strip() for line in str(error).splitlines() if "decode" in line.lower()]
            cause = f"DALI: {lines[-1] if lines else str(error).splitlines()[0]}"
            raise Undecodable(sample=int(sample.group(1)) if sample else None, cause=cause) from error

    def close(self) -> None:
        self._iterator = None
        del self._pipe
        self._source.close()
