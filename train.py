"""Self-supervised pre-training: LeOCLR or MoCo-v2, on an ImageNet-layout folder (DALI, torchvision) or FFCV
.beton files (FFCV).

    python train.py --loader dali                      # defaults: embedded Fashion-MNIST, a CPU-sized run
    python -m pipeline.convert data/fashion-mnist data/fashion-mnist-ffcv && \
        python train.py --loader ffcv --data data/fashion-mnist-ffcv                    # the same run from FFCV
    python train.py --loader dali --data /imagenet --arch resnet50 --image-size 224 --batch-size 256 \\
        --lr 0.03 --moco-momentum 0.999 --queue-size 65536 --temperature 0.2 --weight-decay 1e-4 \\
        --epochs 200 --train-limit 0 --val-limit 0 --blur           # the paper's ImageNet recipe
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from model import distributed
from model.backbone import ARCHS
from model.distributed import gather, gather_uneven, sum_arrays
from model.evaluation import autocast, extract_features, load_checkpoint
from model.knn import knn_top1
from model.methods import METHODS, Method, method_for
from model.moco import MomentumContrast
from pipeline.augment import AugmentConfig, augment
from pipeline.ccrop import localize, update_epochs
from pipeline.data import ImageList, load_splits
from pipeline.loader import BACKENDS, make_loader
from pipeline.pairs import read_pairs

DEFAULT_DATA = Path("data/fashion-mnist")


def knn_monitor(model, bank_loader, val_loader, cfg) -> float | None:
    if val_loader is None:
        return None
    net = model.query_encoder.backbone
    # Each rank embeds its part of the files; the parts, gathered in rank order, are the files in order.
    bank, bank_labels = map(gather_uneven, extract_features(net, bank_loader, cfg["amp"], "kNN bank"))
    val, val_labels = map(gather_uneven, extract_features(net, val_loader, cfg["amp"], "kNN val"))
    classes = len(bank_loader.images.classes)
    return knn_top1(bank, bank_labels, val, val_labels, classes, cfg["knn_k"], cfg["knn_temperature"])


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash leaves the previous checkpoint whole."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def append_atomic(path: Path, line: str) -> None:
    """Append a line by rewriting the file through a temporary one: never a half-written metrics line."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text((path.read_text() if path.exists() else "") + line + "\n")
    os.replace(tmp, path)


class NonFiniteLoss(click.ClickException):
    """The loss became NaN or infinite: the run stops before writing a checkpoint of the broken weights."""


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


