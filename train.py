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

from model.options import AMP_CHOICES, ARCHS, METHOD_NAMES, Command, Count, Integer, Real
from pipeline.backends import BACKENDS
from pipeline.data import LABELS

if TYPE_CHECKING:
    from model.config import Config
    from pipeline.data import ImageList

DEFAULT_DATA = Path("data/fashion-mnist")
NOT_SETTINGS = ("resume", "config_file", "overwrite")  # options that say how to start, not what the run is


def train(
    cfg: Config,
    resume: dict | None,
    train_images: ImageList,
    val_images: ImageList | None,
    bank_images: ImageList | None = None,
    knn_off: str = "",
) -> list[dict]:
    """The run: loaders, model, the kNN monitor before training, then the epochs with their checkpoints, box
    updates and metrics; stops with a checkpoint on SIGTERM/SIGINT/SIGUSR1. Files that fail to decode mid-run
    are left out (RUN_DIR/bad_files.txt). Returns the metrics records. The kNN monitor scores `val_images` against
    a bank from `bank_images` (--val-data's train split) or the training images; without `val_images` it is off,
    `knn_off` saying why. The parts and what happens between the steps are `run.setup.Run`'s."""
    # Imported here, not at the top: --help and the one-line refusals need no torch (tests patch run/'s modules).
    from run.setup import set_up
    from run.step import augment_views, learning_rate, training_step
    from run.stop import CHECK_EVERY, check_finite, poll

    run = set_up(cfg, resume, train_images, val_images, bank_images, knn_off)
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
@click.option(
    "--loader",
    type=click.Choice(BACKENDS),
    default="dali",
    help="Data loading backend: dali (JPEG folder; GPU decode on CUDA), ffcv (.beton files) or torchvision "
    "(the PIL reference).",
)
@click.option(
    "--method",
    type=click.Choice(sorted(METHOD_NAMES)),
    default="leoclr",
    help="Training objective: leoclr, mocov2, sepp (MoCo-v2 on the images plus SePP-ID's semantic pairs, --pairs), "
    "simclr (end to end, in-batch negatives) or leoclr-e2e (LeOCLR end to end, Table 5).",
)
@click.option(
    "--symmetric",
    is_flag=True,
    default=False,
    help="mocov2/sepp: both directions, l(q1, k2) + l(q2, k1), both keys enqueued.",
)
@click.option(
    "--attract-all",
    is_flag=True,
    default=False,
    help="leoclr, Table 8 ablation: also pull crop 1 toward crop 2 (every pair of the three views attracted).",
)
@click.option(
    "--original",
    type=click.Choice(["whole", "random-crop"]),
    default="whole",
    help="The original view: the whole image resized, or (Table 8 ablation) a RandomResizedCrop of its own.",
)
@click.option(
    "--pairs",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Semantic positive pairs for --method sepp, from python -m model.pairs (same data, --train-limit, --seed).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATA,
    help="A folder of JPEG, PNG or WebP images: DATA/train/ (+ optional DATA/val/, the kNN monitor's queries) when "
    "DATA has a train/ folder, else all of DATA, at any depth; ImageNet's DATA/train/<class>/*.JPEG or any "
    "unlabelled collection (see --labels). For --loader ffcv a folder with train.beton (+ optional val.beton) or one "
    ".beton file, made by python -m pipeline.convert.",
)
@click.option(
    "--labels",
    type=click.Choice(LABELS),
    default="auto",
    help="Labels of --data's folders (training needs none; the kNN monitor on DATA/val does): folders = the first "
    "folder under a split is the class; none = no labels (subfolders mean nothing); auto = folders when every image "
    "sits exactly one folder down (SPLIT/<class>/<image>), none for flat folders and mixed depths.",
)
@click.option(
    "--val-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A labelled folder for the kNN monitor instead of --data's val split (for unlabelled --data): the bank "
    "from VAL_DATA/train/<class>/ (--knn-bank), the queries VAL_DATA/val/<class>/ (--val-limit); for --loader ffcv "
    "a folder with train.beton and val.beton. Without it and a labelled DATA/val the monitor is off (the run says so).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (config.json, metrics.jsonl, checkpoint.pt). [default: runs/<method>-<loader>]",
)
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
@click.option("--arch", type=click.Choice(ARCHS), default="resnet18")
@click.option(
    "--image-size",
    type=Integer(min=8),
    default=16,
    help="Training resolution S; S <= 64 uses the small-image stem. The defaults (16 px, 2,000 images, 6 epochs) "
    "size a run for minutes on a 2-core CPU; README: the full recipe.",
)
@click.option("--epochs", type=Count(), default=6)
@click.option(
    "--batch-size",
    type=Count(),
    default=64,
    help="Global batch (split over torchrun's processes): a multiple of the processes, each one's part a multiple "
    "of --bn-splits, at most the training images. Not given, a folder of fewer images gets the largest batch that "
    "fits it (and the run says so).",
)
@click.option(
    "--lr",
    type=Real(min=0, min_open=True),
    default=0.015,
    help="Base learning rate (cosine decay per epoch). 0.015 with --loss-terms mean: the best LeOCLR kNN measured "
    "at the default run's size (6 epochs, 16 px, 2,000 images, 3 seeds; docs/RESULTS.md), the only setting there "
    "whose features end above raw pixels; the papers' 0.03 for batch 256 (and --loss-terms sum) is "
    "configs/imagenet.yaml.",
)
@click.option("--warmup-epochs", type=Real(min=0), default=0.0, help="Linear learning-rate warm-up, in epochs.")
@click.option("--weight-decay", type=Real(min=0), default=5e-4)
@click.option("--moco-momentum", type=Real(0, 1), default=0.99, help="Key-encoder momentum m.")
@click.option(
    "--queue-size",
    type=Count(),
    default=1024,
    help="Number of negative keys K: a multiple of --batch-size (MoCo's queue turns over in whole batches). Not "
    "given, the multiple of the batch nearest 1024 and at most the training images (older keys of the same images "
    "would be negatives).",
)
@click.option("--temperature", type=Real(min=0, min_open=True), default=0.1, help="InfoNCE temperature T.")
@click.option(
    "--loss-terms",
    type=click.Choice(["sum", "mean"]),
    default="mean",
    help="How a method with several InfoNCE terms (leoclr: l(u, v1) + l(u, v2); --attract-all: 3; --symmetric, "
    "leoclr-e2e: 2) combines them: mean = their average (the default), so a step at a given --lr moves as far as a "
    "one-term method's (MoCo-v2's) and one lr suits every method; sum = the papers' equations (configs/imagenet.yaml), "
    "the mean at twice the lr, weight decay aside. Measured at the default run's size, LeOCLR at lr 0.03: kNN 62.9 "
    "summed, 66.8 averaged (seed 0; docs/RESULTS.md).",
)
@click.option(
    "--bn-splits",
    type=Count(),
    default=None,
    help="Split batch norm groups (1 = plain BN); each process's batch must divide into them. [default: 8 with one "
    "process, where split BN stands in for shuffle BN (fewer where 8 do not divide the batch, or leave a group under "
    "2 images); 1 under torchrun, where keys are shuffled across the ranks as in MoCo] One process refuses 1 for "
    "the momentum-encoder methods: each query and its key would share batch statistics.",
)
@click.option(
    "--crop",
    type=click.Choice(["random", "ccrop"]),
    default="random",
    help="Crops of the two augmented views: RandomResizedCrop, or ContrastiveCrop (centres sampled around a "
    "box per image found from the model's own heatmap; the LeOCLR original is never cropped).",
)
@click.option("--ccrop-k", type=Real(0, 1), default=0.1, help="ContrastiveCrop heatmap threshold k.")
@click.option(
    "--ccrop-alpha",
    type=Real(min=0, min_open=True),
    default=None,
    help="ContrastiveCrop Beta(alpha, alpha) for crop centres. [default: by --image-size, as the reference "
    "configs: 0.1 up to 96 px (CIFAR, Tiny ImageNet, STL-10), 0.6 above (ImageNet)]",
)
@click.option(
    "--ccrop-warmup",
    type=Integer(min=0),
    default=None,
    help="Epochs of RandomResizedCrop before crops are sampled around boxes. As in the reference code, the boxes "
    "are recomputed once e epochs are done where e >= this, e is a multiple of --ccrop-interval and epochs remain, "
    "and are whole images until then: a warm-up of 0 never boxes with random weights. [default: 20% of --epochs]",
)
@click.option(
    "--ccrop-interval",
    type=Count(),
    default=None,
    help="Epochs between box updates. [default: 20% of --epochs]",
)
@click.option(
    "--ccrop-boxes",
    type=click.Choice(["pass", "forward"]),
    default="pass",
    help="Where ContrastiveCrop's boxes come from: pass = the reference's localisation pass over every training "
    "image at each update; forward = LeOCLR's training forward (--method leoclr: f_q's map of each sample's whole "
    "original refreshes its box at every step, no extra pass). README: how the two compare.",
)
@click.option("--blur/--no-blur", default=None, help="Gaussian blur p=0.5. [default: on when S > 64]")
@click.option("--color-jitter/--no-color-jitter", default=True, help="Colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8.")
@click.option(
    "--grayscale/--no-grayscale",
    default=True,
    help="Random grayscale p=0.2. Without jitter, grayscale and blur: only random crop (+ flip), Figure 4.",
)
@click.option(
    "--train-limit",
    type=Integer(min=0),
    default=2000,
    help="Use a seeded random subset of this many train images (0 = all).",
)
@click.option(
    "--val-limit",
    type=Integer(min=0),
    default=2000,
    help="Same for the val split used by the kNN monitor (0 = all).",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    default=False,
    help="Leave out images no loader can decode (listed) instead of stopping before training with their list.",
)
@click.option(
    "--verify",
    is_flag=True,
    default=False,
    help="Decode every image fully before training (in parallel; cached by path, size and mtime in "
    "$LEOCLR_CACHE, default ~/.cache/leoclr) and stop on those that fail, or leave them out with --skip-bad.",
)
@click.option("--knn-k", type=Count(), default=200)
@click.option("--knn-temperature", type=Real(min=0, min_open=True), default=0.1)
@click.option(
    "--knn-every",
    type=Count(),
    default=1,
    help="Epochs between kNN monitor evaluations (before training, every N epochs, and always after the last).",
)
@click.option(
    "--knn-bank",
    type=Integer(min=0),
    default=None,
    help="kNN monitor bank: a seeded subset of this many images of the bank's source, --data's training images or "
    "--val-data's train split (0 = all). [default: as many as the run trains on, at least 2,000 (a bank for a small "
    "folder's --val-data monitor) and at most 131,072 (ImageNet's bank pass near a tenth of an epoch; 1.28M x 2048 "
    "in float16, 5 GB on rank 0, would fit a 40 GB GPU too)]",
)
@click.option(
    "--amp",
    type=click.Choice(AMP_CHOICES),
    default="auto",
    help="Precision: auto = bf16 on a GPU that supports it (else fp16 with a gradient scaler); on a CPU bf16 only "
    "where a short probe of the model finds it faster than fp32 (CPUs without native bf16 emulate it, ~7x slower), "
    "else fp32. bf16/fp16 force autocast (fp16 only on CUDA), off = fp32. The choice and reason go to config.json.",
)
@click.option(
    "--workers",
    type=Integer(min=0),
    default=None,
    help="Loader threads (DALI, FFCV) or processes (torchvision). [default: this process's share of the CPU "
    "cores, less one for the trainer]",
)
@click.option(
    "--device",
    default="auto",
    help="auto = cuda where torch can use a GPU, else cpu (stops, saying what to install, where an NVIDIA GPU is "
    "here that torch cannot use); cpu, cuda or cuda:N.",
)
@click.option(
    "--compile",
    is_flag=True,
    default=False,
    help="torch.compile the query and key encoders (minutes of compiling first). Off by default: measured "
    "faster only where benchmarks/train_step.py --compile says so (see README).",
)
@click.option(
    "--tensorboard/--no-tensorboard",
    default=None,
    help="TensorBoard event files in the run directory: per-step loss, lr and img/s, per-epoch metrics, pictures of "
    "the views (metrics.jsonl stays the record). [default: on when the tensorboard package is installed]",
)
@click.option("--seed", type=Integer(), default=0)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Options from a YAML file (keys: these options' names, dashes or underscores, flat or under any of the "
    "sections data, model, method, optimisation, run: README lists which holds which; configs/imagenet.yaml is the "
    "paper's ImageNet recipe) or a run's config.json (trains that run again); options given here override them.",
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
    history = train(cfg, state, splits[0], queries, bank, knn_off)
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
