"""Training methods: which views go through which encoder, and which objective scores them.

A method is a function (model, views, temperature, generator) -> (loss, keys to enqueue) plus the views it
needs (the generator drives the key batch's shuffle, so a seeded run replays exactly);
adding a method touches this file only. `views` maps "original"/"crop1"/"crop2" to augmented float batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.moco import MomentumContrast
from model.objectives import leoclr_loss, mocov2_loss

Views = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    views: tuple[str, ...]
    step: Callable[[MomentumContrast, Views, float, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    pairs: bool = False  # trains on the combined set of instances and semantic positive pairs (train.py --pairs)


def mocov2_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official asymmetric MoCo-v2: crop 1 -> f_q, crop 2 -> f_k; the original view is not used."""
    query = model.query_encoder(views["crop1"])
    with torch.no_grad():
        model.update_key_encoder()
        key = model.encode_keys(views["crop2"], generator)
    return mocov2_loss(query, key, model.queue, temperature), key


def leoclr_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LeOCLR: original -> f_q, both crops -> f_k (one batched forward), both crops' keys are enqueued.

    Enqueuing both keeps every image's crops as future negatives, the natural reading of the paper
    (it is silent); the queue then turns over twice as fast per step as MoCo-v2's.
    """
    query = model.query_encoder(views["original"])
    with torch.no_grad():
        model.update_key_encoder()
        keys = model.encode_keys(torch.cat([views["crop1"], views["crop2"]]), generator)
    key1, key2 = keys.chunk(2)
    return leoclr_loss(query, key1, key2, model.queue, temperature), keys


METHODS = {
    "mocov2": Method(views=("crop1", "crop2"), step=mocov2_step),
    "leoclr": Method(views=("original", "crop1", "crop2"), step=leoclr_step),
    # SePP-ID (Eq. 2, lambda = 1): MoCo-v2's step; the loader adds every semantic pair (a, b) as a sample whose
    # crop 1 comes from a and crop 2 from b, so each pair's term is computed as a positive pair's.
    "sepp": Method(views=("crop1", "crop2"), step=mocov2_step, pairs=True),
}
