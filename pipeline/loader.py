"""The batch contract shared by every backend: `Batch`, the epoch `Schedule` and the `Loader` base class.

Backends (pipeline/backends/) subclass `Loader`; `pipeline.backends.make_loader` builds one by name. This
module imports none of them.

A training step gets a `Batch`: the original view (whole image resized to S x S, never cropped), crop 1 and
crop 2 (RandomResizedCrop or ContrastiveCrop windows from the shared crop plan), each uint8 (N, 3, S, S) in
channels_last memory on the training device, plus labels and sample indices (int64, (N,)). `view_count`
(`LoaderSpec`) says which a training pass makes, and the others are None: 3 = original + both crops (LeOCLR),
2 = both crops (MoCo-v2), 1 = crop 1, 0 = none (decode only, for benchmarks). Crop k's window does not depend
on it.
An evaluation pass (`train=False`) yields one view per image, in file order, with nothing dropped: the
original (`eval_view="original"`), or as crop 1 the center crop ("center") or a random crop of LeOCLR's
crop test ("random", drawn from the seed and the epoch).
Each image is decoded once per step whatever the number of views.

A file that fails to decode mid-epoch (a JPEG whose header and end marker are intact but whose data is broken
passes the index pass) does not end the epoch: the backend raises `Undecodable`, the file goes into the run's
`BadFiles` (named on stderr), and the batch is served again from its position with, in training, each sample
that read it replaced by another image (the epoch's dropped tail first, then a seeded draw of the others) with
that image's own windows of the epoch's plan: batches keep their size (split BN, the queue and the ranks'
gathers need it) and the batch's other samples are unchanged. Evaluation passes leave the file out (a smaller
batch). A file in `BadFiles` stays out of every later schedule of every loader sharing it.

With `pairs` (SePP-ID's semantic positive pairs, (P, 2) image indices) a training epoch runs over N + P
samples: every image as usual, and every pair (a, b) as an extra sample whose crop 1 (and original) come
from a and crop 2 from b, with crop windows of their own; a pair sample decodes its two images once each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import click
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
from pipeline.verify import decode_error

EVAL_VIEWS = ("original", "center", "random")
# How a window is resized to S x S: bilinear (training, the kNN monitor, the linear protocols) or bicubic (LeOCLR
# Table 7's crop test). FFCV's decoder has only OpenCV's area filter and refuses bicubic.
INTERPOLATIONS = ("bilinear", "bicubic")


def machine_workers() -> int:
    """Loader workers when none are asked for: this process's share of the cores it may run on (torchrun's
    processes on this node share them), less one for the trainer's own thread; at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)


@dataclass(frozen=True)
class LoaderSpec:
    """How a loader serves a split, by which backend: everything `Loader` takes but the images, the pairs and
    the run's shared `BadFiles`. One spec per run (see run/parts.py's `loader_spec`), varied with `but`.

    `train`: the training schedule (shuffled, augmented windows, last partial batch dropped) or an evaluation
    pass; `view_count` the views of a training batch (the module docstring's: 3, 2, 1 or 0);
    `eval_view` what an evaluation pass yields; `crop_fraction` the center crop's side over the shorter side;
    `original_crop` LeOCLR's Table 8 cropped original; `rank` and `world` this process's share; `crop_scale`
    RandomResizedCrop's area fractions; `interpolation` how each view is resized to `image_size` x
    `image_size`."""

    backend: str
    image_size: int
    batch_size: int
    device: torch.device
    train: bool = True
    seed: int = 0
    workers: int | None = 2
    view_count: int = 3
    eval_view: str = "original"
    crop_fraction: float = 0.875
    original_crop: bool = False
    rank: int = 0
    world: int = 1
    crop_scale: tuple[float, float] = SCALE
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")
        if self.view_count not in (0, 1, 2, 3):
            raise ValueError(f"views must be 0, 1, 2 or 3, not {self.view_count}")
        if self.eval_view not in EVAL_VIEWS:
            raise ValueError(f"eval_view must be one of {', '.join(EVAL_VIEWS)}, not {self.eval_view!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, not {self.crop_scale}")
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))

    def but(self, **changes) -> LoaderSpec:
        """This spec with `changes` (field names) changed."""
        return dataclasses.replace(self, **changes)


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


