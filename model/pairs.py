"""SePP-ID's semantic sampler: semantic positive pairs of training images, mined with a pre-trained model.

    python -m model.pairs --checkpoint runs/mocov2-dali/checkpoint.pt --out pairs.npy
    python train.py --method sepp --pairs pairs.npy

A seeded `--fraction` of the training images is embedded un-augmented (the whole image resized, through the
training loader backend) by the checkpoint's query encoder with its projection head; every ordered pair
(i, j), i != j, whose cosine similarity lies in [--low, --high] is kept (the upper bound drops near
duplicates; an anchor may get several positives). Similarities are computed a block of rows at a time, so
memory is O(block x n), never n x n. Writes the pairs as int64 (P, 2) indices into the training split (the
same data, --train-limit and --seed as the run that will train with them) and a JSON report beside them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from model.config import from_checkpoint, inherited, option
from model.moco import Encoder
from model.options import checkpoint_option
from model.precision import autocast, describe, resolve_amp
from pipeline.augment import normalize
from pipeline.backends import load_splits, make_loader
from pipeline.data import select
from pipeline.device import resolve_device
from pipeline.loader import LoaderSpec
from pipeline.semantic_pairs import band_pairs, pair_accuracy, sample_fraction
from run.state import load_checkpoint


def sampler_encoder(state: dict, random_init: bool = False, seed: int = 0) -> Encoder:
    """The checkpoint's query encoder with its projection head (plain BN), or with `random_init` a seeded fresh
    one of the same architecture."""
    torch.manual_seed(seed)
    cfg = from_checkpoint(state)
    encoder = Encoder(cfg.model.arch, cfg.data.image_size, bn_splits=1)
    if not random_init:
        prefix = "query_encoder."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return encoder


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@checkpoint_option("A train.py checkpoint (the paper: MoCo-v2); its query encoder and projection head embed.")
@inherited("data", "As train.py.")
@inherited("loader")
@inherited("train_limit", "Must match the run that trains with the pairs.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("pairs.npy"),
    help="Pairs (P, 2) int64; the report goes to the same name with .json.",
)
@click.option("--fraction", type=float, default=0.1, help="K: share of the training images embedded.")
@click.option("--low", type=float, default=0.97, help="Lowest cosine similarity of a semantic pair.")
@click.option("--high", type=float, default=0.99, help="Highest (drops near-duplicates).")
@click.option("--block", type=int, default=1024, help="Rows of the similarity matrix computed at once.")
@inherited("image_size")
@inherited("batch_size")
@option("workers", default=2, help=None)
@option("amp", help="Precision, as train.py's --amp.")
@option("device", help="auto = cuda where torch can use a GPU, else cpu (as train.py).")
@click.option(
    "--random-init",
    is_flag=True,
    help="Embed with a randomly initialised encoder of the checkpoint's architecture (seeded; a baseline "
    "for the sampler's pair accuracy) instead of its trained weights.",
)
@inherited("seed", "Training subset (as train.py) and embedded fraction.")
def main(
    checkpoint,
    data,
    loader,
    train_limit,
    out,
    fraction,
    low,
    high,
    block,
    image_size,
    batch_size,
    workers,
    amp,
    device,
    random_init,
    seed,
) -> None:
    """Mine SePP-ID's semantic positive pairs from a pre-trained checkpoint."""
    started = time.perf_counter()
    if low > high:
        raise click.BadParameter("need --low <= --high", param_hint="--low/--high")
    try:
        state = load_checkpoint(checkpoint)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    cfg = from_checkpoint(state)
    data, loader = data or cfg.data.data, loader or cfg.data.loader
    train_limit = cfg.data.train_limit if train_limit is None else train_limit
    seed, image_size = cfg.run.seed if seed is None else seed, image_size or cfg.data.image_size
    device = torch.device(resolve_device(device))
    amp, reason = resolve_amp(amp, device, cfg.model.arch, image_size)
    click.echo(describe(amp, reason))
    try:
        train, _ = load_splits(data, loader, train_limit, 0, seed)
        chosen = sample_fraction(len(train), fraction, seed)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    encoder = sampler_encoder(state, random_init, seed).to(device, memory_format=torch.channels_last).eval()
    images = select(train, chosen)
    spec = LoaderSpec(loader, image_size, batch_size or cfg.optimisation.batch_size, device, False, workers=workers)
    passes = make_loader(spec, images)
    embeddings = []
    with torch.no_grad():
        for batch in tqdm(passes.epoch(0), total=len(passes), desc="embed", unit="batch"):
            with autocast(device, amp):
                embeddings.append(encoder(normalize(batch.original)))
    passes.close()
    found = band_pairs(torch.cat(embeddings), low, high, block)
    pairs = chosen[found.numpy()] if len(found) else np.zeros((0, 2), dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, pairs.astype(np.int64))
    report = {
        "checkpoint": str(checkpoint),
        "random_init": random_init,
        "method": cfg.method.method,
        "pretrain_epochs": 0 if random_init else state.get("epoch"),
        "data": str(data),
        "train_limit": train_limit,
        "seed": seed,
        "train_images": len(train),
        "images_embedded": len(chosen),
        "low": low,
        "high": high,
        "pairs": len(pairs),
        "anchors_with_pairs": int(len(np.unique(pairs[:, 0]))),
        "pair_accuracy": pair_accuracy(pairs, train.labels),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    accuracy = "n/a" if report["pair_accuracy"] is None else f"{100 * report['pair_accuracy']:.2f}%"
    click.echo(
        f"{len(chosen)} images embedded, {len(pairs)} pairs over {report['anchors_with_pairs']} anchors, "
        f"pair accuracy {accuracy} -> {out} (+ {out.with_suffix('.json')})"
    )


if __name__ == "__main__":
    main()
