"""The parts of a training run, built from its settings: the model and its optimizer and gradient scaler,
the precision settled, the CUDA settings, the augmentation, and the run's loaders (`Loaders`, one `LoaderSpec`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from model import distributed
from model.config import Config, knn_bank
from model.methods import Method
from model.moco import MomentumContrast
from model.precision import resolve_amp
from pipeline.augment import AugmentConfig
from pipeline.backends import make_loader
from pipeline.data import ImageList, select, subset
from pipeline.loader import BadFiles, Loader, LoaderSpec


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
