"""Evaluate a pre-trained checkpoint with the papers' protocols, or export its backbone.

    python eval.py knn       --checkpoint runs/leoclr-dali/checkpoint.pt            # the training monitor's kNN
    python eval.py linear    --checkpoint CKPT --cached-features --json linear.json  # frozen backbone + linear
    python eval.py finetune  --checkpoint CKPT --fraction 0.01                       # semi-supervised, 1% labels
    python eval.py crop-test --checkpoint CKPT --cached-features                     # LeOCLR Table 7
    python eval.py export    --checkpoint CKPT --out resnet.pth                      # plain torchvision weights

Data, loader, resolution, subset sizes, batch size and seed default to the checkpoint's training run, so a checkpoint
from `train.py` evaluates on the data it was trained on with one argument. Accuracies are percentages.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING

import click

from model.config import inherited, option
from model.options import Count, Group, Real, apply, checkpoint_option
from pipeline.crop_plan import SUPERVISED_SCALE

if TYPE_CHECKING:  # torch and the machinery are imported where used: --help and the option refusals need none
    import torch
    from torch import nn

    from model.evaluation import LinearProbe
    from pipeline.data import ImageList
    from pipeline.loader import Loader

CROP_MIN = SUPERVISED_SCALE[0]  # RandomResizedCrop's smallest area fraction there, as MoCo's main_lincls


def flip_only():
    """Training-time augmentation of the supervised protocols: the crop plan's RandomResizedCrop + flip, no colour."""
    from pipeline.augment import AugmentConfig

    return AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.5)


@dataclass
class Setup:
    """One evaluation's checkpoint, data and options; builds loaders and the backbone on the device."""

    state: dict
    checkpoint: str
    train: ImageList
    val: ImageList
    options: dict
    device: torch.device

    def loader(self, images: ImageList, train: bool, batch_size: int | None = None, **kwargs) -> Loader:
        from pipeline.backends import make_loader
        from pipeline.loader import LoaderSpec

        o = self.options
        spec = LoaderSpec(
            o["loader"],
            o["image_size"],
            batch_size or o["batch_size"],
            self.device,
            train=train,
            seed=o["seed"],
            workers=o["workers"],
            crop_fraction=o["crop_fraction"],
            **kwargs,
        )
        return make_loader(spec, images)

    def backbone(self) -> tuple[nn.Module, int]:
        import torch

        from model.evaluation import load_backbone

        net, dim = load_backbone(self.state)
        return net.to(self.device, memory_format=torch.channels_last), dim

    @property
    def classes(self) -> int:
        return len(self.train.classes)

    def features(self, net: nn.Module, images: ImageList, view: str, desc: str, interpolation: str = "bilinear"):
        from model.evaluation import extract_features

        loader = self.loader(images, train=False, eval_view=view, interpolation=interpolation)
        try:
            return extract_features(net, loader, self.options["amp"], desc)
        finally:
            loader.close()

    def record(self, protocol: str, top1: float, top5: float, started: float, **fields) -> dict:
        from model.config import from_checkpoint

        cfg = from_checkpoint(self.state)
        return {
            "protocol": protocol,
            "top1": top1,
            "top5": top5,
            **fields,
            "checkpoint": self.checkpoint,
            "method": cfg.method.method,
            "pretrain_epochs": self.state.get("epoch"),
            "arch": cfg.model.arch,
            "image_size": self.options["image_size"],
            "loader": self.options["loader"],
            "data": str(self.options["data"]),
            "train_images": len(self.train),
            "val_images": len(self.val),
            "device": str(self.device),
            "seconds": round(time.perf_counter() - started, 1),
        }


# The options every protocol shares: train.py's settings (model/config.py) defaulting to the checkpoint's run.
COMMON_OPTIONS = {
    "data": inherited(
        "data",
        "As train.py --data; must hold labelled train and val splits.",
        "the checkpoint's --val-data when it had one, else its --data",
    ),
    "loader": inherited("loader", "Loader backend, as in training."),
    "train_limit": inherited("train_limit", "Seeded subset of the train split (0 = all)."),
    "val_limit": inherited("val_limit", "Seeded subset of the val split (0 = all)."),
    "image_size": inherited("image_size", "Evaluation resolution."),
    "crop_fraction": click.option(
        "--crop-fraction",
        type=Real(0, 1, min_open=True),
        default=0.875,
        help="Center crop side / shorter image side (224/256 as on ImageNet).",
    ),
    "batch_size": inherited("batch_size"),
    "workers": option("workers", default=2, help="Loader threads/processes."),
    "amp": option("amp", help="Precision of the backbone, as train.py's --amp (auto: picked by the hardware)."),
    "device": option("device", help="auto = cuda where torch can use a GPU, else cpu (as train.py)."),
    "seed": inherited("seed", "Subsets, crops, shuffles."),
}
COMMON = tuple(COMMON_OPTIONS)
JSON_OPTION = click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the result as a JSON object here.",
)


