"""A training run set up and wired (`set_up` -> `Run`): the process, the data, the loaders, the model and its
optimizer, ContrastiveCrop, the report, the kNN monitor, the checkpoints and the stop signals, and what the loop
in train.py calls around its steps: the start (resume, the first kNN), each epoch's start and end, a stop, the
end of the run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click
import torch

from model import distributed
from model.config import Config
from model.distributed import gather_objects
from model.evaluation import Stopped
from model.methods import Method, method_for
from model.moco import MomentumContrast
from model.precision import describe
from pipeline.augment import AugmentConfig
from pipeline.data import ImageList
from pipeline.semantic_pairs import read_pairs
from run.bad_files import BadFileLog, verify_splits
from run.boxes import ContrastiveCrop
from run.monitor import Monitor, describe_monitor
from run.parts import Loaders, augment_config, build_model, make_loaders, optimizer_and_scaler, settle_amp, use_cuda
from run.report import EpochRecord, Report
from run.state import Checkpoints, EpochProgress, restore
from run.stop import StopSignals, world_totals


@dataclass(frozen=True)
class Process:
    """This process of the run: its rank of `world` (torchrun's; 0 of 1 alone), its device, whether it is the
    main one (rank 0: the only one that prints and writes) and its `echo` (click.echo there, silent elsewhere)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    main: bool
    echo: Callable[..., None]


def start_process(cfg: Config) -> Process:
    """Join the process group (under torchrun), settle the device and CUDA's settings, take rank 0's run
    folder and seed torch with --seed."""
    cuda = cfg.run.device.startswith("cuda")
    rank, world, local_rank = distributed.init_from_env(cuda)
    device = torch.device("cuda", local_rank) if cuda and world > 1 else torch.device(cfg.run.device)
    if cuda:
        use_cuda(device)
    main = rank == 0
    echo = click.echo if main else lambda *args, **kwargs: None
    if world > 1:  # the folder rank 0 claimed (train.py's main), which may be a fresh one beside the default
        cfg.run.out = gather_objects(cfg.run.out)[0]
    torch.manual_seed(cfg.run.seed)
    if world > 1:
        per_rank = cfg.optimisation.batch_size // world
        echo(f"{world} processes ({'nccl' if cuda else 'gloo'}), {per_rank} images per rank and step")
    return Process(rank, world, local_rank, device, main, echo)


@dataclass
class Run:
    """A training run's parts, wired, and what happens around its steps (train.py's loop calls them)."""

    cfg: Config
    process: Process
    out: Path
    method: Method
    aug: AugmentConfig
    bad_log: BadFileLog
    loaders: Loaders
    crop: ContrastiveCrop
    model: MomentumContrast
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    report: Report
    monitor: Monitor
    checkpoints: Checkpoints
    signals: StopSignals
    resume: dict | None

    def begin(self) -> tuple[int, int]:
        """Before the first step (the signals caught): the checkpoint restored where the run resumes, the raw
        pixels' kNN, epoch 0's line (before training; or the line a stop or kill after a checkpoint left out),
        and the scores beside it. Returns (epochs done, steps done of the next)."""
        resume = self.resume
        if resume is not None:
            pending, resumed_at = self.restore_checkpoint(resume)
        else:
            self.report.start_fresh()
            pending, resumed_at = EpochRecord(0), ""  # before training: the kNN only
        try:
            self.monitor.measure_pixels()
            if pending is not None:
                self.report.epoch(pending, self.monitor(pending.epoch))
        except Stopped:
            if resume is not None:
                self.stop(resumed_at)
            self.stop("before the first epoch", self.checkpoints.state(0, None, metrics=pending))
        self.monitor.say_beside(self.report.first_knn())  # epoch 0: the network before training
        self.report.clock.start_loop()
        return (resume["epoch"], resume.get("step", 0)) if resume is not None else (0, 0)

    def restore_checkpoint(self, resume: dict) -> tuple[EpochRecord | None, str]:
        """Weights, optimizer, scaler, RNG states and boxes from the checkpoint, and what the resume is said to be.
        Returns the metrics record still to write (or None) and where the run stands, in words."""
        echo, epoch, step = self.process.echo, resume["epoch"], resume.get("step", 0)
        restore(resume, self.model, self.optimizer, self.scaler)
        self.crop.restore(resume)
        echo(f"resumed after epoch {epoch}" + (f", step {step} of epoch {epoch + 1}" if step else ""))
        saved_world, world = resume["config"].get("world_size", 1), self.process.world
        if saved_world != world:  # the schedule is global: the same global batches and windows go on
            draws = ", each rank's augmentation drawn from (seed, epoch, step, rank) until the epoch ends"
            echo(f"  by {world} process(es) (the checkpoint's run had {saved_world}){draws if step else ''}")
        if self.bad_log.files.reasons:
            echo(
                f"  {len(self.bad_log.files.reasons)} file(s) found undecodable earlier stay out ({self.bad_log.path})"
            )
        self.checkpoints.adopt(resume)
        pending = gather_objects(self.report.missing_record(resume))[0]
        steps = len(self.loaders.train)
        return pending, f"at epoch {epoch + 1}, step {step}/{steps}" if step else f"at the end of epoch {epoch}"

    def before_epoch(self, epoch: int, skip: int) -> None:
        """ContrastiveCrop's boxes for `epoch` (0-based; `skip` of its steps trained before) and the picture of
        its views. A stop in the box pass ends the run: the checkpoint of the epoch before stands (a resume boxes
        again)."""
        try:
            self.crop.before_epoch(epoch, skip, self.model)
        except Stopped:
            self.stop(f"at the end of epoch {epoch}")
        self.crop.picture(self.report.board, epoch, skip, self.bad_log.files)

    def start_epoch(self, epoch: int, skip: int) -> EpochProgress:
        """The model in training mode and this rank's progress through `epoch` (its stream and sums)."""
        self.model.train()
        self.report.clock.start_epoch(epoch, skip)
        process = self.process
        return EpochProgress(self.cfg, epoch, skip, self.resume, process.rank, process.world, process.device)

    def stop_within(self, epoch: int, step: int, progress: EpochProgress) -> NoReturn:
        """Stop after `step` (0-based) of `epoch`, with a checkpoint of where the epoch stands: every rank's stream
        and sums, so a resume replays nothing and skips nothing."""
        self.report.close_bar()
        generators, partials = progress.rank_states()  # collectives: every rank
        refreshed = self.crop.merge()  # every rank's, on every rank
        within = dict(step=step + 1, generators=generators, partials=partials, elapsed=progress.seconds())
        state = self.checkpoints.state(epoch, self.crop.boxes, refreshed, **within)
        self.stop(f"at epoch {epoch + 1}, step {step + 1}/{len(self.loaders.train)}", state)

    def end_epoch(self, epoch: int, progress: EpochProgress, lr: float) -> None:
        """After `epoch`'s last step (0-based; the loss checked): its record over every rank, its checkpoint
        (before the kNN pass and the metrics line, with the record a resume would write), then its kNN and line."""
        self.report.close_bar()
        seconds = progress.seconds()
        # Every rank's loss sum and images: the epoch's loss and throughput over the whole world.
        total_loss, seen = world_totals(progress.loss_sum, progress.seen, self.process.device)
        refreshed = self.crop.merge()  # every rank's, on every rank
        record = EpochRecord(epoch + 1, total_loss / seen, None, seen / seconds, lr, seconds, self.crop.area())
        self.checkpoints.write(self.checkpoints.state(epoch + 1, self.crop.boxes, refreshed, record))
        end = f"at the end of epoch {epoch + 1}"
        if self.signals.agree(self.process.device):  # came in the epoch's last steps or in its checkpoint's write
            self.stop(end)
        try:
            self.report.epoch(record, self.monitor(epoch + 1))
        except Stopped:
            self.stop(f"{end} (its kNN pass cut short: a resume runs it)")
        # A signal from here on: the next epoch's first poll stops the run.
        self.report.clock.epoch_done((self.cfg.optimisation.epochs - epoch - 1) * len(self.loaders.train))

    def stop(self, where: str, state: dict | None = None) -> NoReturn:
        """End the run on a stop signal (agreed by every rank), `state` written as the checkpoint first (None: the
        checkpoint there already stands where the run stops)."""
        self.checkpoints.write(state)
        path = self.checkpoints.path
        self.process.echo(
            f"{self.signals.name}: checkpoint written {where}; continue with: python train.py --resume {path}",
            err=True,
        )
        self.loaders.close()
        self.report.close()
        raise SystemExit(128 + self.signals.number)

    def finish(self) -> list[dict]:
        """After the last epoch: loaders and event files closed, the final score beside raw pixels', every rank
        past rank 0's last checkpoint. Returns the metrics records."""
        self.loaders.close()
        self.report.close()
        self.monitor.say_final(self.report.history)
        if self.process.world > 1:
            torch.distributed.barrier()  # rank 0's checkpoint is complete before anyone leaves
            torch.distributed.destroy_process_group()
        return self.report.history


@dataclass(frozen=True)
class RunImages:
    """What a run reads: the images it trains on, the kNN monitor's queries (None: the monitor is off, `knn_off`
    saying why) and its bank (None: from the training images; else --val-data's train split)."""

    train: ImageList
    val: ImageList | None
    bank: ImageList | None = None
    knn_off: str = ""


def set_up(cfg: Config, resume: dict | None, images: RunImages) -> Run:
    """The run's parts, built in the order the run says them (see `train.train`)."""
    train_images, val_images, bank_images, knn_off = images.train, images.val, images.bank, images.knn_off
    process = start_process(cfg)
    echo, device, out = process.echo, process.device, Path(cfg.run.out)
    if cfg.data.verify:
        train_images, val_images = verify_splits(cfg, (train_images, val_images), process.rank, process.world, echo)
    labels = f"{len(train_images.classes)} classes" if train_images.labelled else "no labels"
    labels += f" (--labels {cfg.data.labels})" if cfg.data.loader != "ffcv" else ""
    echo(f"data {cfg.data.data}: {len(train_images)} train images, {labels}; device {device}, loader {cfg.data.loader}")
    method = method_for(cfg.method.method, cfg.method.symmetric, cfg.method.attract_all)
    pairs = read_pairs(cfg.method.pairs, len(train_images)) if method.pairs else None
    if pairs is not None:
        echo(f"SePP-ID: {len(pairs)} semantic pairs from {cfg.method.pairs} added to the {len(train_images)} images")
    bad_log = BadFileLog(out, resume, process.main)  # files found undecodable: shared by every loader of the run
    world = (process.rank, process.world)
    loaders = make_loaders(cfg, method, pairs, train_images, val_images, device, *world, bad_log.files, bank_images)
    echo(describe_monitor(cfg, loaders, device, train_images, bank_images, val_images, knn_off))
    signals = StopSignals()  # caught from train.py's `with` on
    crop = ContrastiveCrop(cfg, loaders, train_images, device, resume, signals, out, process.main, echo)
    model, optimizer, scaler = set_up_model(cfg, process, out)
    steps, knn = len(loaders.train), loaders.val is not None
    report = Report(cfg, out, steps, resume, process.main, process.world, knn, echo)
    monitor = Monitor(cfg, model, loaders, report.clock, bad_log, signals, echo)
    checkpoints = Checkpoints(out, model, optimizer, scaler, cfg, bad_log, process.main)
    parts = (method, augment_config(cfg), bad_log, loaders, crop, model, optimizer, scaler)
    return Run(cfg, process, out, *parts, report, monitor, checkpoints, signals, resume)


def set_up_model(
    cfg: Config, process: Process, out: Path
) -> tuple[MomentumContrast, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model (its precision settled and said, the settings then in RUN_DIR/config.json), its optimizer and
    gradient scaler; wrapped for DDP with several processes."""
    device = process.device
    model = build_model(cfg, device)
    settle_amp(cfg, device, model.query_encoder.backbone)
    process.echo(describe(cfg.optimisation.amp, cfg.optimisation.amp_auto))
    if process.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    optimizer, scaler = optimizer_and_scaler(cfg, model, device)
    if process.world > 1:
        model.distribute([process.local_rank] if device.type == "cuda" else None)
    return model, optimizer, scaler
