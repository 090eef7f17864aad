"""ContrastiveCrop in a run (`ContrastiveCrop`): its boxes as the run gets them, from the reference localisation
pass or LeOCLR's training forward (--ccrop-boxes forward), their schedule, and the pictures of the views."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from model.board import Board
from model.config import Config
from model.distributed import sum_arrays
from model.localize import ForwardBoxes, localize
from model.precision import autocast
from pipeline.ccrop import forward_refresh_start, mean_box_area, update_epochs, whole_image_boxes
from pipeline.data import ImageList
from run.stop import StopSignals, stoppable_passes


def forward_boxes(
    cfg: Config, count: int, device: torch.device, box_updates: list[int], resume: dict | None
) -> ForwardBoxes | None:
    """--ccrop-boxes forward: the `count` images' boxes on `device`, refreshed by the steps of the epochs from
    `forward_refresh_start` on (the checkpoint's when resuming); None otherwise (the reference pass)."""
    if cfg.method.crop != "ccrop" or cfg.method.ccrop_boxes != "forward":
        return None
    state = None if resume is None else resume.get("forward_boxes")
    start = forward_refresh_start(box_updates)
    return ForwardBoxes(count, cfg.data.image_size, cfg.method.ccrop_k, device, start, state)


def box_pass(model, loader, cfg: Config, device: torch.device, signals: StopSignals | None = None) -> np.ndarray:
    """ContrastiveCrop's reference localisation pass: every training image's box (N, 4) float32 from the query
    encoder, each rank boxing its part of the images (zeros elsewhere: the sum over ranks is every box).
    `signals` as `knn_monitor`."""
    context = partial(autocast, device, cfg.optimisation.amp)
    [boxes] = stoppable_passes(
        signals, device, lambda stop: localize(model.query_encoder, loader, cfg.method.ccrop_k, context, stop)
    )
    return sum_arrays(boxes)


class ContrastiveCrop:
    """--crop ccrop as the run sees it, one interface whichever way the boxes come: the epochs that update them
    (`updates`), the update itself before such an epoch (`before_epoch`: the box pass, or the boxes the steps
    refreshed; whole-image boxes from the warm-up's end until the first update), the steps' refreshes with
    --ccrop-boxes forward (`maps`, `record`, `merge`), the boxes a checkpoint keeps and the pictures of the views.
    The training loader (`loaders.train`) samples its crop windows around `boxes`; without --crop ccrop nothing
    here acts and `boxes` stays None (RandomResizedCrop)."""

    def __init__(
        self,
        cfg: Config,
        loaders,
        images: ImageList,
        device: torch.device,
        resume: dict | None,
        signals: StopSignals,
        out: Path,
        main: bool,
        echo,
    ) -> None:
        self.cfg, self.loader, self.localize, self.images = cfg, loaders.train, loaders.localize, images
        self.device, self.signals, self.out, self.main, self.echo = device, signals, out, main, echo
        self.on, method = cfg.method.crop == "ccrop", cfg.method
        self.updates = (
            update_epochs(cfg.optimisation.epochs, method.ccrop_warmup, method.ccrop_interval) if self.on else []
        )
        self.live = forward_boxes(cfg, len(images), device, self.updates, resume)  # None: the reference pass

    @property
    def boxes(self) -> np.ndarray | None:
        """The training loader's boxes (N, 4) float32, or None (RandomResizedCrop)."""
        return self.loader.boxes

    def restore(self, resume: dict) -> None:
        self.loader.boxes = resume.get("boxes")

    def before_epoch(self, epoch: int, skip: int, model) -> None:
        """Before `epoch` (0-based), `skip` of its steps trained before: the update when it is one of `updates`
        (and the epoch starts afresh), written to RUN_DIR/boxes.npy; whole-image boxes past the warm-up while
        none exist. A stop signal in the box pass raises `Stopped` (every rank)."""
        if epoch in self.updates and not skip:
            if self.live is not None:  # as the training steps left them (merged at the last epoch's end)
                self.loader.boxes = self.live.host.copy()
            else:
                self.loader.boxes = box_pass(model, self.localize, self.cfg, self.device, self.signals)
            if self.main:
                np.save(self.out / "boxes.npy", self.loader.boxes)
            area = mean_box_area(self.loader.boxes)
            self.echo(f"ContrastiveCrop boxes updated before epoch {epoch + 1}: mean area {area:.3f}")
        elif self.on and epoch >= self.cfg.method.ccrop_warmup and self.loader.boxes is None:
            self.loader.boxes = whole_image_boxes(len(self.images))  # the reference: sampled around whole images

    def picture(self, board: Board, epoch: int, skip: int, bad_files) -> None:
        """The picture of `epoch`'s views (crop windows around the boxes) where the board draws one then."""
        if board.picture_due(epoch, self.updates) and not skip:
            drawn = (
                self.cfg.data.loader,
                self.images,
                self.cfg.run.seed,
                epoch,
                self.boxes,
                self.cfg.method.ccrop_alpha,
            )
            board.picture_views(*drawn, bad_files)

    def maps(self, epoch: int) -> dict | None:
        """What the step fills with f_q's map of the original when `epoch`'s steps refresh boxes ({}), else None."""
        return {} if self.live is not None and self.live.refreshing(epoch) else None

    def record(self, indices: torch.Tensor, maps: dict | None, flipped: torch.Tensor | None, stamp: int) -> None:
        """The step's refreshes (`maps` as `maps` made it and the step filled it): on the device, by sample index,
        no pass, no host read; `stamp` the run's global step."""
        if maps is not None:
            self.live.record(indices, maps["original"], flipped, stamp)

    def merge(self) -> dict | None:
        """Every rank's refreshed boxes on every rank, as a checkpoint keeps them (a collective), or None."""
        return None if self.live is None else self.live.merge()

    def area(self) -> float | None:
        return None if self.loader.boxes is None else mean_box_area(self.loader.boxes)

    def passes(self) -> list[int]:
        """The epochs before which a box pass runs (none with --ccrop-boxes forward): for the run's estimate."""
        return self.updates if self.live is None else []