def common_options(command):
    """The options every protocol shares (`COMMON_OPTIONS`, --checkpoint, --json), then: load the checkpoint and
    the splits, run, print, write JSON."""

    @wraps(command)
    def run(checkpoint: Path, json_out: Path | None, **kwargs):
        started = time.perf_counter()
        setup = prepare(checkpoint, {k: kwargs.pop(k) for k in COMMON}, kwargs)
        result = command(setup, started=started, **kwargs)
        click.echo(f"{result['protocol']}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%")
        if "drop" in result:
            click.echo(
                f"center crop {result['center_top1']:.2f}%, random crop {result['random_top1']:.2f}%, "
                f"drop {result['drop']:.2f} points"
            )
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")
            click.echo(f"wrote {json_out}")
        return result

    return apply([checkpoint_option(), *COMMON_OPTIONS.values(), JSON_OPTION])(run)


def prepare(checkpoint: Path, options: dict, extra: dict) -> Setup:
    import torch

    from model.config import from_checkpoint
    from model.precision import amp_refusal, describe, resolve_amp
    from pipeline.backends import load_splits
    from pipeline.device import resolve_device
    from run.state import load_checkpoint

    try:
        state = load_checkpoint(checkpoint)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    cfg = from_checkpoint(state)
    trained = cfg.to_dict()
    if options["data"] is None and cfg.data.val_data is not None:  # the labelled folder its kNN monitor read
        options["data"] = cfg.data.val_data
        if options["train_limit"] is None:  # the run's limit was its training data's
            options["train_limit"] = 0
    for key in ("data", "loader", "train_limit", "val_limit", "image_size", "batch_size", "seed"):
        if options[key] is None:
            options[key] = trained[key]
    device = torch.device(resolve_device(options["device"]))
    if (refusal := amp_refusal(options["amp"], str(device))) is not None:
        raise click.BadParameter(refusal, param_hint="--amp")
    options["amp"], reason = resolve_amp(options["amp"], device, cfg.model.arch, options["image_size"])
    click.echo(describe(options["amp"], reason))
    try:
        train, val = load_splits(
            options["data"], options["loader"], options["train_limit"], options["val_limit"], options["seed"]
        )
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    if val is None:
        raise click.ClickException(f"{options['data']} has no val split: every protocol scores on it")
    if not (train.labelled and val.labelled):
        raise click.ClickException(f"{options['data']} has no labels: give --data a folder of class folders")
    click.echo(
        f"{checkpoint}: {cfg.method.method} {cfg.model.arch} after {state.get('epoch')} epochs; "
        f"{len(train)} train / {len(val)} val images from {options['data']} ({options['loader']}), "
        f"{options['image_size']} px, device {device}"
    )
    torch.manual_seed(options["seed"])
    return Setup(state, str(checkpoint), train, val, options, device)


