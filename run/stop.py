"""Stopping a run: the stop signals, the loop's periodic poll (stop flag, running loss and new bad files in one
collective), the finite-loss check and the epoch's totals over the ranks."""

from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path

import click
import torch

from model import distributed
from model.distributed import gather
from model.evaluation import Stopped
from run.bad_files import BadFileLog

CHECK_EVERY = 10  # steps between the loop's looks at the stop flag and the loss (one collective, one host read)


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (a preempted job, Ctrl-C, SLURM's warning ahead of the time limit with
    --signal=USR1@SECONDS) set a flag instead of killing the run; the loop checks it every CHECK_EVERY steps and
    at each epoch's last step (`poll`), after each epoch's checkpoint and metrics line (`agree`), and between the
    batches of the kNN, raw-pixel and box passes (`stoppable_passes`), and stops there with a checkpoint. With
    several ranks all stop at the same point."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.number, self.previous = 0, {}

    def __enter__(self) -> StopSignals:
        for each in self.SIGNALS:
            self.previous[each] = signal.signal(each, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for each, handler in self.previous.items():
            signal.signal(each, handler)

    def _note(self, number, frame) -> None:
        self.number = number

    def agree(self, device: torch.device) -> bool:
        """Whether any rank has a stop signal (the largest number goes to `number` on every rank): one all_gather,
        none with one process. A collective: every rank calls it at the same point."""
        if distributed.active():
            self.number = int(gather(torch.tensor([float(self.number)], device=device)).max())
        return bool(self.number)

    @property
    def name(self) -> str:
        return signal.Signals(self.number).name if self.number else ""


def poll(signals: StopSignals, total_loss: torch.Tensor, bad_files: BadFileLog | None = None) -> float:
    """Every rank's stop signal (the largest goes to `signals.number`) and the sum over ranks of the running
    loss sums (scalar tensors on the device): one all_gather (none with one process) and one host read. It
    carries each rank's count of undecodable files found since the last look too: when any has found one,
    `bad_files` shares them (one more collective, only then)."""
    pending = float(len(bad_files.files.pending)) if bad_files is not None else 0.0
    flags = [total_loss.new_full((), float(signals.number)), total_loss.new_full((), pending)]
    mine = torch.stack([total_loss.float(), *flags])  # filled on the device: no host-to-device copy
    everyone = gather(mine[None]).tolist()  # (world, 3)
    signals.number = int(max(row[1] for row in everyone))
    if bad_files is not None and any(row[2] for row in everyone):
        bad_files.share()
    return sum(row[0] for row in everyone)


def check_finite(total_loss: float, epoch: int, step: int, out: Path) -> None:
    """Stop (every rank) when the running loss sum is NaN or infinite; the last good checkpoint stays."""
    if not math.isfinite(total_loss):
        kept = (
            f"{out / 'checkpoint.pt'} holds the last good epoch"
            if (out / "checkpoint.pt").exists()
            else "no checkpoint yet"
        )
        raise NonFiniteLoss(
            f"the loss became {total_loss} in epoch {epoch + 1} (by step {step + 1}); stopped "
            f"without saving ({kept}). Lower --lr or use --amp off/bf16."
        )


class NonFiniteLoss(click.ClickException):
    """The loss became NaN or infinite: the run stops before writing a checkpoint of the broken weights."""


def world_totals(total_loss: torch.Tensor, seen: int, device: torch.device) -> tuple[float, float]:
    """Every rank's loss sum (a scalar tensor on the device) and images, summed over the world: the epoch's loss
    and throughput over all ranks (one all_gather, none with one process, and one host read)."""
    return gather(torch.stack([total_loss.float(), torch.tensor(float(seen), device=device)])[None]).sum(0).tolist()


def stoppable_passes(signals: StopSignals | None, device: torch.device, *passes) -> list:
    """Run `passes` (each a function of a `stop` predicate, returning its result) one after the other; with
    `signals`, a stop signal cuts them short between two batches, and then every rank raises `Stopped`: the ranks
    agree after the passes (one collective; the passes themselves have none), so a rank whose pass was cut short
    never leaves another waiting in a collective."""
    if signals is None:
        return [run(None) for run in passes]
    results = []
    with contextlib.suppress(Stopped):
        for run in passes:
            results.append(run(lambda: bool(signals.number)))
    if signals.agree(device):
        raise Stopped
    return results
