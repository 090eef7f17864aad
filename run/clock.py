"""The run clock: the time a run has taken and its estimates of what is left, in words."""

from __future__ import annotations

import time
from contextlib import contextmanager


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
