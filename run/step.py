"""The training step: the method's augmented views of a batch, one optimisation step, and the learning-rate
schedule."""

from __future__ import annotations

import math

import torch

from model.config import Config
from model.methods import Method
from model.precision import autocast
from pipeline.augment import AugmentConfig, augment_with_draws


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
