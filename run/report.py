"""What a run tells: the epoch's record (metrics.jsonl and the console line), the work left and the run
clock's estimates."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from model.config import Config
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


def duration(seconds: float) -> str:
    """Seconds in words: 42 s, 3 min 05 s, 2 h 10 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RunClock:
    """The run's time for the user: an estimate of what is left at the run's first poll (where the loss is read
    back, so the device has caught up: after CHECK_EVERY steps, or at the end of a shorter epoch), from the time
    per step since this process's first step of the epoch and the measured kNN pass; said again once, at the
    next poll of that epoch, when the steps between the two polls (past the loader's start and the warm-up) put
    it more than `CORRECT_BY` off. A resumed run counts its own steps only, and with no step left nothing is
    estimated. After each epoch: the time so far and, at this process's time per step, what is left."""

    CORRECT_BY = 0.2  # a second estimate when the first is off by more than this fraction

    def __init__(self, echo) -> None:
        self.echo, self.started = echo, time.perf_counter()
        self.knn_s: float | None = None
        self.loop_started = 0.0
        self.epoch: tuple[int, float, int] = (-1, 0.0, 0)  # (epoch, time, steps done before) at its first step
        self.first: tuple[int, float, int, float] | None = None  # (epoch, time, steps, estimate) at the first poll
        self.done = False  # estimated (and checked) already
        self.trained = self.this_epoch = 0  # steps this process trained: in earlier epochs, in this one

    @contextmanager
    def timing_knn(self):
        started = time.perf_counter()
        yield
        self.knn_s = time.perf_counter() - started

    def start_loop(self) -> None:
        self.loop_started = time.perf_counter()

    def start_epoch(self, epoch: int, skip: int) -> None:
        """Before this process's first step of `epoch`, of which `skip` steps were trained before (a resume)."""
        self.epoch, self.this_epoch = (epoch, time.perf_counter(), skip), 0

    def polled(self, epoch: int, steps: int, last: bool, remaining: dict, write) -> None:
        """At a poll after `steps` steps of `epoch` (`last` = its last step), `remaining` as `remaining_work`."""
        now = time.perf_counter()
        self.this_epoch = steps - self.epoch[2]
        if self.done or self.epoch[0] != epoch:
            return
        if not remaining["steps"]:  # the run's last step: nothing left to estimate
            self.done = True
        elif self.first is None:
            step_s = (now - self.epoch[1]) / self.this_epoch
            self.first = (epoch, now, steps, self.estimate(step_s, remaining, write))
            self.done = last  # the next poll comes after a kNN pass, in another epoch: no clean window
        else:
            self.done = True
            step_s = (now - self.first[1]) / (steps - self.first[2])
            if abs(self.total(step_s, remaining) - self.first[3]) > self.CORRECT_BY * self.first[3]:
                self.estimate(step_s, remaining, write, again=True)

    def total(self, step_s: float, remaining: dict) -> float:
        return step_s * remaining["steps"] + (self.knn_s or 0) * (remaining["knn"] + remaining["boxes"])

    def estimate(self, step_s: float, remaining: dict, write, again: bool = False) -> float:
        """Write the time left at `step_s` seconds per step (and the passes at the measured kNN pass's time)."""
        total, passes = self.total(step_s, remaining), remaining["knn"] + remaining["boxes"]
        parts = f"{remaining['steps']} steps at {step_s:.2f} s"
        if passes and self.knn_s is not None:
            parts += f" + {passes} evaluation passes of {duration(self.knn_s)}"
        again = ", measured again past the start-up" if again else ""
        write(f"estimated time to the end of the run{again}: about {duration(total)} ({parts})")
        return total

    def epoch_done(self, steps_left: int) -> None:
        """After an epoch (its last step polled), with `steps_left` training steps to go."""
        now = time.perf_counter()
        self.trained += self.this_epoch
        per_step = (now - self.loop_started) / max(1, self.trained)  # this process's steps, their passes included
        left = f", about {duration(per_step * steps_left)} left" if steps_left else ""
        self.echo(f"  {duration(now - self.started)} so far{left}")
