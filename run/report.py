"""What a run tells: the epoch's record (metrics.jsonl and the console line), the work left, and `Report`, the
one place a run's numbers go (console, progress bar, metrics.jsonl, TensorBoard, the run clock)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from model.board import Board, tensorboard_missing
from model.config import Config
from run.clock import RunClock
from run.monitor import knn_due


@dataclass(frozen=True)
class EpochRecord:
    """One line of metrics.jsonl, after `epoch` epochs (0: before training, kNN only): the epoch's mean loss,
    the kNN monitor's top-1 (None when not due), images/s over every rank, the last step's lr, the epoch's
    seconds and ContrastiveCrop's mean box area (None without boxes)."""

    epoch: int
    loss: float | None = None
    knn_top1: float | None = None
    images_per_sec: float | None = None
    lr: float | None = None
    epoch_time_s: float | None = None
    box_area: float | None = None


def log_epoch(path: Path | None, record: EpochRecord) -> dict:
    """The epoch's record as a dict, appended to metrics.jsonl and printed; with no path (ranks > 0) only
    returned."""
    values = dataclasses.asdict(record)
    if path is None:
        return values
    append_atomic(path, json.dumps(values))
    knn, loss = record.knn_top1, record.loss
    shown = "n/a" if knn is None else f"{100 * knn:.2f}%"
    click.echo(f"epoch {record.epoch}: loss {'-' if loss is None else f'{loss:.4f}'}, kNN top-1 {shown}")
    return values


def logged_epochs(path: Path) -> set[int]:
    """The epochs metrics.jsonl at `path` has a line for (none for a missing file)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return {json.loads(line)["epoch"] for line in lines if line.strip()}


def missing_record(state: dict, path: Path) -> EpochRecord | None:
    """The metrics record of the epoch a checkpoint ended (see `checkpoint_state`) when metrics.jsonl at `path`
    lacks its line, else None: a stop or kill between the checkpoint and the line left it out."""
    record = state.get("metrics")
    return None if record is None or record["epoch"] in logged_epochs(path) else EpochRecord(**record)


def append_atomic(path: Path, line: str) -> None:
    """Append a line by rewriting the file through a temporary one: never a half-written metrics line."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text((path.read_text() if path.exists() else "") + line + "\n")
    os.replace(tmp, path)


def remaining_work(cfg: Config, epoch: int, step: int, steps: int, box_updates: list[int], knn: bool) -> dict:
    """What is left of the run after `step` of `epoch`: training steps, kNN passes (when on, as --knn-every makes
    them due) and ContrastiveCrop localisation passes."""
    epochs = cfg.optimisation.epochs
    later = range(epoch + 1, epochs + 1)
    return {
        "steps": (epochs - epoch) * steps - step - 1,
        "knn": sum(knn_due(cfg, e) for e in later) * knn,
        "boxes": sum(e > epoch for e in box_updates),
    }


def first_knn(metrics_path: Path) -> float | None:
    """The kNN top-1 of a run's epoch 0 (before training) from its metrics.jsonl; None where there is none."""
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    record = json.loads(lines[0]) if lines else {}
    return record.get("knn_top1") if record.get("epoch") == 0 else None


class Report:
    """Where a run's numbers go: the console (`echo`: rank 0's), the epoch's progress bar, metrics.jsonl
    (`log_epoch`, rank 0), TensorBoard's event files (`board`: per poll and per epoch) and the run clock's
    estimates (`clock`). `history` holds the epoch records logged, as dicts. `steps`: steps per epoch; `knn`:
    whether the kNN monitor is on (for the estimates)."""

    def __init__(
        self, cfg: Config, out: Path, steps: int, resume: dict | None, main: bool, world: int, knn: bool, echo
    ) -> None:
        self.cfg, self.steps, self.main, self.world, self.knn, self.echo = cfg, steps, main, world, knn, echo
        self.metrics_path = out / "metrics.jsonl"
        self.history: list[dict] = []
        self.bar: tqdm | None = None
        self.clock = RunClock(echo)
        missing = tensorboard_missing() if cfg.run.tensorboard is not False else "--no-tensorboard"
        # A resumed run drops the events an interrupted one wrote after its checkpoint; a fresh one all earlier events.
        purge = 0 if resume is None else resume["epoch"] * steps + resume.get("step", 0) + 1
        self.board = Board(out, steps, main and missing is None, purge)
        echo(f"TensorBoard: {'event files in ' + str(out) if missing is None else 'off (' + missing + ')'}")

    def start_fresh(self) -> None:
        """A fresh run's metrics.jsonl: empty (rank 0)."""
        if self.main:
            self.metrics_path.write_text("")

    def missing_record(self, resume: dict) -> EpochRecord | None:
        """Rank 0: the line of the checkpoint's epoch that metrics.jsonl lacks (`missing_record`); None elsewhere."""
        return missing_record(resume, self.metrics_path) if self.main else None

    def first_knn(self) -> float | None:
        """Rank 0: epoch 0's kNN top-1 from metrics.jsonl (the network before training); None elsewhere."""
        return first_knn(self.metrics_path) if self.main else None

    def epoch(self, record: EpochRecord, knn: float | None) -> None:
        """The epoch's metrics line (rank 0) and TensorBoard's numbers, with its kNN top-1."""
        self.history.append(
            log_epoch(self.metrics_path if self.main else None, dataclasses.replace(record, knn_top1=knn))
        )
        self.board.epoch(self.history[-1])

    def progress_bar(self, batches, epoch: int, skip: int) -> tqdm:
        """The epoch's progress bar (rank 0's shows) over `batches`, `skip` of its steps trained before."""
        epochs = self.cfg.optimisation.epochs
        self.bar = tqdm(
            batches,
            total=self.steps,
            initial=skip,
            unit="batch",
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not self.main,
        )
        return self.bar

    def close_bar(self) -> None:
        self.bar.close()

    def polled(
        self, epoch: int, step: int, loss_sum: float, seen: int, seconds: float, lr: float, box_passes: list[int]
    ) -> None:
        """At a poll after `step` (0-based) of `epoch`: `loss_sum` over every rank, `seen` images of this rank and
        `seconds` since the epoch began; `box_passes` the ContrastiveCrop passes of the run (for the estimate)."""
        self.bar.set_postfix(loss=f"{loss_sum / (seen * self.world):.3f}", img_s=f"{seen / seconds:.0f}")
        self.board.poll(epoch, step + 1, loss_sum, seen * self.world, lr, seconds)
        left = remaining_work(self.cfg, epoch, step, self.steps, box_passes, self.knn)
        self.clock.polled(epoch, step + 1, step + 1 == self.steps, left, self.bar.write)

    def close(self) -> None:
        self.board.close()
