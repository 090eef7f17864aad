"""The training machinery train.py wires together, importable by eval.py, the benchmarks and tools: the model
and its optimizer, the training step and learning-rate schedule, the run's loaders, checkpoints (the one dict
train.py writes, saving, loading, resuming), stop signals, undecodable files and --verify, the kNN monitor, the
epoch log and the run clock."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
import torch

from model import distributed
from model.config import Config, knn_bank, rebased
from model.distributed import gather, gather_objects, gather_to_main, sum_arrays
from model.evaluation import Stopped, extract_features, pixel_features
from model.knn import knn_top1
from model.localize import ForwardBoxes, localize
from model.methods import Method
from model.moco import MomentumContrast
from model.precision import autocast, resolve_amp
from pipeline.augment import AugmentConfig, augment_with_draws
from pipeline.backends import make_loader
from pipeline.ccrop import forward_refresh_start
from pipeline.data import ImageList, select, subset
from pipeline.loader import BadFiles, Loader, LoaderSpec, machine_workers
from pipeline.verify import cache_file, verify


def build(cfg: Config, device: torch.device) -> tuple[MomentumContrast, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model (channels_last on `device`), its SGD optimizer and the gradient scaler (fp16 only)."""
    model = build_model(cfg, device)
    return model, *optimizer_and_scaler(cfg, model, device)


def build_model(cfg: Config, device: torch.device) -> MomentumContrast:
    settings = cfg.model
    model = MomentumContrast(
        settings.arch,
        cfg.data.image_size,
        queue_size=settings.queue_size,
        momentum=settings.moco_momentum,
        bn_splits=settings.bn_splits,
    ).to(device, memory_format=torch.channels_last)
    if settings.compile:  # in place: the state dict keeps its keys
        model.query_encoder.compile()
        model.key_encoder.compile()
    return model


