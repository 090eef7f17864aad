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
from model.objectives import (
    leoclr_attract_all_loss,
    leoclr_e2e_loss,
    leoclr_loss,
    mocov2_loss,
    nt_xent,
    symmetric_mocov2_loss,
)

Views = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    views: tuple[str, ...]
    step: Callable[[MomentumContrast, Views, float, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    pairs: bool = False  # trains on the combined set of instances and semantic positive pairs (train.py --pairs)
    end_to_end: bool = False  # f_q alone, in-batch negatives: no momentum encoder, no queue, no key shuffle
    # f_q sees the whole original: the step takes `maps` (a dict) and puts f_q's last-stage map of the original
    # there, detached (N, D, h, w), for ContrastiveCrop's boxes from the training forward (--ccrop-boxes forward)
    original_map: bool = False
    # InfoNCE terms the step's loss sums (train.py --loss-terms mean divides by it: each term's gradient is then
    # a one-term method's at the same lr)
    terms: int = 1


def mocov2_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official asymmetric MoCo-v2: crop 1 -> f_q, crop 2 -> f_k; the original view is not used."""
    query = model.query(views["crop1"])
    with torch.no_grad():
        model.update_key_encoder()
        key = model.encode_keys(views["crop2"], generator)
    return mocov2_loss(query, key, model.queue, temperature), key


def leoclr_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator, maps: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LeOCLR: original -> f_q, both crops -> f_k (one batched forward), both crops' keys are enqueued.

    Enqueuing both keeps every image's crops as future negatives, the natural reading of the paper
    (it is silent); the queue then turns over twice as fast per step as MoCo-v2's. With `maps`, f_q's map of
    the original goes to maps["original"] (`Method.original_map`).
    """
    if maps is None:
        query = model.query(views["original"])
    else:
        query, feature_map = model.query(views["original"], with_map=True)
        maps["original"] = feature_map.detach()
    with torch.no_grad():
        model.update_key_encoder()
        keys = model.encode_keys(torch.cat([views["crop1"], views["crop2"]]), generator)
    key1, key2 = keys.chunk(2)
    return leoclr_loss(query, key1, key2, model.queue, temperature), keys


def symmetric_mocov2_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo-v2 in both directions: both crops through f_q and f_k, l(q1, k2) + l(q2, k1), both keys enqueued.

    f_q's batch stacks both crops unmixed: no two f_q outputs are scored against each other (each query meets
    its key from f_k's shuffled batch and the queue), and with split BN rows i and B + i never share a group
    (a group is at most 2B / 2 rows long; tests/test_methods.py counts it)."""
    query1, query2 = model.query(torch.cat([views["crop1"], views["crop2"]])).chunk(2)
    with torch.no_grad():
        model.update_key_encoder()
        keys = model.encode_keys(torch.cat([views["crop1"], views["crop2"]]), generator)
    key1, key2 = keys.chunk(2)
    return symmetric_mocov2_loss(query1, query2, key1, key2, model.queue, temperature), keys


def leoclr_attract_all_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator, maps: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LeOCLR Table 8 ablation: original and crop 1 -> f_q, both crops -> f_k, the crops also attracted.
    As in `symmetric_mocov2_step`, f_q's outputs are scored only against f_k's keys and the queue. `maps` as
    `leoclr_step`'s."""
    both = torch.cat([views["original"], views["crop1"]])
    if maps is None:
        original, query1 = model.query(both).chunk(2)
    else:
        embeddings, feature_map = model.query(both, with_map=True)
        (original, query1), maps["original"] = embeddings.chunk(2), feature_map[: len(embeddings) // 2].detach()
    with torch.no_grad():
        model.update_key_encoder()
        keys = model.encode_keys(torch.cat([views["crop1"], views["crop2"]]), generator)
    key1, key2 = keys.chunk(2)
    return leoclr_attract_all_loss(original, query1, key1, key2, model.queue, temperature), keys


def _no_keys(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings.new_zeros((0, embeddings.shape[1])).detach()


def simclr_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR (end to end): both crops through f_q in one forward, mixed over the BN groups (`query_mixed`),
    NT-Xent with in-batch negatives (every rank's). The momentum encoder and the queue are unused."""
    z1, z2 = model.query_mixed(torch.cat([views["crop1"], views["crop2"]]), generator).chunk(2)
    return nt_xent(z1, z2, temperature), _no_keys(z1)


def leoclr_e2e_step(
    model: MomentumContrast, views: Views, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LeOCLR end to end (Table 5): original and both crops through f_q (trained by backprop, one forward,
    mixed over the BN groups), each crop pulled toward the original with in-batch negatives (every rank's); no
    momentum encoder, no queue."""
    u, v1, v2 = model.query_mixed(torch.cat([views["original"], views["crop1"], views["crop2"]]), generator).chunk(3)
    return leoclr_e2e_loss(u, v1, v2, temperature), _no_keys(u)


METHODS = {
    "mocov2": Method(views=("crop1", "crop2"), step=mocov2_step),
    "leoclr": Method(views=("original", "crop1", "crop2"), step=leoclr_step, original_map=True, terms=2),
    # SePP-ID (Eq. 2, lambda = 1): MoCo-v2's step; the loader adds every semantic pair (a, b) as a sample whose
    # crop 1 comes from a and crop 2 from b, so each pair's term is computed as a positive pair's.
    "sepp": Method(views=("crop1", "crop2"), step=mocov2_step, pairs=True),
    "simclr": Method(views=("crop1", "crop2"), step=simclr_step, end_to_end=True),
    "leoclr-e2e": Method(views=("original", "crop1", "crop2"), step=leoclr_e2e_step, end_to_end=True, terms=2),
}
# Variants selected by train.py's flags: (method, flag) -> the method's variant.
VARIANTS = {
    ("mocov2", "symmetric"): Method(views=("crop1", "crop2"), step=symmetric_mocov2_step, terms=2),
    ("sepp", "symmetric"): Method(views=("crop1", "crop2"), step=symmetric_mocov2_step, pairs=True, terms=2),
    ("leoclr", "attract_all"): Method(
        views=("original", "crop1", "crop2"), step=leoclr_attract_all_step, original_map=True, terms=3
    ),
}


def method_for(name: str, symmetric: bool = False, attract_all: bool = False) -> Method:
    """The method `name` with train.py's --symmetric / --attract-all; ValueError for a flag it has no variant of."""
    flags = [flag for flag, on in (("symmetric", symmetric), ("attract_all", attract_all)) if on]
    if len(flags) > 1:
        raise ValueError("--symmetric and --attract-all are variants of different methods")
    if not flags:
        return METHODS[name]
    if (name, flags[0]) not in VARIANTS:
        takers = ", ".join(m for m, f in VARIANTS if f == flags[0])
        raise ValueError(f"--{flags[0].replace('_', '-')} applies to --method {takers}, not {name}")
    return VARIANTS[(name, flags[0])]
