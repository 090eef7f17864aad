"""Self-supervised pre-training: LeOCLR or MoCo-v2, on a folder of images (DALI, torchvision: ImageNet-layout
class folders, or any folder of images without labels) or FFCV .beton files (FFCV).

    python train.py --loader dali                      # defaults: embedded Fashion-MNIST, a CPU-sized run
    python -m pipeline.convert data/fashion-mnist data/fashion-mnist-ffcv && \
        python train.py --loader ffcv --data data/fashion-mnist-ffcv                    # the same run from FFCV
    python train.py --config configs/imagenet.yaml --data /imagenet                    # the paper's ImageNet recipe
    python train.py --data ~/photos --val-data data/fashion-mnist     # unlabelled photos; kNN on a labelled folder
    python train.py --config runs/x/config.json --out runs/x-again    # run x again
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from model.config import DataConfig, options
from model.options import Command

if TYPE_CHECKING:
    from model.config import Config
    from pipeline.data import ImageList
    from run.setup import RunImages

DEFAULT_DATA = Path(DataConfig.data)
NOT_SETTINGS = ("resume", "config_file", "overwrite")  # options that say how to start, not what the run is


def train(cfg: Config, resume: dict | None, images: RunImages) -> list[dict]:
    """The run: loaders, model, the kNN monitor before training, then the epochs with their checkpoints, box
    updates and metrics; stops with a checkpoint on SIGTERM/SIGINT/SIGUSR1. Files that fail to decode mid-run
    are left out (RUN_DIR/bad_files.txt). Returns the metrics records. The kNN monitor scores `images.val` against
    a bank from `images.bank` (--val-data's train split) or the training images; without `images.val` it is off,
    `images.knn_off` saying why. The parts and what happens between the steps are `run.setup.Run`'s."""
    # Imported here, not at the top: --help and the one-line refusals need no torch (tests patch run/'s modules).
    from run.setup import set_up
    from run.step import augment_views, learning_rate, training_step
    from run.stop import CHECK_EVERY, check_finite, poll

    run = set_up(cfg, resume, images)
    model, method, optimizer, scaler = run.model, run.method, run.optimizer, run.scaler
    crop, report = run.crop, run.report  # ContrastiveCrop's boxes; the console, bar, metrics.jsonl, TensorBoard
    loader, steps = run.loaders.train, len(run.loaders.train)
    # From here on a stop signal is honoured wherever it comes: in a step, a checkpoint write, a pass.
    with run.signals as signals:
        start_epoch, start_step = run.begin()
        for epoch in range(start_epoch, cfg.optimisation.epochs):
            skip = start_step if epoch == start_epoch else 0  # batches an interrupted run already trained on
            run.before_epoch(epoch, skip)
            progress = run.start_epoch(epoch, skip)
            for step, batch in enumerate(report.progress_bar(loader.epoch(epoch, skip), epoch, skip), start=skip):
                lr = learning_rate(cfg, epoch, (step + 1) / steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                augmented, flipped = augment_views(batch, method, run.aug, progress.generator)
                maps = crop.maps(epoch)  # {}: the step leaves f_q's map of the original there for the boxes
                loss = training_step(model, method, optimizer, scaler, augmented, cfg, progress.generator, maps)
                crop.record(batch.indices, maps, flipped, epoch * steps + step + 1)
                progress.add(loss, len(batch.labels))  # stays on the device: no sync per step
                if (step + 1) % CHECK_EVERY and step + 1 < steps:
                    continue  # nothing read back: the host queues the next steps while the device computes
                loss_sum = poll(signals, progress.loss_sum, run.bad_log)
                check_finite(loss_sum, epoch, step, run.out)
                report.polled(epoch, step, loss_sum, progress.seen, progress.seconds(), lr, crop.passes())
                if signals.number and step + 1 < steps:  # at the last step: the epoch's own checkpoint below
                    run.stop_within(epoch, step, progress)
            run.end_epoch(epoch, progress, lr)
    return run.finish()


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@options()  # every setting of model/config.py, declared there with its type, default and help
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace the run an explicit --out holds (its checkpoint, metrics, config, events); without it such a "
    "--out is refused, and the default --out moves on to a fresh folder (runs/<method>-<loader>-2, ...).",
)
@click.option(
    "--resume",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Continue from RUN_DIR/checkpoint.pt with its options; options given here override them.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Options from a YAML file (keys: these options' names, dashes or underscores, flat or under any of the "
    "sections data, model, method, optimisation, run: docs/training.md lists which holds which; "
    "configs/imagenet.yaml is the paper's ImageNet recipe) or a run's config.json (trains that run again); options "
    "given here override them.",
)
@click.pass_context
def main(ctx: click.Context, resume: Path | None, config_file: Path | None, overwrite: bool, **options) -> None:
    """Pre-train a ResNet without labels with LeOCLR (original -> query encoder, two crops -> momentum
    encoder), MoCo-v2, SePP-ID, SimCLR or end-to-end LeOCLR, monitoring weighted kNN top-1 on the val split
    before training and after each epoch. Under torchrun, one process per GPU (DDP)."""
    from model.board import tensorboard_missing
    from model.config import LEGACY, resolve
    from pipeline import require_backend
    from run.directory import check_resume, claim, run_files
    from run.report import missing_record
    from run.state import load_checkpoint

    state, saved, main_rank = None, {}, os.environ.get("RANK", "0") == "0"
    given = {k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    from_file = {} if config_file is None else read_options(ctx, config_file)
    if resume is not None:
        try:
            state = load_checkpoint(resume)
        except ValueError as error:
            raise click.ClickException(str(error)) from error
        saved = {**LEGACY, **state["config"]}  # checkpoints from before an option existed ran with LEGACY's value
        options = {**saved, **from_file, **{k: options[k] for k in given}}
        if saved.get("amp_auto") and "amp" not in given | set(from_file):
            options["amp"] = "auto"  # chosen by the hardware: choose again on the machine that resumes
        options["out"] = options["out"] if "out" in given | set(from_file) else str(resume.parent)
        # Another number of processes goes on with the same global schedule; batch norm follows the new topology
        # when the checkpoint's --bn-splits was the old one's default (1 under torchrun, 8 alone).
        saved_world, world = options.get("world_size", 1), int(os.environ.get("WORLD_SIZE", "1"))
        if (
            world != saved_world
            and "bn_splits" not in given | set(from_file)
            and options.get("bn_splits") == (8 if saved_world == 1 else 1)
        ):
            options["bn_splits"] = None
    else:  # the file's settings over the defaults, the command line's over both
        options = {**options, **from_file, **{k: options[k] for k in given}}
    chosen = {k for k in given | set(from_file) | set(saved) if options.get(k) is not None}  # the rest may be fitted
    try:
        cfg = resolve(options, given=chosen)
    except ValueError as error:  # a setting this version does not know, in the checkpoint's config
        raise click.ClickException(f"{resume}: {error}" if resume is not None else str(error)) from error
    if state is not None:  # before anything is written: what the checkpoint fixes stays, what changes is said
        notes = check_resume(saved, cfg.to_dict(), given | set(from_file))
        if notes and main_rank:
            click.echo(f"resumed with changed settings: {', '.join(notes)}")
    # A checkpoint of the last epoch whose metrics line a stop or kill left out has that line still to write.
    unlogged = None if state is None else missing_record(state, Path(cfg.run.out) / "metrics.jsonl")
    if (
        state is not None
        and state.get("epoch", 0) >= cfg.optimisation.epochs
        and not state.get("step")
        and not unlogged
    ):
        done = state.get("epoch", 0)  # nothing left to train: say so, write nothing
        raise click.ClickException(
            f"{resume}: the run is complete ({done} of {cfg.optimisation.epochs} epochs trained); train on with "
            f"--resume {resume} --epochs N (N > {done}; the lr's cosine then runs over N epochs)"
        )
    require_backend(cfg.data.loader)  # DALI and FFCV are optional: say how to install one before indexing any data
    if cfg.run.tensorboard and (missing := tensorboard_missing()) is not None:
        raise click.ClickException(f"--tensorboard: {missing}")
    lock = None
    if main_rank:  # before any work: a folder of its own, never an earlier run's without --overwrite, writable
        folder, lock = claim(Path(cfg.run.out), "out" in given | set(from_file), resume, overwrite)
        cfg.run.out = str(folder)
    try:
        prepare_and_train(cfg, state, chosen)
    except BaseException:
        if lock is not None and not run_files(Path(cfg.run.out)):
            lock.abandon()  # stopped before the run wrote anything: nothing left behind
        raise
    finally:
        if lock is not None:
            lock.release()


def prepare_and_train(cfg: Config, state: dict | None, chosen: set[str]) -> None:
    """Index the data, fit what was not chosen to it, and train (`train`); one-line errors for unusable data."""
    from model.config import fit_to_images
    from pipeline.backends import load_splits
    from pipeline.semantic_pairs import read_pairs

    data = cfg.data
    try:
        splits = load_splits(
            data.data, data.loader, data.train_limit, data.val_limit, cfg.run.seed, data.skip_bad, data.labels
        )
        fit_to_images(cfg, len(splits[0]), chosen)
        monitor = monitor_splits(cfg, *splits)
        for split in (*splits, *monitor[:2]):
            for path, reason in split.skipped if split is not None else ():
                click.echo(f"skipped {path}: {reason}", err=True)
        if cfg.method.pairs is not None:
            read_pairs(cfg.method.pairs, len(splits[0]))  # a clear error now rather than a trace later
    except (FileNotFoundError, ValueError) as error:
        hint = ""
        if Path(cfg.data.data) == DEFAULT_DATA.absolute() and not DEFAULT_DATA.is_dir():
            hint = " (prepare it with: python -m pipeline.fashion_mnist data/fashion-mnist)"
        raise click.ClickException(f"{error}{hint}") from error
    bank, queries, knn_off = monitor
    if cfg.fitted and os.environ.get("RANK", "0") == "0":
        fitted = ", ".join(cfg.fitted)
        click.echo(f"fitted to the batch and the {len(splits[0])} training images: {fitted} (pass one to choose it)")
    from run.setup import RunImages  # torch, now that the run starts

    history = train(cfg, state, RunImages(splits[0], queries, bank, knn_off))
    final = history[-1]["knn_top1"] if history else None
    if final is not None and os.environ.get("RANK", "0") == "0":
        click.echo(f"final kNN top-1: {100 * final:.2f}% (run directory {cfg.run.out})")


def read_options(ctx: click.Context, path: Path) -> dict:
    """A --config file's settings as this command's options would have them: each value converted and checked by
    its option's type (YAML's 1e-4 is a string; a choice must be one of its choices). One-line errors name the
    file and the key."""
    from model.config import read_file

    try:
        values = read_file(path)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    params = {param.name: param for param in ctx.command.params}
    for name, value in values.items():
        param = params.get(name)
        if param is None or name in NOT_SETTINGS:
            raise click.ClickException(f"{path}: {name!r} is not a setting (give it on the command line)")
        try:
            values[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as error:
            raise click.ClickException(f"{path}: {name}: {error.message}") from error
    return values


def monitor_splits(
    cfg: Config, train_images: ImageList, val_images: ImageList | None
) -> tuple[ImageList | None, ImageList | None, str]:
    """What the kNN monitor reads: (bank source or None = the training images, queries or None = off, why off).
    --val-data's train and val splits (labelled, else ValueError), else --data's val split when it and the
    training images are labelled."""
    from pipeline.backends import load_splits

    data = cfg.data
    if data.val_data is not None:
        # All of VAL_DATA/train is listed: the bank is --knn-bank's seeded subset of it.
        bank, queries = load_splits(data.val_data, data.loader, 0, data.val_limit, cfg.run.seed, data.skip_bad)
        if queries is None:
            raise ValueError(f"--val-data {data.val_data} has no val split: the kNN monitor's queries (VAL_DATA/val)")
        if not (bank.labelled and queries.labelled):
            raise ValueError(
                f"--val-data {data.val_data} has no labels: the kNN monitor needs class folders, "
                "VAL_DATA/train/<class>/<image> and VAL_DATA/val/<class>/<image>"
            )
        return bank, queries, ""
    if not train_images.labelled:
        return None, None, "the training images have no labels (--val-data LABELLED_FOLDER turns it on)"
    if val_images is None:
        return None, None, f"{data.data} has no val split (--val-data LABELLED_FOLDER turns it on)"
    if not val_images.labelled:
        return None, None, f"{data.data}'s val split has no labels (--val-data LABELLED_FOLDER turns it on)"
    return None, val_images, ""


if __name__ == "__main__":
    main()