def train(cfg: dict, resume: dict | None, train_images: ImageList, val_images: ImageList | None) -> list[dict]:
    cuda = cfg["device"].startswith("cuda")
    rank, world, local_rank = distributed.init_from_env(cuda)
    device = torch.device("cuda", local_rank) if cuda and world > 1 else torch.device(cfg["device"])
    if cuda:
        if device.index is not None:
            torch.cuda.set_device(device)  # --device cuda:N: kernels, streams and NCCL on that GPU, not on GPU 0
        torch.backends.cudnn.benchmark = True  # the step's shapes never change: time cuDNN's algorithms once
        torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls (the heads, the logits)
    main_rank = rank == 0  # the only one that prints and writes
    echo = click.echo if main_rank else lambda *args, **kwargs: None
    out = Path(cfg["out"])
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.manual_seed(cfg["seed"])
    if world > 1:
        echo(f"{world} processes ({'nccl' if cuda else 'gloo'}), {cfg['batch_size'] // world} images per rank and step")
    echo(
        f"data {cfg['data']}: {len(train_images)} train images"
        + (f", {len(val_images)} val images" if val_images else ", no val split (kNN off)")
        + f", {len(train_images.classes)} classes; device {device}, loader {cfg['loader']}"
    )
    common = dict(image_size=cfg["image_size"], batch_size=cfg["batch_size"] // world, device=device,
                  workers=cfg["workers"], rank=rank, world=world)  # fmt: skip
    method = method_for(cfg["method"], cfg["symmetric"], cfg["attract_all"])
    pairs = read_pairs(cfg["pairs"], len(train_images)) if method.pairs else None
    if pairs is not None:
        echo(f"SePP-ID: {len(pairs)} semantic pairs from {cfg['pairs']} added to the {len(train_images)} images")
    loader = make_loader(cfg["loader"], train_images, train=True, seed=cfg["seed"], views=loader_views(method),
                         pairs=pairs, original_crop=cfg["original"] == "random-crop", **common)  # fmt: skip
    # The un-augmented pass over the training images: the kNN bank and ContrastiveCrop's localisation.
    ccrop = cfg["crop"] == "ccrop"
    bank_loader = make_loader(cfg["loader"], train_images, train=False, **common) if val_images or ccrop else None
    loader.alpha = cfg["ccrop_alpha"]
    box_updates = update_epochs(cfg["epochs"], cfg["ccrop_warmup"], cfg["ccrop_interval"]) if ccrop else []
    val_loader = make_loader(cfg["loader"], val_images, train=False, **common) if val_images else None

    model, optimizer, scaler = build(cfg, device)
    if world > 1:
        model.distribute([local_rank] if cuda else None)
    aug = augment_config(cfg)
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []

    start_epoch, start_step, partial_sums = 0, 0, (0.0, 0, 0.0)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_states(resume["rng"])
        loader.boxes = resume.get("boxes")
        start_epoch, start_step = resume["epoch"], resume.get("step", 0)
        partial_sums = resume.get("partial", partial_sums)
        where = f"epoch {start_epoch}" + (f", step {start_step} of epoch {start_epoch + 1}" if start_step else "")
        echo(f"resumed after {where}")
    else:
        if main_rank:
            metrics_path.write_text("")
        knn = knn_monitor(model, bank_loader, val_loader, cfg)
        history.append(log_epoch(metrics_path if main_rank else None, 0, None, knn, None, None, None, None))

    with StopSignals() as signals:
        for epoch in range(start_epoch, cfg["epochs"]):
            skip = start_step if epoch == start_epoch else 0  # batches an interrupted run already trained on
            if epoch in box_updates and not skip:
                context = partial(autocast, device, cfg["amp"])
                # Each rank boxes its part of the images (zeros elsewhere): the sum over ranks is every box.
                loader.boxes = sum_arrays(localize(model.query_encoder, bank_loader, cfg["ccrop_k"], context))
                if main_rank:
                    np.save(out / "boxes.npy", loader.boxes)
                echo(f"ContrastiveCrop boxes updated before epoch {epoch + 1}: mean area {box_area(loader.boxes):.3f}")
            # Per rank: its own augmentation draws (the key shuffle over ranks uses rank 0's).
            generator = torch.Generator(device=device).manual_seed(cfg["seed"] * 1_000_003 + epoch + 7_919 * rank)
            model.train()
            total_loss, seen, started = torch.zeros((), device=device), 0, time.perf_counter()
            if skip:
                generator.set_state(resume["generator"].to(generator.device) if cuda else resume["generator"])
                total_loss += partial_sums[0]
                seen, started = partial_sums[1], started - partial_sums[2]
            bar = tqdm(loader.epoch(epoch, skip), total=len(loader), initial=skip, unit="batch",
                       desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not main_rank)  # fmt: skip
            for step, batch in enumerate(bar, start=skip):
                lr = learning_rate(cfg, epoch, (step + 1) / len(loader))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                views = {name: augment(getattr(batch, name), aug, generator) for name in method.views}
                loss = optimize(model, method, optimizer, scaler, views, cfg, generator)
                total_loss += loss * len(batch.labels)  # stays on the device: no sync per step
                seen += len(batch.labels)
                if (step + 1) % CHECK_EVERY and step + 1 < len(loader):
                    continue  # nothing read back: the host queues the next steps while the device computes
                loss_sum = poll(signals, total_loss)
                check_finite(loss_sum, epoch, step, out)
                rate = seen / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss_sum / (seen * world):.3f}", img_s=f"{rate:.0f}")
                if signals.number and step + 1 < len(loader):
                    bar.close()
                    if main_rank:  # mid-epoch: where the epoch stands, so a resume replays nothing and skips nothing
                        save_atomic(
                            {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch, "step": step + 1, "config": cfg,
                             "rng": rng_states(), "boxes": loader.boxes, "generator": generator.get_state().cpu(),
                             "partial": (total_loss.item(), seen, time.perf_counter() - started)},
                            out / "checkpoint.pt",
                        )  # fmt: skip
                    echo(f"{signals.name}: checkpoint written at epoch {epoch + 1}, step {step + 1}/{len(loader)}; "
                         f"continue with: python train.py --resume {out / 'checkpoint.pt'}", err=True)  # fmt: skip
                    close_all(loader, bank_loader, val_loader)
                    raise SystemExit(128 + signals.number)
            bar.close()  # the epoch's last step checked the loss
            epoch_time = time.perf_counter() - started
            # Every rank's loss sum and images: the epoch's loss and throughput over the whole world.
            total_loss, seen = (
                gather(torch.stack([total_loss.float(), torch.tensor(float(seen), device=device)])[None])
                .sum(0)
                .tolist()
            )
            epoch_loss = total_loss / seen
            if main_rank:
                save_atomic(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "config": cfg, "rng": rng_states(), "boxes": loader.boxes},
                    out / "checkpoint.pt",
                )  # fmt: skip
            knn = knn_monitor(model, bank_loader, val_loader, cfg)
            area = None if loader.boxes is None else box_area(loader.boxes)
            record = (epoch + 1, epoch_loss, knn, seen / epoch_time, lr, epoch_time, area)
            history.append(log_epoch(metrics_path if main_rank else None, *record))
    close_all(loader, bank_loader, val_loader)
    if world > 1:
        torch.distributed.barrier()  # rank 0's checkpoint is complete before anyone leaves
        torch.distributed.destroy_process_group()
    return history


