"""The run's TensorBoard event files, next to metrics.jsonl (which stays the record): `tensorboard --logdir runs`.

Per step, at the loop's existing polls (every CHECK_EVERY steps, where it reads the loss back anyway): the mean
loss of the steps since the previous poll, the learning rate and img/s. Per epoch: every number of its
metrics.jsonl line (kNN top-1, ContrastiveCrop box area, loss, img/s, ...). Every few epochs and after each box
update: a picture of a batch's views (`pipeline.pictures.picture`: the original with the box and both crop windows,
then the two crops). The x axis is training steps throughout: epoch e ends at step e x steps per epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import ImageList
from pipeline.loader import BadFiles
from pipeline.pictures import picture

PICTURE_EVERY = 5  # epochs between pictures of the views (also before the first epoch and after box updates)
PICTURE_ROWS, PICTURE_SIZE = 8, 96  # images per picture and panel pixels (windows do not depend on --image-size)


def tensorboard_missing() -> str | None:
    """None when TensorBoard's writer imports here; otherwise why not, in a line, with how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError as error:
        return f"{error}; install it with: pip install tensorboard==2.21.0"
    return None


class Board:
    """Writes the run's event files into `out`, or nothing when `on` is False (ranks > 0, --no-tensorboard).
    Events of earlier files in `out` from step `purge_step` on are dropped when TensorBoard reads them: 0 for a
    fresh run, the step after its checkpoint for a resumed one."""

    def __init__(self, out: Path, steps_per_epoch: int, on: bool = True, purge_step: int | None = None) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.writer = None
        self._last: tuple[int, int, float, float] | None = None  # (epoch, images, loss sum, seconds) at the last poll
        if on:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out), purge_step=purge_step)

    def step(self, epoch: int, steps: int) -> int:
        """The x axis: steps trained before `steps` steps of `epoch` (0-based) were done, plus those."""
        return epoch * self.steps_per_epoch + steps

    def poll(self, epoch: int, steps: int, loss_sum: float, images: int, lr: float, seconds: float) -> None:
        """At a poll after `steps` steps of `epoch`: `loss_sum` and `images` so far in the epoch over every rank, and
        `seconds` since the epoch started. Logs the mean loss and img/s since the previous poll of this epoch."""
        if self.writer is None:
            return
        last = self._last if self._last is not None and self._last[0] == epoch else (epoch, 0, 0.0, 0.0)
        self._last = (epoch, images, loss_sum, seconds)
        if images <= last[1]:
            return
        at = self.step(epoch, steps)
        self.writer.add_scalar("train/loss", (loss_sum - last[2]) / (images - last[1]), at)
        self.writer.add_scalar("train/lr", lr, at)
        if seconds > last[3]:
            self.writer.add_scalar("train/images_per_sec", (images - last[1]) / (seconds - last[3]), at)

    def epoch(self, record: dict) -> None:
        """An epoch's metrics.jsonl record: each number as epoch/<name> at the epoch's last step."""
        if self.writer is None:
            return
        at = self.step(record["epoch"], 0)
        for name, value in record.items():
            if name != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{name}", value, at)
        self.writer.flush()  # an epoch is a natural point for a look at the board

    def picture_due(self, epoch: int, box_updates: list[int]) -> bool:
        """Whether a picture of the views is drawn before `epoch` (0-based) is trained."""
        return self.writer is not None and (epoch % PICTURE_EVERY == 0 or epoch in box_updates)

    def picture_views(
        self,
        backend: str,
        images: ImageList,
        seed: int,
        epoch: int,
        boxes: np.ndarray | None,
        alpha: float,
        bad_files: BadFiles | None = None,
    ) -> None:
        """The picture of epoch `epoch`'s first images as `pipeline.pictures` draws it, read through the run's loader
        backend on the CPU (the crop windows and boxes of the training run), as image "views"."""
        if self.writer is None:
            return
        rows = min(PICTURE_ROWS, len(images))
        grid = picture(backend, images, seed, epoch, boxes, alpha, rows, PICTURE_SIZE, bad_files)
        self.writer.add_image("views", np.asarray(grid), self.step(epoch, 0), dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
