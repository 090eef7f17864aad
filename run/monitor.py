"""The kNN monitor of a run: weighted kNN top-1 of the query backbone (and of raw pixels) on the bank and
val loaders, and when it is due."""

from __future__ import annotations

from functools import partial

import torch

from model.config import Config
from model.distributed import gather_to_main
from model.evaluation import extract_features, pixel_features
from model.knn import knn_top1
from run.stop import StopSignals, stoppable_passes


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


def knn_due(cfg: Config, epoch: int) -> bool:
    """Whether the kNN monitor runs after `epoch` epochs (0 = before training): every --knn-every, and the last."""
    return epoch % cfg.run.knn_every == 0 or epoch == cfg.optimisation.epochs
