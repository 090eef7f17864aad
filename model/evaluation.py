"""Evaluation parts shared by eval.py and the trainer: features of a loader pass, top-k accuracy, the linear
probe (frozen features -> classes), and the query backbone of a training checkpoint."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.backbone import resnet
from model.config import from_checkpoint
from model.distributed import is_main
from model.precision import autocast
from pipeline.augment import normalize
from pipeline.loader import Loader

BACKBONE_PREFIX = "query_encoder.backbone."


class Stopped(Exception):
    """A pass cut short between two batches because its `stop()` said so (a stop signal: the run ends)."""


def batches(loader: Loader, stop: Callable[[], bool] | None = None, **bar) -> Iterator:
    """An evaluation pass of `loader` (its epoch 0), with a tqdm bar (`bar`: its options) when given; raises
    `Stopped` after a batch once `stop()` is true, the loader's epoch closed first."""
    epoch = loader.epoch(0)
    with contextlib.closing(epoch):
        for batch in tqdm(epoch, total=len(loader), **bar) if bar else epoch:
            yield batch
            if stop is not None and stop():
                raise Stopped


def view_of(batch) -> torch.Tensor:
    """The one view of an evaluation batch: the original, else crop 1 (center or random crop)."""
    return batch.original if batch.original is not None else batch.crop1


@torch.no_grad()
def extract_features(
    net: nn.Module,
    loader: Loader,
    amp: str,
    desc: str = "features",
    dtype: torch.dtype = torch.float32,
    l2_normalize: bool = False,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Features (N, D) of `net` (run in eval mode, restored after) on an evaluation pass of `loader`,
    un-augmented and normalised, and their labels (N,) int64, in the loader's file order. The features are
    `dtype` (float32 by default), each batch cast as it comes; `l2_normalize` makes each row unit length first
    (float16 holds unit vectors, not every raw feature's squared norm). `stop` as `batches`."""
    training = net.training
    net.eval()
    features, labels = [], []
    bar = dict(desc=f"  {desc}", leave=False, unit="batch", disable=not is_main())
    try:
        for batch in batches(loader, stop, **bar):
            with autocast(loader.device, amp):
                embedded = net(normalize(view_of(batch))).float()
            features.append((F.normalize(embedded, dim=1) if l2_normalize else embedded).to(dtype))
            labels.append(batch.labels)
    finally:
        net.train(training)
    return torch.cat(features), torch.cat(labels)


PIXELS_MAX = 32  # raw-pixel features of larger views are average-pooled to this size (a 131k bank stays ~1.6 GB)


@torch.no_grad()
def pixel_features(
    loader: Loader, normalised: bool = False, stop: Callable[[], bool] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels of an evaluation pass of `loader` as features, (N, 3 * s * s) float32 in [0, 1] (or normalised
    with ImageNet's mean/std), s = min(S, PIXELS_MAX) (larger views average-pooled), and their labels (N,) int64,
    in the loader's file order: the baseline a learned representation has to beat. `stop` as `batches`."""
    features, labels = [], []
    for batch in batches(loader, stop):
        view = view_of(batch)
        x = normalize(view) if normalised else view.float() / (255 if view.dtype == torch.uint8 else 1)
        if x.shape[-1] > PIXELS_MAX:
            x = F.adaptive_avg_pool2d(x, PIXELS_MAX)
        features.append(x.float().flatten(1))
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Percent (0-100) of rows of scores (M, C) whose label (M,) is among the k highest, for each k (k is
    capped at C: with fewer than 5 classes top-5 is 100)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return [100 * hits[:, : min(k, scores.shape[1])].any(1).float().mean().item() for k in ks]


class LinearProbe(nn.Module):
    """A linear classifier on frozen features (N, D) -> logits (N, C): batch norm without affine parameters
    (as MAE's probe; it folds into the linear map at evaluation, so the classifier stays linear, and makes
    one learning rate fit backbones whose feature scales differ), then Linear(D, C)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features.float()))


class CosineSGD:
    """SGD (momentum 0.9) whose learning rate follows a cosine from `lr` to 0 over `steps` steps; with an
    enabled `scaler` (fp16) the loss is scaled for backward."""

    def __init__(self, params, lr: float, weight_decay: float, steps: int, nesterov: bool = False, scaler=None):
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(enabled=False)
        self.lr, self.steps, self.done = lr, max(1, steps), 0

    def step(self, loss: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * self.done / self.steps))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.done += 1


def fit_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearProbe:
    """Train a `LinearProbe` on fixed features (N, D) float and labels (N,) int64 with shuffled mini-batches
    (the cached-features protocol: no augmentation). Returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(features.shape[1], classes).to(features.device)
    batch_size = min(batch_size, len(features))
    optimizer = CosineSGD(probe.parameters(), lr, weight_decay, epochs * (len(features) // batch_size))
    for _ in tqdm(range(epochs), desc="  linear (cached features)", leave=False, unit="epoch"):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(order) - batch_size + 1, batch_size):  # whole batches: BN needs > 1 sample
            part = order[start : start + batch_size]
            optimizer.step(F.cross_entropy(probe(features[part]), labels[part]))
    return probe.eval()


def backbone_weights(state: dict) -> dict[str, torch.Tensor]:
    """The query encoder's backbone from a checkpoint, as a torchvision ResNet state_dict (no fc)."""
    weights = {k[len(BACKBONE_PREFIX) :]: v for k, v in state["model"].items() if k.startswith(BACKBONE_PREFIX)}
    if not weights:
        raise ValueError("the checkpoint holds no query_encoder.backbone weights")
    return weights


def load_backbone(state: dict) -> tuple[nn.Module, int]:
    """The checkpoint's query backbone (N, 3, S, S) -> (N, D), with plain batch norm (split BN is a training
    device only; its parameters and statistics are those of BatchNorm2d). Returns (net, D) on the CPU."""
    cfg = from_checkpoint(state)
    net, dim = resnet(cfg.model.arch, cfg.data.image_size, bn_splits=1)
    net.load_state_dict(backbone_weights(state))
    return net, dim
