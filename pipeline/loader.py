"""The batch contract shared by every backend: `Batch`, the epoch `Schedule` and the `Loader` base class.

Backends (pipeline/backends/) subclass `Loader`; `pipeline.backends.make_loader` builds one by name. This
module imports none of them.

A training step gets a `Batch`: the original view (whole image resized to S x S, never cropped), crop 1 and
crop 2 (RandomResizedCrop or ContrastiveCrop windows from the shared crop plan), each uint8 (N, 3, S, S) in
channels_last memory on the training device, plus labels and sample indices (int64, (N,)). `views` says
which a training pass makes, and the others are None: 3 = original + both crops (LeOCLR), 2 = both crops
(MoCo-v2), 1 = crop 1, 0 = none (decode only, for benchmarks). Crop k's window does not depend on `views`.
An evaluation pass (`train=False`) yields one view per image, in file order, with nothing dropped: the
original (`eval_view="original"`), or as crop 1 the center crop ("center") or a random crop of LeOCLR's
crop test ("random", drawn from the seed and the epoch).
Each image is decoded once per step whatever the number of views.

With `pairs` (SePP-ID's semantic positive pairs, (P, 2) image indices) a training epoch runs over N + P
samples: every image as usual, and every pair (a, b) as an extra sample whose crop 1 (and original) come
from a and crop 2 from b, with crop windows of their own; a pair sample decodes its two images once each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from pipeline.crop_plan import (
    SCALE,
    center_crop,
    crop_plan,
    epoch_order,
    epoch_rng,
    random_crop_test,
    random_resized_crop,
)
from pipeline.data import ImageList

EVAL_VIEWS = ("original", "center", "random")
# How a window is resized to S x S: bilinear (training, the kNN monitor, the linear protocols) or bicubic (LeOCLR
# Table 7's crop test). FFCV's decoder has only OpenCV's area filter and refuses bicubic.
INTERPOLATIONS = ("bilinear", "bicubic")


def machine_workers() -> int:
    """Loader workers when none are asked for: this process's share of the cores it may run on (torchrun's
    processes on this node share them), less one for the trainer's own thread; at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)


class Batch(NamedTuple):
    original: torch.Tensor | None
    crop1: torch.Tensor | None
    crop2: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor


class Schedule(NamedTuple):
    """One epoch's samples, as backends apply them."""

    order: np.ndarray  # (M,) int64: the image of each sample (its original, crop 1, label and index)
    windows: np.ndarray | None  # (M, crops, 4) crop windows (the cropped original's first), None without crops
    second: np.ndarray | None  # (M,) int64: the image crop 2 comes from; None = `order` (no pair samples)