def close_all(*loaders) -> None:
    """Release every loader that was built (None = not built)."""
    for each in loaders:
        if each is not None:
            each.close()


CHECK_EVERY = 10  # steps between the loop's looks at the stop flag and the loss (one collective, one host read)


class StopSignals:
    """SIGTERM and SIGINT (a preempted job, Ctrl-C) set a flag instead of killing the run; the loop checks it
    every CHECK_EVERY steps (`poll`) and stops there with a checkpoint. With several ranks all stop at the
    same step."""

    def __init__(self) -> None:
        self.number, self.previous = 0, {}

    def __enter__(self) -> StopSignals:
        for each in (signal.SIGTERM, signal.SIGINT):
            self.previous[each] = signal.signal(each, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for each, handler in self.previous.items():
            signal.signal(each, handler)

    def _note(self, number, frame) -> None:
        self.number = number

    @property
    def name(self) -> str:
        return signal.Signals(self.number).name if self.number else ""


def poll(signals: StopSignals, total_loss: torch.Tensor) -> float:
    """Every rank's stop signal (the largest goes to `signals.number`) and the sum over ranks of the running
    loss sums (scalar tensors on the device): one all_gather (none with one process) and one host read."""
    mine = torch.stack([total_loss.float(), total_loss.new_full((), float(signals.number))])  # no host-to-device copy
    everyone = gather(mine[None]).tolist()  # (world, 2)
    signals.number = int(max(number for _, number in everyone))
    return sum(loss for loss, _ in everyone)


def check_finite(total_loss: float, epoch: int, step: int, out: Path) -> None:
    """Stop (every rank) when the running loss sum is NaN or infinite; the last good checkpoint stays."""
    if not math.isfinite(total_loss):
        kept = (
            f"{out / 'checkpoint.pt'} holds the last good epoch"
            if (out / "checkpoint.pt").exists()
            else "no checkpoint yet"
        )
        raise NonFiniteLoss(f"the loss became {total_loss} in epoch {epoch + 1} (by step {step + 1}); stopped "
                            f"without saving ({kept}). Lower --lr or use --amp off/bf16.")  # fmt: skip


def build(cfg: dict, device: torch.device) -> tuple[MomentumContrast, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model (channels_last on `device`), its SGD optimizer and the gradient scaler (fp16 only)."""
    model = MomentumContrast(
        cfg["arch"], cfg["image_size"], queue_size=cfg["queue_size"], momentum=cfg["moco_momentum"],
        bn_splits=cfg["bn_splits"],
    ).to(device, memory_format=torch.channels_last)  # fmt: skip
    if cfg.get("compile"):  # in place: the state dict keeps its keys
        model.query_encoder.compile()
        model.key_encoder.compile()
    optimizer = torch.optim.SGD(
        model.query_encoder.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"]
    )
    return model, optimizer, torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")


def augment_config(cfg: dict) -> AugmentConfig:
    """MoCo-v2 aug+ with the parts --no-color-jitter, --no-grayscale and --no-blur remove (Figure 4)."""
    return AugmentConfig(jitter_p=0.8 if cfg["color_jitter"] else 0.0, grayscale_p=0.2 if cfg["grayscale"] else 0.0,
                         blur_p=0.5 if cfg["blur"] else 0.0)  # fmt: skip


def loader_views(method: Method) -> int:
    """Views a method's loader makes: MoCo-v2 never decodes or resizes an original it ignores."""
    return 3 if "original" in method.views else 2


def optimize(model, method: Method, optimizer, scaler, views: dict, cfg: dict, generator) -> torch.Tensor:
    """One training step on augmented float views; returns the loss, detached, on the device."""
    with autocast(views[method.views[0]].device, cfg["amp"]):
        loss, keys = method.step(model, views, cfg["temperature"], generator)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    model.enqueue(keys)
    return loss.detach()


def learning_rate(cfg: dict, epoch: int, fraction: float) -> float:
    """Linear warm-up over the first --warmup-epochs (per step; `fraction` of the epoch done after this step),
    then MoCo's cosine decay, stepped per epoch."""
    if epoch + fraction <= cfg["warmup_epochs"]:
        return cfg["lr"] * (epoch + fraction) / cfg["warmup_epochs"]
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / cfg["epochs"]))