def optimizer_and_scaler(
    cfg: Config, model: MomentumContrast, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """SGD on the query encoder and the gradient scaler (on only for fp16: cfg's amp must be settled)."""
    optimizer = torch.optim.SGD(
        model.query_encoder.parameters(),
        lr=cfg.optimisation.lr,
        momentum=0.9,
        weight_decay=cfg.optimisation.weight_decay,
    )
    return optimizer, torch.amp.GradScaler(device.type, enabled=cfg.optimisation.amp == "fp16")


def settle_amp(cfg: Config, device: torch.device, backbone: torch.nn.Module) -> None:
    """Resolve `--amp auto` in cfg: its amp becomes the precision chosen here for `backbone` and amp_auto the
    reason (None when --amp forced it). With several processes rank 0's choice holds for all: they must agree."""
    choice = list(resolve_amp(cfg.optimisation.amp, device, cfg.model.arch, cfg.data.image_size, backbone))
    if distributed.active() and cfg.optimisation.amp == "auto":
        torch.distributed.broadcast_object_list(choice, src=0)
    cfg.optimisation.amp, cfg.optimisation.amp_auto = choice


def augment_config(cfg: Config) -> AugmentConfig:
    """MoCo-v2 aug+ with the parts --no-color-jitter, --no-grayscale and --no-blur remove (Figure 4)."""
    method = cfg.method
    return AugmentConfig(
        jitter_p=0.8 if method.color_jitter else 0.0,
        grayscale_p=0.2 if method.grayscale else 0.0,
        blur_p=0.5 if method.blur else 0.0,
    )


def loader_views(method: Method) -> int:
    """Views a method's loader makes: MoCo-v2 never decodes or resizes an original it ignores."""
    return 3 if "original" in method.views else 2


def use_cuda(device: torch.device) -> None:
    """The CUDA settings of a training run on `device`."""
    if device.index is not None:
        torch.cuda.set_device(device)  # --device cuda:N: kernels, streams and NCCL on that GPU, not on GPU 0
    torch.backends.cudnn.benchmark = True  # the step's shapes never change: time cuDNN's algorithms once
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls (the heads, the logits)


class Loaders(NamedTuple):
    """A run's loaders: training; the kNN monitor's un-augmented passes over the bank and val images (None
    without a val split); ContrastiveCrop's localisation pass over every training image (None without
    --crop ccrop or with --ccrop-boxes forward; the bank's loader when that one reads every image)."""

    train: Loader
    bank: Loader | None
    localize: Loader | None
    val: Loader | None

    def close(self) -> None:
        """Release every loader that was built, the shared one once."""
        for each in (self.train, self.bank, self.localize if self.localize is not self.bank else None, self.val):
            if each is not None:
                each.close()


def loader_spec(cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> LoaderSpec:
    """This rank's evaluation-pass `LoaderSpec` of a run: cfg's backend, size, workers, the per-rank batch (the
    global --batch-size over `world`); `.but(train=True, ...)` for its training loader."""
    return LoaderSpec(
        cfg.data.loader,
        cfg.data.image_size,
        cfg.optimisation.batch_size // world,
        device,
        train=False,
        workers=cfg.data.workers,
        rank=rank,
        world=world,
    )


def make_loaders(
    cfg: Config,
    method: Method,
    pairs: np.ndarray | None,
    train_images: ImageList,
    val_images: ImageList | None,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    bad_files: BadFiles | None = None,
    bank_source: ImageList | None = None,
) -> Loaders:
    """This rank's loaders of a run (`Loaders`), with cfg's backend, size, workers and seed; `pairs` as `Loader`;
    `bad_files` shared by all of them (a file one finds undecodable stays out of every one). The kNN bank is a
    subset of `bank_source` (--val-data's train split) or, without it, of the training images."""
    bad_files = BadFiles() if bad_files is None else bad_files
    passes = loader_spec(cfg, device, rank, world)  # the un-augmented passes: file order, the original view
    random_crop = cfg.method.original == "random-crop"
    training = passes.but(train=True, seed=cfg.run.seed, view_count=loader_views(method), original_crop=random_crop)
    loader = make_loader(training, train_images, pairs, bad_files)
    loader.alpha = cfg.method.ccrop_alpha
    # Un-augmented passes over the training images: the kNN bank (a seeded subset, --knn-bank) and
    # ContrastiveCrop's localisation (every image); one loader when both read every image.
    source = train_images if bank_source is None else bank_source
    bank_ids = subset(len(source), knn_bank(cfg, len(train_images)), cfg.run.seed)
    whole = len(bank_ids) == len(source)
    bank_images = source if whole else select(source, bank_ids)
    bank_loader = make_loader(passes, bank_images, bad_files=bad_files) if val_images else None
    box_loader = None
    if cfg.method.crop == "ccrop" and cfg.method.ccrop_boxes == "pass":
        shared = whole and bank_loader is not None and bank_source is None
        box_loader = bank_loader if shared else make_loader(passes, train_images, bad_files=bad_files)
    val_loader = make_loader(passes, val_images, bad_files=bad_files) if val_images else None
    return Loaders(loader, bank_loader, box_loader, val_loader)


def training_step(
    model, method: Method, optimizer, scaler, augmented: dict, cfg: Config, generator, maps: dict | None = None
) -> torch.Tensor:
    """One training step on augmented float views; returns the loss, detached, on the device. With `maps` (a
    dict; `Method.original_map` methods only) f_q's map of the original is left in maps["original"]."""
    extra = {} if maps is None else {"maps": maps}
    with autocast(augmented[method.views[0]].device, cfg.optimisation.amp):
        loss, keys = method.step(model, augmented, cfg.method.temperature, generator, **extra)
        if cfg.method.loss_terms == "mean":
            loss = loss / method.terms
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.enqueue(keys)
    return loss.detach()


def augment_views(batch, method: Method, config: AugmentConfig, generator) -> tuple[dict, torch.Tensor | None]:
    """The method's views of a `Batch` augmented (float32, as `pipeline.augment.augment`, same draws in the same
    order) and the original's flip draws, (N,) bool on the device (None when the method has no original)."""
    augmented, flipped = {}, None
    for name in method.views:
        augmented[name], params = augment_with_draws(getattr(batch, name), config, generator)
        if name == "original":
            flipped = params.flip
    return augmented, flipped


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


def learning_rate(cfg: Config, epoch: int, fraction: float) -> float:
    """Linear warm-up over the first --warmup-epochs w (per step; `fraction` of the epoch done after this step),
    then MoCo's cosine decay, stepped per epoch, over the epochs after the warm-up: lr * (1 + cos(pi * p)) / 2
    with p = (epoch - w) / (epochs - w), clamped at 0. The cosine starts where the warm-up ends, at lr (the
    epochs' cosine from 0 would start below it: a drop at the boundary), and with no warm-up it is MoCo's."""
    opt = cfg.optimisation
    warmup = opt.warmup_epochs
    if epoch + fraction <= warmup:
        return opt.lr * (epoch + fraction) / warmup
    progress = max(0.0, epoch - warmup) / (opt.epochs - warmup)
    return opt.lr * 0.5 * (1 + math.cos(math.pi * progress))


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


class BadFileLog:
    """The run's files found undecodable mid-run (`files`, shared by its loaders). `share` makes them the same on
    every rank and has rank 0 append the new ones to RUN_DIR/bad_files.txt, one line each: the path, a tab, the
    reason. Checkpoints hold them; a resumed run starts with the checkpoint's and the file's (a fresh run in
    the same folder starts a new file)."""

    NAME = "bad_files.txt"

    def __init__(self, out: Path, resume: dict | None, main_rank: bool) -> None:
        self.path, self.main_rank = out / self.NAME, main_rank
        listed = []
        if resume is not None and self.path.exists():
            listed = [tuple(line.rsplit("\t", 1)) for line in self.path.read_text().splitlines() if "\t" in line]
        elif resume is None and main_rank:
            self.path.unlink(missing_ok=True)
        self.written = {path for path, _ in listed}
        self.files = BadFiles([*(tuple(entry) for entry in (resume or {}).get("bad_files", [])), *listed])

    def share(self) -> None:
        """Every rank's new finds to every rank (one all-gather of objects; none with one process) and the file
        brought up to date. A collective: every rank calls it at the same point."""
        for found in gather_objects(self.files.take_pending()):
            for path, reason in found:
                self.files.add(path, reason, found_here=False)
        new = [(path, reason) for path, reason in self.files.reasons.items() if path not in self.written]
        if self.main_rank and new:
            with self.path.open("a") as file:
                file.writelines(f"{path}\t{reason}\n" for path, reason in new)
        self.written.update(path for path, _ in new)

    def entries(self) -> list[tuple[str, str]]:
        return list(self.files.reasons.items())


def verify_splits(
    cfg: Config, splits: tuple[ImageList, ImageList | None], rank: int = 0, world: int = 1, echo=click.echo
) -> tuple[ImageList, ImageList | None]:
    """--verify: every image of the folder splits fully decoded before training (`pipeline.verify.verify`, its
    cache, the ranks sharing the work); files that fail stop the run with their list, or with --skip-bad are
    left out and listed on stderr. A .beton was decoded by the converter when it was written: nothing to do."""
    verified = []
    for name, images in zip(("train", "val"), splits):
        if images is None or images.beton is not None:
            if images is not None:
                echo(f"--verify: {images.beton} was fully decoded when pipeline.convert wrote it")
            verified.append(images)
            continue
        workers = cfg.data.workers or machine_workers()
        file = cache_file(images.paths)
        bad, decoded = verify(images.paths, workers, file, rank, world, gather_objects)
        echo(f"verify {name}: {decoded} of {len(images)} images decoded, the others known from {file}")
        if bad and not cfg.data.skip_bad:
            listed = "\n".join(f"  {path}: {reason}" for path, reason in bad.items())
            raise click.ClickException(
                f"{len(bad)} of {len(images)} {name} images do not decode (nothing was trained; --skip-bad leaves "
                f"them out):\n{listed}"
            )
        for path, reason in bad.items():
            echo(f"skipped {path}: {reason}", err=True)
        keep = [i for i, path in enumerate(images.paths) if path not in bad]
        verified.append(select(images, keep) if bad else images)
    return verified[0], verified[1]


def knn_monitor(model, bank_loader, val_loader, cfg: Config, signals: StopSignals | None = None) -> float | None:
    """Weighted kNN top-1 of the query backbone: the bank subset's features vote for each val image. Computed on
    rank 0 (None on the others, and without a val split); on CUDA the bank is unit-length float16. With `signals`
    a stop signal cuts the passes short: `Stopped` on every rank (`stoppable_passes`)."""
    if val_loader is None:
        return None
    net = model.query_encoder.backbone
    half = bank_loader.device.type == "cuda"  # CPU matmuls in float16 are slow: float32 there, as before
    embed = partial(
        extract_features,
        net,
        amp=cfg.optimisation.amp,
        dtype=torch.float16 if half else torch.float32,
        l2_normalize=half,
    )
    bank, val = stoppable_passes(
        signals,
        bank_loader.device,
        lambda stop: embed(bank_loader, desc="kNN bank", stop=stop),
        lambda stop: embed(val_loader, desc="kNN val", stop=stop),
    )
    # Each rank embeds its part of the files; gathered in rank order on rank 0 they are the files in order.
    (bank, bank_labels), (val, val_labels) = map(gather_to_main, bank), map(gather_to_main, val)
    if bank is None:
        return None
    classes = len(bank_loader.images.classes)
    return knn_top1(bank, bank_labels, val, val_labels, classes, cfg.run.knn_k, cfg.run.knn_temperature)


def pixel_knn(bank_loader, val_loader, cfg: Config, signals: StopSignals | None = None) -> float | None:
    """The kNN monitor's score (its k, T, bank and queries) of raw pixels (`pixel_features`): what the trained
    features are measured against. On rank 0 (None on the others, and without a val split). `signals` as
    `knn_monitor`."""
    if val_loader is None:
        return None
    bank, val = stoppable_passes(
        signals,
        bank_loader.device,
        lambda stop: pixel_features(bank_loader, stop=stop),
        lambda stop: pixel_features(val_loader, stop=stop),
    )
    (bank, bank_labels), (val, val_labels) = map(gather_to_main, bank), map(gather_to_main, val)
    if bank is None:
        return None
    classes = len(bank_loader.images.classes)
    return knn_top1(bank, bank_labels, val, val_labels, classes, cfg.run.knn_k, cfg.run.knn_temperature)


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


def box_pass(model, loader, cfg: Config, device: torch.device, signals: StopSignals | None = None) -> np.ndarray:
    """ContrastiveCrop's reference localisation pass: every training image's box (N, 4) float32 from the query
    encoder, each rank boxing its part of the images (zeros elsewhere: the sum over ranks is every box).
    `signals` as `knn_monitor`."""
    context = partial(autocast, device, cfg.optimisation.amp)
    [boxes] = stoppable_passes(
        signals, device, lambda stop: localize(model.query_encoder, loader, cfg.method.ccrop_k, context, stop)
    )
    return sum_arrays(boxes)


def knn_due(cfg: Config, epoch: int) -> bool:
    """Whether the kNN monitor runs after `epoch` epochs (0 = before training): every --knn-every, and the last."""
    return epoch % cfg.run.knn_every == 0 or epoch == cfg.optimisation.epochs


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