class Loader:
    """Base of every backend: owns the epoch schedule (sample order + crop windows), backends apply it.

    Subclasses implement `_batches(order, windows, second)` as `Schedule`'s fields.
    """

    def __init__(
        self,
        images: ImageList,
        image_size: int,
        batch_size: int,
        device: torch.device,
        train: bool = True,
        seed: int = 0,
        workers: int | None = 2,
        views: int = 3,
        eval_view: str = "original",
        crop_fraction: float = 0.875,
        pairs: np.ndarray | None = None,
        original_crop: bool = False,
        rank: int = 0,
        world: int = 1,
        crop_scale: tuple[float, float] = SCALE,
        interpolation: str = "bilinear",
    ) -> None:
        if train and len(images) < batch_size * world:
            raise ValueError(f"{len(images)} training images cannot fill one batch of {batch_size} x {world} ranks")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        # Distributed: this rank's share of every global batch (training) or a contiguous part (evaluation).
        self.rank, self.world = rank, world
        if views not in (0, 1, 2, 3):
            raise ValueError(f"views must be 0, 1, 2 or 3, not {views}")
        if eval_view not in EVAL_VIEWS:
            raise ValueError(f"eval_view must be one of {', '.join(EVAL_VIEWS)}, not {eval_view!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, not {crop_scale}")
        # Area fractions of training crops (RandomResizedCrop's scale) and how every view is resized to S x S.
        self.crop_scale, self.interpolation = tuple(crop_scale), interpolation
        self.images, self.image_size, self.batch_size = images, image_size, batch_size
        self.device, self.train, self.seed, self.workers = device, train, seed, workers
        # What each sample yields: the original view or not, and how many crops (0-2).
        self.eval_view, self.crop_fraction = eval_view, crop_fraction
        whole = not train and eval_view == "original"
        self.original = views == 3 and train or whole
        self.crops = min(views, 2) if train else int(not whole)
        # ContrastiveCrop: (N, 4) boxes of the images (None = RandomResizedCrop) and the Beta parameter.
        # The next epoch's schedule uses whatever is set here: no backend needs restarting.
        self.boxes: np.ndarray | None = None
        self.alpha = 0.6
        if pairs is not None and (not train or self.crops < 2):
            raise ValueError("semantic pairs need a training loader that makes both crops")
        self.pairs = None if pairs is None else np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        # LeOCLR's Table 8 ablation: the "original" is a RandomResizedCrop of its own (a third window of the plan,
        # first in `windows`), not the whole image.
        self.original_crop = original_crop and self.original and train
        if self.original_crop and self.pairs is not None:
            raise ValueError("a cropped original and semantic pairs do not combine")

    @property
    def worker_count(self) -> int:
        """Worker threads/processes: as asked, or with `workers=None` the machine's `machine_workers()`."""
        return machine_workers() if self.workers is None else self.workers

    def __len__(self) -> int:
        """Steps per epoch: training drops the last partial (global) batch, evaluation keeps it."""
        if self.train:
            return (len(self.images) + (0 if self.pairs is None else len(self.pairs))) // (self.batch_size * self.world)
        return -(-len(np.array_split(np.arange(len(self.images)), self.world)[self.rank]) // self.batch_size)

    def schedule(self, epoch: int) -> Schedule:
        """This rank's samples of one epoch; the same for every backend given the seed. With several ranks,
        training batch k of rank r is the r-th slice of the global batch k of `world` x `batch_size` samples
        of the single-process schedule with that global batch (same order, same windows); evaluation gives
        each rank a contiguous part of the files."""
        schedule = self._global_schedule(epoch)
        if self.world == 1:
            return schedule
        positions = np.arange(len(schedule.order))
        if self.train:
            mine = positions.reshape(-1, self.world, self.batch_size)[:, self.rank].reshape(-1)
        else:
            mine = np.array_split(positions, self.world)[self.rank]
        return Schedule(*(None if part is None else part[mine] for part in schedule))

    def _global_schedule(self, epoch: int) -> Schedule:
        heights, widths = self.images.heights, self.images.widths
        if not self.train:
            order = np.arange(len(self.images))
            if self.eval_view == "original":
                return Schedule(order, None, None)
            if self.eval_view == "center":
                return Schedule(order, center_crop(heights, widths, self.crop_fraction)[:, None], None)
            windows = random_crop_test(heights, widths, epoch_rng(self.seed, epoch, stream=2))[:, None]
            return Schedule(order, windows, None)
        n, pairs = len(self.images), self.pairs
        samples = epoch_order(n + (0 if pairs is None else len(pairs)), self.seed, epoch)
        samples = samples[: len(self) * self.batch_size * self.world]
        views = 3 if self.original_crop else 2  # the third draw leaves the crops' windows as they were
        plan = crop_plan(
            heights, widths, self.seed, epoch, views=views, boxes=self.boxes, alpha=self.alpha, scale=self.crop_scale
        )
        if self.original_crop:
            return Schedule(samples, np.concatenate([plan[samples, 2:], plan[samples, : self.crops]], axis=1), None)
        if pairs is None:
            return Schedule(samples, plan[samples, : self.crops], None)
        # Pair samples get their own windows (on a, then on b), drawn in one go per epoch.
        rng, paired = epoch_rng(self.seed, epoch, stream=3), np.flatnonzero(samples >= n)
        first, second = samples.copy(), samples.copy()
        first[paired], second[paired] = pairs[samples[paired] - n, 0], pairs[samples[paired] - n, 1]
        windows = plan[samples.clip(max=n - 1)]
        for view, image in enumerate((first[paired], second[paired])):
            boxes = None if self.boxes is None else self.boxes[image]
            windows[paired, view] = random_resized_crop(
                heights[image], widths[image], rng, self.crop_scale, boxes=boxes, alpha=self.alpha
            )
        return Schedule(first, windows, second)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Batches of one epoch in the contract's form, from batch `skip` on (a run resumed mid-epoch)."""
        cut = skip * self.batch_size
        return self._batches(*(None if part is None else part[cut:] for part in self.schedule(epoch)))

    def _batches(self, order: np.ndarray, windows: np.ndarray | None, second: np.ndarray | None) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker threads/processes; the loader is unusable afterwards."""


def to_batch(loader: Loader, views_nhwc: list[torch.Tensor], labels: torch.Tensor, indices: torch.Tensor) -> Batch:
    """Backend output -> `Batch` on the loader's device: uint8 (N, S, S, 3) views, the original first when the
    loader makes it, become (N, 3, S, S) views whose strides are channels_last (a permute, no copy)."""
    move = dict(device=loader.device, non_blocking=True)
    views = [v.to(**move).permute(0, 3, 1, 2) for v in views_nhwc]
    original = views.pop(0) if loader.original else None
    crops = views + [None] * (2 - len(views))
    return Batch(original, crops[0], crops[1], labels.to(**move), indices.to(**move))
