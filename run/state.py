"""A run's state: the one checkpoint dict train.py writes (epoch end and mid-epoch) and `Checkpoints`, the run's
checkpoint.pt; saving it atomically, loading and restoring it, the RNG states, and each rank's augmentation
stream and running sums through an epoch (`EpochProgress`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from pathlib import Path

import click
import numpy as np
import torch

from model.config import Config, rebased
from model.distributed import gather
from run.bad_files import BadFileLog
from run.report import EpochRecord


def checkpoint_state(
    model,
    optimizer,
    scaler,
    cfg: Config,
    epoch: int,
    boxes: np.ndarray | None,
    bad_files=(),
    forward_boxes: dict | None = None,
    metrics: EpochRecord | None = None,
    **within,
) -> dict:
    """What train.py's checkpoint.pt holds: both encoders and the queue, optimizer, scaler, `epoch` (epochs
    done), the config, the RNG states, ContrastiveCrop's boxes (the loader's; with --ccrop-boxes forward also
    the refreshed ones, `ForwardBoxes.merge`) and the files found undecodable ([path, reason]). A checkpoint
    written at an epoch's end holds that epoch's `metrics` record (`log_epoch`'s, kNN not yet known): written
    before the kNN pass and the metrics line, it lets a resumed run write the line a stop or a kill left out
    (`missing_record`).
    A checkpoint written within an epoch adds `within`: step (steps done of the next epoch), generators and
    partials (`rank_states`), elapsed (seconds)."""
    return {
        "bad_files": [list(entry) for entry in bad_files],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "rng": rng_states(),
        "boxes": boxes,
        "forward_boxes": forward_boxes,
        "metrics": None if metrics is None else dataclasses.asdict(metrics),
        **within,
    }


class Checkpoints:
    """The run's RUN_DIR/checkpoint.pt: `state` is the one constructor of its content (`checkpoint_state`, at an
    epoch's end, within an epoch, before the first), `write` saves it atomically. Only rank 0 writes: on the
    other ranks `state` is None and `write` does nothing."""

    def __init__(self, out: Path, model, optimizer, scaler, cfg: Config, bad_log: BadFileLog, main: bool) -> None:
        self.path, self.main = out / "checkpoint.pt", main
        self.model, self.optimizer, self.scaler, self.cfg, self.bad_log = model, optimizer, scaler, cfg, bad_log

    def state(
        self,
        epoch: int,
        boxes: np.ndarray | None,
        forward_boxes: dict | None = None,
        metrics: EpochRecord | None = None,
        **within,
    ) -> dict | None:
        """`checkpoint_state` of the run after `epoch` epochs (and `within`'s steps of the next) on rank 0."""
        if not self.main:
            return None
        parts = (self.model, self.optimizer, self.scaler, self.cfg)
        return checkpoint_state(*parts, epoch, boxes, self.bad_log.entries(), forward_boxes, metrics, **within)

    def write(self, state: dict | None) -> None:
        if state is not None:
            save_atomic(state, self.path)

    def adopt(self, resume: dict) -> None:
        """A resumed run's checkpoint: where a stop before the next one resumes, with this run's settings."""
        if self.main and (not self.path.exists() or resume["config"] != self.cfg.to_dict()):
            save_atomic({**resume, "config": self.cfg.to_dict()}, self.path)


def restore(state: dict, model, optimizer, scaler) -> None:
    """Resume from a checkpoint: weights and queue, optimizer, scaler and the RNG states (the boxes and where
    the run stood are the caller's)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, synced, then renamed: a crash leaves the previous checkpoint whole. A
    write that fails (disk full, no permission) removes the temporary file and raises CheckpointNotWritten."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as file:  # through a Python file: a failed write raises OSError with its errno
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch's zip writer, should it fail on its own
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        kept = "the previous checkpoint there is unchanged" if path.exists() else "no checkpoint was written"
        raise CheckpointNotWritten(f"cannot write the checkpoint {path} ({why}); {kept}. Stopped.") from error


class CheckpointNotWritten(click.ClickException):
    """A checkpoint write failed: the run stops rather than train on without one."""


def load_checkpoint(path: str | Path) -> dict:
    """A train.py checkpoint ({"model", "config", "epoch", ...}); ValueError saying what is wrong otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for files it cannot read
        raise ValueError(f"cannot read {path} as a checkpoint: {error}") from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a train.py checkpoint (no 'model' and 'config' entries)")
    state["config"] = rebased(state["config"], path)  # an older run's relative paths, from where it ran
    return state


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def rank_states(generator: torch.Generator, total_loss: torch.Tensor, seen: int, device: torch.device):
    """Every rank's augmentation generator state, uint8 (world, L), and running (loss sum, images), float64
    (world, 2), in rank order on the CPU: what a mid-epoch checkpoint needs to resume each rank's own stream."""
    state = generator.get_state()  # a CPU ByteTensor whatever the generator's device
    sums = torch.stack([total_loss.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
    return gather(state.to(device)[None]).cpu(), gather(sums[None]).cpu()


def rank_partial(resume: dict, rank: int, world: int = 1) -> tuple[torch.Tensor | None, float, int, float]:
    """This rank's (generator state, loss sum, images, seconds) from a mid-epoch checkpoint. Resumed by another
    number of processes than wrote it, no rank continues a saved stream (state None: the caller seeds the
    generator with `augmentation_seed` at the step) and rank 0 carries the epoch's sums so far, so the epoch's
    totals stay right. Checkpoints written before every rank's state was saved hold rank 0's only."""
    if "generators" not in resume:
        loss_sum, seen, elapsed = resume["partial"]
        states, partials = [resume["generator"].cpu()], torch.tensor([[loss_sum, seen]], dtype=torch.float64)
    else:
        states, partials, elapsed = resume["generators"], resume["partials"], resume["elapsed"]
    if len(states) == world:
        loss_sum, seen = partials[rank].tolist()
        return states[rank].clone(), loss_sum, int(seen), elapsed
    loss_sum, seen = partials.sum(0).tolist() if rank == 0 else (0.0, 0)
    return None, loss_sum, int(seen), elapsed


def augmentation_seed(seed: int, epoch: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's augmentation generator (its draws of aug+ and of the key shuffle): (seed, epoch, rank) at
    the start of each epoch; a run resumed mid-epoch by another number of processes than wrote the checkpoint
    seeds each rank from (seed, epoch, step, rank) at that step, for the rest of the epoch."""
    if step == 0:
        return seed * 1_000_003 + epoch + 7_919 * rank
    return int(np.random.SeedSequence([seed % 2**63, epoch, step, rank]).generate_state(1, np.uint64)[0] >> 1)


class EpochProgress:
    """This rank's way through epoch `epoch`: its augmentation generator (seeded by `augmentation_seed`), its
    running loss sum (a scalar tensor on the device: nothing read back per step), its images and its clock.
    Resumed `skip` steps in, it goes on with the mid-epoch checkpoint's stream, sums and seconds
    (`rank_partial`)."""

    def __init__(
        self, cfg: Config, epoch: int, skip: int, resume: dict | None, rank: int, world: int, device: torch.device
    ) -> None:
        # Per rank: its own augmentation draws (the key shuffle over ranks uses rank 0's).
        self.generator = torch.Generator(device=device).manual_seed(augmentation_seed(cfg.run.seed, epoch, rank))
        self.loss_sum, self.seen, self.started = torch.zeros((), device=device), 0, time.perf_counter()
        self.device = device
        if skip:  # this rank's own draws and sums where the interrupted run stopped
            state, loss_sum, self.seen, elapsed = rank_partial(resume, rank, world)
            if state is None:  # written by another number of processes: no stream of this rank to continue
                self.generator.manual_seed(augmentation_seed(cfg.run.seed, epoch, rank, skip))
            else:
                self.generator.set_state(state)  # a CPU ByteTensor, for a CUDA generator too
            self.loss_sum += loss_sum
            self.started -= elapsed

    def add(self, loss: torch.Tensor, images: int) -> None:
        """A step's mean loss (a scalar tensor on the device) over its `images`: summed on the device, no sync."""
        self.loss_sum += loss * images
        self.seen += images

    def seconds(self) -> float:
        """Seconds into the epoch (a resumed epoch's earlier seconds included)."""
        return time.perf_counter() - self.started

    def rank_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's generator state and sums (`rank_states`, a collective) for a mid-epoch checkpoint."""
        return rank_states(self.generator, self.loss_sum, self.seen, self.device)