def box_area(boxes: np.ndarray) -> float:
    """Mean area of ContrastiveCrop boxes, as a fraction of the image."""
    return float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))


def log_epoch(path: Path | None, epoch, loss, knn, images_per_sec, lr, epoch_time, area) -> dict:
    """The epoch's record, appended to metrics.jsonl and printed; with no path (ranks > 0) only returned."""
    record = {"epoch": epoch, "loss": loss, "knn_top1": knn, "images_per_sec": images_per_sec, "lr": lr,
              "epoch_time_s": epoch_time, "box_area": area}  # fmt: skip
    if path is None:
        return record
    append_atomic(path, json.dumps(record))
    shown = "n/a" if knn is None else f"{100 * knn:.2f}%"
    click.echo(f"epoch {epoch}: loss {'-' if loss is None else f'{loss:.4f}'}, kNN top-1 {shown}")
    return record


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option(
    "--loader",
    type=click.Choice(BACKENDS),
    default="dali",
    help="Data loading backend: dali (JPEG folder; GPU decode on CUDA), ffcv (.beton files) or torchvision "
    "(the PIL reference).",
)
@click.option(
    "--method",
    type=click.Choice(sorted(METHODS)),
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
    help="Semantic positive pairs for --method sepp, from python -m pipeline.pairs (same data, --train-limit, --seed).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATA,
    help="ImageNet-layout folder DATA/train/<class>/*.jpg (+ optional DATA/val/...); for --loader ffcv a folder "
    "with train.beton (+ optional val.beton) or one .beton file, made by python -m pipeline.convert.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (config.json, metrics.jsonl, checkpoint.pt). [default: runs/<method>-<loader>]",
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
    type=click.IntRange(min=8),
    default=32,
    help="Training resolution S; S <= 64 uses the small-image stem.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=6)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, help="Global batch (split over torchrun's processes)."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.015,
    help="Base learning rate (cosine decay per epoch).",
)
@click.option(
    "--warmup-epochs", type=click.FloatRange(min=0), default=0.0, help="Linear learning-rate warm-up, in epochs."
)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4)
@click.option("--moco-momentum", type=click.FloatRange(0, 1), default=0.99, help="Key-encoder momentum m.")
@click.option(
    "--queue-size",
    type=click.IntRange(min=1),
    default=1024,
    help="Number of negative keys K (a multiple of --batch-size).",
)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.1, help="InfoNCE temperature T.")
@click.option(
    "--bn-splits",
    type=click.IntRange(min=1),
    default=None,
    help="Split batch norm groups (1 = plain BN). [default: 8 with one process, where split BN stands in for "
    "shuffle BN; 1 under torchrun, where keys are shuffled across the ranks as in MoCo]",
)
@click.option(
    "--crop",
    type=click.Choice(["random", "ccrop"]),
    default="random",
    help="Crops of the two augmented views: RandomResizedCrop, or ContrastiveCrop (centres sampled around a "
    "box per image found from the model's own heatmap; the LeOCLR original is never cropped).",
)
@click.option("--ccrop-k", type=click.FloatRange(0, 1), default=0.1, help="ContrastiveCrop heatmap threshold k.")
@click.option(
    "--ccrop-alpha",
    type=click.FloatRange(min=0, min_open=True),
    default=0.6,
    help="ContrastiveCrop Beta(alpha, alpha) for crop centres.",
)
@click.option(
    "--ccrop-warmup",
    type=click.IntRange(min=0),
    default=None,
    help="Epochs of RandomResizedCrop before the first boxes. [default: 20% of --epochs]",
)
@click.option(
    "--ccrop-interval",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs between box updates. [default: 20% of --epochs]",
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
    type=click.IntRange(min=0),
    default=4000,
    help="Use a seeded random subset of this many train images (0 = all).",
)
@click.option(
    "--val-limit",
    type=click.IntRange(min=0),
    default=1000,
    help="Same for the val split used by the kNN monitor (0 = all).",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    default=False,
    help="Leave out images no loader can decode (listed) instead of stopping before training with their list.",
)
@click.option("--knn-k", type=click.IntRange(min=1), default=200)
@click.option("--knn-temperature", type=click.FloatRange(min=0, min_open=True), default=0.1)
@click.option(
    "--amp",
    type=click.Choice(["bf16", "fp16", "off"]),
    default="bf16",
    help="Mixed precision (fp16 only on CUDA, with a gradient scaler).",
)
@click.option("--workers", type=click.IntRange(min=0), default=2, help="Loader threads/processes.")
@click.option("--device", default="auto", help="auto = cuda if available, else cpu.")
@click.option(
    "--compile",
    is_flag=True,
    default=False,
    help="torch.compile the query and key encoders (minutes of compiling first). Off by default: measured "
    "faster only where benchmarks/train_step.py --compile says so (see README).",
)
@click.option("--seed", type=int, default=0)
@click.pass_context
def main(ctx: click.Context, resume: Path | None, **options) -> None:
    """Pre-train a ResNet without labels with LeOCLR (original -> query encoder, two crops -> momentum
    encoder), MoCo-v2, SePP-ID, SimCLR or end-to-end LeOCLR, monitoring weighted kNN top-1 on the val split
    before training and after each epoch. Under torchrun, one process per GPU (DDP)."""
    state = None
    if resume is not None:
        try:
            state = load_checkpoint(resume)
        except ValueError as error:
            raise click.ClickException(str(error)) from error
        given = {k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        options = {**state["config"], **{k: options[k] for k in given}}
        options["out"] = options["out"] if "out" in given else str(resume.parent)
    saved_world = options.get("world_size", 1)
    cfg = resolve(options)
    if resume is not None and cfg["world_size"] != saved_world:
        raise click.ClickException(
            f"{resume} was trained by {saved_world} process(es); resume it with as many "
            f"(this run has {cfg['world_size']}): the sample shards and the queue depend on it"
        )
    try:
        splits = load_splits(cfg["data"], cfg["loader"], cfg["train_limit"], cfg["val_limit"], cfg["seed"],
                             cfg["skip_bad"])  # fmt: skip
        for split in splits:
            for path, reason in split.skipped if split is not None else ():
                click.echo(f"skipped {path}: {reason}", err=True)
        if cfg["pairs"] is not None:
            read_pairs(cfg["pairs"], len(splits[0]))  # a clear error now rather than a trace later
    except (FileNotFoundError, ValueError) as error:
        hint = ""
        if Path(cfg["data"]) == DEFAULT_DATA and not DEFAULT_DATA.is_dir():
            hint = " (prepare it with: python -m pipeline.fashion_mnist data/fashion-mnist)"
        raise click.ClickException(f"{error}{hint}") from error
    history = train(cfg, state, *splits)
    final = history[-1]["knn_top1"] if history else None
    if final is not None and os.environ.get("RANK", "0") == "0":
        click.echo(f"final kNN top-1: {100 * final:.2f}% (run directory {cfg['out']})")


def resolve(options: dict) -> dict:
    """Fill the automatic defaults and check combinations; the result is what config.json records."""
    cfg = dict(options)
    # Checkpoints from before these options existed ran with what they now default to.
    for key, value in (("pairs", None), ("symmetric", False), ("attract_all", False), ("original", "whole"),
                       ("color_jitter", True), ("grayscale", True), ("skip_bad", False),
                       ("compile", False)):  # fmt: skip
        cfg.setdefault(key, value)
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["blur"] is None:
        cfg["blur"] = cfg["image_size"] > 64
    for key in ("ccrop_warmup", "ccrop_interval"):  # the paper: 20 of 100 epochs each
        if cfg[key] is None:
            cfg[key] = max(1, round(0.2 * cfg["epochs"]))
    if cfg["out"] is None:
        cfg["out"] = f"runs/{cfg['method']}-{cfg['loader']}"
    cfg["data"], cfg["out"] = str(cfg["data"]), str(cfg["out"])
    if cfg["amp"] == "fp16" and cfg["device"] == "cpu":
        raise click.BadParameter("fp16 autocast needs CUDA; use --amp bf16 on CPU", param_hint="--amp")
    try:
        method = method_for(cfg["method"], cfg["symmetric"], cfg["attract_all"])
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--symmetric/--attract-all") from error
    if cfg["original"] == "random-crop" and "original" not in method.views:
        raise click.BadParameter(f"--method {cfg['method']} has no original view", param_hint="--original")
    if method.pairs != (cfg["pairs"] is not None):
        raise click.BadParameter("--method sepp needs --pairs, and only it takes them", param_hint="--pairs")
    if cfg["pairs"] is not None:
        cfg["pairs"] = str(cfg["pairs"])
    if cfg["queue_size"] % cfg["batch_size"]:  # MoCo's rule: the queue turns over in whole batches
        raise click.BadParameter(f"must be a multiple of --batch-size ({cfg['batch_size']})", param_hint="--queue-size")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; --batch-size is the global batch
    cfg["world_size"] = world
    if cfg["bn_splits"] is None:  # MoCo's choice by topology: shuffle BN across ranks, else split BN
        cfg["bn_splits"] = 1 if world > 1 else 8
    if cfg["batch_size"] % world:
        raise click.BadParameter(f"must be a multiple of the {world} processes", param_hint="--batch-size")
    if cfg["batch_size"] // world % cfg["bn_splits"]:
        per_rank = f" per process ({world})" if world > 1 else ""
        raise click.BadParameter(f"must be a multiple of --bn-splits ({cfg['bn_splits']}){per_rank}",
                                 param_hint="--batch-size")  # fmt: skip
    return cfg


if __name__ == "__main__":
    main()
