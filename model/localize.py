"""ContrastiveCrop's boxes from the query encoder, with the box rule of pipeline/ccrop.py (`heatmap_boxes`): the
reference's localisation pass (`localize`: eval mode, every training image), or LeOCLR's training forward
(`ForwardBoxes`: each sample's box refreshed from f_q's map of its whole original at each step it is trained on)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from model import distributed
from model.evaluation import batches
from pipeline.augment import normalize
from pipeline.ccrop import heatmap_boxes, whole_image_boxes
from pipeline.loader import Loader


@torch.no_grad()
def localize(
    encoder: torch.nn.Module,
    loader: Loader,
    k: float = 0.1,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Boxes (N, 4) float32 of every image of an evaluation loader (no augmentation, whole image resized):
    the encoder's `feature_map` in eval mode, one heatmap box per image, row i for image i. `stop` as
    `model.evaluation.batches` (raises Stopped)."""
    was_training = encoder.training
    encoder.eval()
    boxes = np.zeros((len(loader.images), 4), dtype=np.float32)
    size = (loader.image_size, loader.image_size)
    try:
        for batch in batches(loader, stop, desc="  boxes", leave=False, unit="batch", disable=loader.rank > 0):
            with context():
                maps = encoder.feature_map(normalize(batch.original))
            boxes[batch.indices.cpu().numpy()] = heatmap_boxes(maps, size, k).cpu().numpy()
    finally:
        encoder.train(was_training)
    return boxes


class ForwardBoxes:
    """Every training image's box (N, 4) float32 [top, left, bottom, right] as fractions, on the device, refreshed
    by `record` from f_q's map of the original view in the training step: no extra pass, no host read (the step
    scatters into `boxes` by sample index). `stamps` (N,) int64 is the global step of each box's last refresh
    (0 = never: the whole image). `merge` makes every rank's the same and copies them to the host (`host`),
    at epoch boundaries only; the loader takes `host` when the schedule updates the boxes. The steps of epochs
    from `start` on refresh (pipeline.ccrop.forward_refresh_start).

    The original is the whole image resized to S x S (never cropped), so a box as fractions of the view is the
    box as fractions of the image; a mirrored original's box is mirrored back."""

    def __init__(
        self, count: int, image_size: int, k: float, device: torch.device, start: int | None, state: dict | None = None
    ) -> None:
        boxes = whole_image_boxes(count) if state is None else state["boxes"]
        stamps = np.zeros(count, dtype=np.int64) if state is None else state["stamps"]
        self.boxes = torch.as_tensor(boxes, dtype=torch.float32).to(device)
        self.stamps = torch.as_tensor(stamps, dtype=torch.int64).to(device)
        self.host, self.size, self.k = np.array(boxes, dtype=np.float32), (image_size, image_size), k
        self.start = start  # the first epoch whose steps refresh (None: none does)

    def refreshing(self, epoch: int) -> bool:
        return self.start is not None and epoch >= self.start

    @torch.no_grad()
    def record(self, indices: torch.Tensor, maps: torch.Tensor, flipped: torch.Tensor, stamp: int) -> None:
        """Refresh the boxes of images `indices` (B,) int64 from f_q's maps (B, D, h, w) of their originals as
        augmented, `flipped` (B,) bool marking the mirrored ones; `stamp` > 0: the run's global step."""
        boxes = heatmap_boxes(maps, self.size, self.k)
        top, left, bottom, right = boxes.unbind(1)
        mirrored = torch.stack([top, 1 - right, bottom, 1 - left], 1)
        boxes = torch.where(flipped.view(-1, 1), mirrored, boxes)
        self.boxes.index_copy_(0, indices, boxes)
        self.stamps.index_fill_(0, indices, stamp)

    @torch.no_grad()
    def merge(self) -> dict:
        """Every rank's latest refreshes to every rank (a collective: each rank trains its own samples; one
        all-gather of boxes and stamps, none with one process), copied to `host`; returns the state a checkpoint
        keeps ({"boxes": (N, 4) float32, "stamps": (N,) int64}, numpy)."""
        if distributed.active():
            boxes, stamps = distributed.gather(self.boxes[None]), distributed.gather(self.stamps[None])
            latest = stamps.argmax(0)  # (N,): the rank that refreshed each box last
            self.boxes = boxes[latest, torch.arange(len(latest), device=latest.device)]
            self.stamps = stamps.max(0).values
        self.host = self.boxes.cpu().numpy()
        return {"boxes": self.host.copy(), "stamps": self.stamps.cpu().numpy()}