@click.group(cls=Group, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
def main() -> None:
    """Evaluate a train.py checkpoint (kNN, linear, semi-supervised fine-tuning, center/random crop test) or
    export its query backbone. Every protocol scores the val split; `PROTOCOL --help` lists its options."""


@main.command()
@click.option("--k", "k", type=Count(), default=200, help="Neighbours.")
@click.option("--temperature", type=Real(min=0, min_open=True), default=0.1, help="Vote weight exp(similarity / T).")
@common_options
def knn(setup: Setup, started: float, k: int, temperature: float) -> dict:
    """Weighted kNN (the training monitor's protocol): un-augmented whole-image features of the train split
    as the bank; each val image's k nearest by cosine vote with exp(sim / T)."""
    import torch.nn.functional as F

    from model.evaluation import topk_accuracy
    from model.knn import knn_scores

    net, _ = setup.backbone()
    bank, bank_labels = setup.features(net, setup.train, "original", "bank")
    val, val_labels = setup.features(net, setup.val, "original", "val")
    scores = knn_scores(F.normalize(val, dim=1), F.normalize(bank, dim=1), bank_labels, setup.classes, k, temperature)
    top1, top5 = topk_accuracy(scores, val_labels)
    return setup.record("knn", top1, top5, started, k=k, temperature=temperature)


crop_min_option = click.option(
    "--crop-min",
    type=Real(0, 1, min_open=True),
    default=CROP_MIN,
    help="Smallest area fraction of the RandomResizedCrop training images (scale (crop-min, 1)): 0.08 as MoCo's "
    "main_lincls (torchvision's default); 0.2 gives the pre-training crops.",
)
# The linear classifier's options (linear, crop-test).
linear_options = apply(
    [
        click.option("--epochs", type=Count(), default=100, help="Classifier training epochs (the papers: 100)."),
        click.option(
            "--lr", type=Real(min=0, min_open=True), default=0.1, help="SGD learning rate (momentum 0.9, cosine to 0)."
        ),
        click.option("--weight-decay", type=Real(min=0), default=0.0),
        click.option(
            "--cached-features/--augmented",
            default=False,
            help="Compute the train split's center-crop features once and train on them (no augmentation; "
            "fast on CPU), instead of RandomResizedCrop + flip images through the frozen backbone every "
            "epoch (the papers' protocol).",
        ),
        crop_min_option,
    ]
)


def train_probe(
    setup: Setup, net: nn.Module, dim: int, epochs: int, lr: float, weight_decay: float, cached: bool, crop_min: float
):
    """A LinearProbe on the frozen backbone `net` (features of size `dim`), trained on the whole train split:
    on cached center-crop features, or on RandomResizedCrop (scale (crop_min, 1)) + flip images."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from model.evaluation import CosineSGD, LinearProbe, fit_linear
    from model.precision import autocast
    from pipeline.augment import augment

    batch_size = setup.options["batch_size"]
    if cached:
        features, labels = setup.features(net, setup.train, "center", "train features")
        return fit_linear(features, labels, setup.classes, epochs, lr, batch_size, weight_decay, setup.options["seed"])
    batch_size = min(batch_size, len(setup.train))
    loader = setup.loader(setup.train, train=True, batch_size=batch_size, view_count=1, crop_scale=(crop_min, 1.0))
    probe = LinearProbe(dim, setup.classes).to(setup.device)
    optimizer = CosineSGD(probe.parameters(), lr, weight_decay, epochs * len(loader))
    generator = torch.Generator(device=setup.device).manual_seed(setup.options["seed"])
    net.eval()  # frozen: running BN statistics, no gradients
    for epoch in range(epochs):
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"linear {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            views = augment(batch.crop1, flip_only(), generator)  # outside autocast: its own precision
            with torch.no_grad(), autocast(setup.device, setup.options["amp"]):
                features = net(views).float()
            loss = F.cross_entropy(probe(features), batch.labels)
            optimizer.step(loss)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    loader.close()
    return probe.eval()


def score_probe(
    setup: Setup, net: nn.Module, probe: LinearProbe, view: str, interpolation: str = "bilinear"
) -> list[float]:
    import torch

    from model.evaluation import topk_accuracy

    features, labels = setup.features(net, setup.val, view, f"val {view}", interpolation)
    with torch.no_grad():
        return topk_accuracy(probe(features), labels)


@main.command()
@linear_options
@common_options
def linear(
    setup: Setup, started: float, epochs: int, lr: float, weight_decay: float, cached_features: bool, crop_min: float
) -> dict:
    """Linear evaluation: frozen backbone, a linear classifier on its pooled features (RandomResizedCrop, scale
    0.08-1, + flip training, or --cached-features), top-1/top-5 on center crops of the val split."""
    net, dim = setup.backbone()
    probe = train_probe(setup, net, dim, epochs, lr, weight_decay, cached_features, crop_min)
    top1, top5 = score_probe(setup, net, probe, "center")
    settings = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, cached_features=cached_features)
    return setup.record("linear", top1, top5, started, **settings, crop_min=None if cached_features else crop_min)


@main.command("crop-test")
@linear_options
@common_options
def crop_test(
    setup: Setup, started: float, epochs: int, lr: float, weight_decay: float, cached_features: bool, crop_min: float
) -> dict:
    """LeOCLR's center vs random crop test (Table 7): the linear classifier (trained as `linear`) scored on
    center crops and on random crops (the image squashed to a square, then RandomResizedCrop, scale 0.08-1,
    seeded) of the val split, both resized bicubically as the paper; `drop` = center - random top-1, smaller =
    more robust features. Needs a loader that resizes bicubically (dali, torchvision; not ffcv)."""
    try:  # before the probe trains: a loader that cannot resize bicubically says so now
        setup.loader(setup.val, train=False, eval_view="center", interpolation="bicubic").close()
    except ValueError as error:
        raise click.ClickException(f"crop-test resizes bicubically (LeOCLR Table 7): {error}") from error
    net, dim = setup.backbone()
    probe = train_probe(setup, net, dim, epochs, lr, weight_decay, cached_features, crop_min)
    center_top1, center_top5 = score_probe(setup, net, probe, "center", "bicubic")
    random_top1, random_top5 = score_probe(setup, net, probe, "random", "bicubic")
    return setup.record(
        "crop-test",
        center_top1,
        center_top5,
        started,
        center_top1=center_top1,
        random_top1=random_top1,
        random_top5=random_top5,
        drop=center_top1 - random_top1,
        interpolation="bicubic",
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        cached_features=cached_features,
        crop_min=None if cached_features else crop_min,
    )


@main.command()
@click.option(
    "--fraction",
    type=Real(0, 1, min_open=True),
    default=0.1,
    help="Share of the train labels used, the same in every class.",
)
@click.option(
    "--epochs",
    type=Count(),
    default=None,
    help="Fine-tuning epochs over the labelled subset. [default: 60 for a fraction <= 1%, else 30 (SimCLR)]",
)
@click.option(
    "--lr",
    type=Real(min=0, min_open=True),
    default=0.05,
    help="SGD learning rate (Nesterov momentum 0.9, cosine to 0).",
)
@click.option("--weight-decay", type=Real(min=0), default=0.0)
@crop_min_option
@common_options
def finetune(
    setup: Setup, started: float, fraction: float, epochs: int, lr: float, weight_decay: float, crop_min: float
) -> dict:
    """Semi-supervised fine-tuning: the whole network plus a new linear layer trained on a class-balanced,
    seeded --fraction of the train labels (RandomResizedCrop, scale 0.08-1, + flip), top-1/top-5 on center
    crops of val."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from tqdm import tqdm

    from model.evaluation import CosineSGD, topk_accuracy
    from model.precision import autocast
    from pipeline.augment import augment
    from pipeline.data import balanced_fraction, select

    try:
        labelled = select(setup.train, balanced_fraction(setup.train.labels, fraction, setup.options["seed"]))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--fraction") from error
    epochs = epochs if epochs is not None else 60 if fraction <= 0.01 else 30
    net, dim = setup.backbone()
    model = nn.Sequential(net, nn.Linear(dim, setup.classes)).to(setup.device, memory_format=torch.channels_last)
    batch_size = min(setup.options["batch_size"], len(labelled))
    loader = setup.loader(labelled, train=True, batch_size=batch_size, view_count=1, crop_scale=(crop_min, 1.0))
    fp16 = setup.options["amp"] == "fp16"
    optimizer = CosineSGD(
        model.parameters(),
        lr,
        weight_decay,
        epochs * len(loader),
        nesterov=True,
        scaler=torch.amp.GradScaler(setup.device.type, enabled=fp16),
    )
    generator = torch.Generator(device=setup.device).manual_seed(setup.options["seed"])
    model.train()
    for epoch in range(epochs):
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"finetune {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            views = augment(batch.crop1, flip_only(), generator)
            with autocast(setup.device, setup.options["amp"]):
                logits = model(views)
            loss = F.cross_entropy(logits.float(), batch.labels)
            optimizer.step(loss)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    loader.close()
    logits, labels = setup.features(model, setup.val, "center", "val center")
    top1, top5 = topk_accuracy(logits, labels)
    return setup.record(
        "finetune",
        top1,
        top5,
        started,
        fraction=fraction,
        labelled_images=len(labelled),
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        crop_min=crop_min,
    )


@main.command()
@checkpoint_option()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .pth file.")
def export(checkpoint: Path, out: Path) -> None:
    """Write the query backbone as a plain torchvision ResNet state_dict (every key but fc)."""
    import torch

    from model.config import from_checkpoint
    from model.evaluation import backbone_weights
    from run.state import load_checkpoint

    try:
        state = load_checkpoint(checkpoint)
        weights = backbone_weights(state)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out)
    cfg = from_checkpoint(state)
    arch, size = cfg.model.arch, cfg.data.image_size
    load = f"torchvision.models.{arch}().load_state_dict(torch.load('{out}'), strict=False)"
    click.echo(f"wrote {out}: {len(weights)} tensors of a {arch}; load with {load} (fc stays missing)")
    if size <= 64:
        click.echo(
            f"trained at {size} px with the small-image stem: first set net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, "
            "bias=False) and net.maxpool = nn.Identity()"
        )


if __name__ == "__main__":
    main()