class BadFiles:
    """Files found undecodable while a run reads them, path -> reason: shared by a run's loaders, so a file one of
    them finds stays out of all of them. `pending` holds what was added since the trainer last took it
    (`take_pending`: it writes RUN_DIR/bad_files.txt and tells the other ranks)."""

    def __init__(self, known: Iterable[tuple[str, str]] = ()) -> None:
        self.reasons: dict[str, str] = dict(known)
        self.pending: list[tuple[str, str]] = []
        self.version = 0  # bumped by every addition: loaders recompute their masks

    def add(self, path: str, reason: str, found_here: bool = True) -> bool:
        """Record a file (False when already known). Found here: named on stderr and pending; from another rank:
        that rank named it."""
        if path in self.reasons:
            return False
        self.reasons[path] = reason
        self.version += 1
        if found_here:
            self.pending.append((path, reason))
            click.echo(f"undecodable {path}: {reason}; left out for the rest of the run", err=True)
        return True

    def take_pending(self) -> list[tuple[str, str]]:
        pending, self.pending = self.pending, []
        return pending

    def mask(self, paths: list[str]) -> np.ndarray | None:
        """(len(paths),) bool: which of these files are known bad; None when none is."""
        if not self.reasons or not paths:
            return None
        bad = np.fromiter((p in self.reasons for p in paths), dtype=bool, count=len(paths))
        return bad if bad.any() else None


class Undecodable(Exception):
    """Raised by a backend's `_batches` when the next batch cannot be decoded: `found` maps the images (indices
    into the split) that failed to why, when the backend knows; otherwise the loader decodes that batch's files
    with PIL to find them, and falls back to `sample` (the failing sample's place in the batch, if the backend's
    error named it). The backend is ready to serve again when it raises this."""

    def __init__(self, found: dict[int, str] | None = None, sample: int | None = None, cause: str = "") -> None:
        super().__init__(cause)
        self.found, self.sample, self.cause = found or {}, sample, cause


class Loader:
    """Base of every backend: owns the epoch schedule (sample order + crop windows), backends apply it.

    Subclasses implement `_batches(order, windows, second)` as `Schedule`'s fields.
    """

    def __init__(
        self,
        images: ImageList,
        spec: LoaderSpec,
        pairs: np.ndarray | None = None,
        bad_files: BadFiles | None = None,
    ) -> None:
        train, views = spec.train, spec.view_count
        if train and len(images) < spec.batch_size * spec.world:
            raise ValueError(
                f"{len(images)} training images cannot fill one batch of {spec.batch_size} x {spec.world} ranks"
            )
        self.spec = spec
        # Distributed: this rank's share of every global batch (training) or a contiguous part (evaluation).
        self.rank, self.world = spec.rank, spec.world
        # Area fractions of training crops (RandomResizedCrop's scale) and how every view is resized to S x S.
        self.crop_scale, self.interpolation = spec.crop_scale, spec.interpolation
        self.images, self.image_size, self.batch_size = images, spec.image_size, spec.batch_size
        self.device, self.train, self.seed, self.workers = spec.device, train, spec.seed, spec.workers
        eval_view = spec.eval_view
        # What each sample yields: the original view or not, and how many crops (0-2).
        self.eval_view, self.crop_fraction = eval_view, spec.crop_fraction
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
        self.original_crop = spec.original_crop and self.original and train
        if self.original_crop and self.pairs is not None:
            raise ValueError("a cropped original and semantic pairs do not combine")
        # Files found undecodable (shared by a run's loaders) and this split's mask of them, by version.
        self.bad_files = BadFiles() if bad_files is None else bad_files
        self._bad_mask: tuple[int, np.ndarray | None] = (-1, None)

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
        schedule, bad = self._global_schedule(epoch), self._bad()
        if bad is not None and self.train:
            schedule = self._replace_bad(schedule, epoch, bad)
        if self.world > 1:
            positions = np.arange(len(schedule.order))
            if self.train:
                mine = positions.reshape(-1, self.world, self.batch_size)[:, self.rank].reshape(-1)
            else:
                mine = np.array_split(positions, self.world)[self.rank]
            schedule = Schedule(*(None if part is None else part[mine] for part in schedule))
        if bad is not None and not self.train:  # this rank's files without them: the others keep their places
            keep = ~bad[schedule.order]
            schedule = Schedule(*(None if part is None else part[keep] for part in schedule))
        return schedule

    def _bad(self) -> np.ndarray | None:
        """(N,) bool: this split's images in `bad_files`; None when there are none."""
        if self._bad_mask[0] != self.bad_files.version:
            self._bad_mask = (self.bad_files.version, self.bad_files.mask(self.images.paths))
        return self._bad_mask[1]

    def _replace_bad(self, schedule: Schedule, epoch: int, bad: np.ndarray) -> Schedule:
        """The training schedule with every sample that reads a bad image (either of a pair's) replaced by an
        image sample: first the good images of the epoch's dropped tail (trained on by no other sample this
        epoch), then a seeded permutation of every good image; each with its own windows of the epoch's plan.
        Depends only on (seed, epoch, the bad set): every rank and a resumed run replace alike."""
        n, (order, windows, second) = len(self.images), schedule
        hit = bad[order] if second is None else bad[order] | bad[second]
        count = int(hit.sum())
        if not count:
            return schedule
        if bad.all():
            raise ValueError(f"every one of the {n} training images is undecodable")
        total = n + (0 if self.pairs is None else len(self.pairs))
        tail = epoch_order(total, self.seed, epoch)[len(order) :]
        tail = tail[tail < n]  # image samples only
        drawn = epoch_rng(self.seed, epoch, stream=4).permutation(n)
        candidates = np.concatenate([tail[~bad[tail]], drawn[~bad[drawn]]]).tolist()
        # Each replacement: the first candidate not yet taken and not in its global batch (no image twice in a
        # batch: in-batch negatives); with too few good images, any good image.
        batch, taken, picked = self.batch_size * self.world, set(), []
        for position in np.flatnonzero(hit):
            start = position - position % batch
            members = set(order[start : start + batch].tolist())
            choice = next((c for c in candidates if c not in taken and c not in members), None)
            choice = candidates[len(picked) % len(candidates)] if choice is None else choice
            taken.add(choice)
            picked.append(choice)
        picked = np.asarray(picked, dtype=np.int64)
        order = order.copy()
        order[hit] = picked
        if second is not None:
            second = second.copy()
            second[hit] = picked
        if windows is not None:
            views = 3 if self.original_crop else 2  # as `_global_schedule` draws them
            heights, widths = self.images.heights, self.images.widths
            plan = crop_plan(heights, widths, self.seed, epoch, views=views, boxes=self.boxes, alpha=self.alpha)[picked]
            windows = windows.copy()
            windows[hit] = (
                np.concatenate([plan[:, 2:], plan[:, : self.crops]], 1) if self.original_crop else plan[:, : self.crops]
            )
        return Schedule(order, windows, second)

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
        """Batches of one epoch in the contract's form, from batch `skip` on (a run resumed mid-epoch). A batch
        the backend cannot decode is served again without its bad files (see the module's docstring)."""
        step = skip
        while True:
            schedule = self.schedule(epoch)
            cut = step * self.batch_size
            batches = self._batches(*(None if part is None else part[cut:] for part in schedule))
            try:
                with contextlib.closing(batches):
                    for batch in batches:
                        yield batch
                        step += 1
                return
            except Undecodable as error:  # raised while fetching batch `step`
                self._leave_out(error, schedule, step * self.batch_size)

    def _leave_out(self, error: Undecodable, schedule: Schedule, cut: int) -> None:
        """Add the bad files of the batch from position `cut` of `schedule` to `bad_files`: those the backend
        named, else those PIL cannot decode, else the sample the backend's error named; an error otherwise."""
        found, rows = dict(error.found), slice(cut, cut + self.batch_size)
        if not self.images.paths:
            raise RuntimeError(f"a batch of {self.images.beton} could not be decoded: {error.cause}")
        if not found:
            second = schedule.order[rows] if schedule.second is None else schedule.second[rows]
            for image in dict.fromkeys([*schedule.order[rows].tolist(), *second.tolist()]):
                if (reason := decode_error(self.images.paths[image])) is not None:
                    found[image] = reason
        if not found and error.sample is not None and schedule.second is None:
            if error.sample < len(schedule.order[rows]):
                found[int(schedule.order[rows][error.sample])] = error.cause
        if not found:
            raise RuntimeError(f"a batch could not be decoded, yet PIL decodes each of its files: {error.cause}")
        added = [self.bad_files.add(self.images.paths[image], reason) for image, reason in found.items()]
        if not any(added):  # files already left out still failed: serving the batch again would loop
            raise RuntimeError(f"a batch still fails to decode without its known bad files: {error.cause}")

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
