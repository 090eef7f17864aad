"""Loader throughput in images/sec: decode once + original + 2 crop views, optionally + device augmentation.

    python -m benchmarks.loaders --data data/fashion-mnist --image-size 32
    python -m benchmarks.loaders --data /imagenet --ffcv-data /ffcv/train.beton --image-size 224 --augment

Prints one line per backend. Timing starts after a warm-up epoch slice, so start-up costs are excluded.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.augment import AugmentConfig, augment
from pipeline.data import load_splits
from pipeline.loader import BACKENDS, make_loader


def measure(
    backend: str, images, image_size: int, batch_size: int, workers: int, steps: int, aug: bool, ccrop: bool
) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_loader(backend, images, image_size=image_size, batch_size=batch_size, device=device,
                         train=True, workers=workers)  # fmt: skip
    if ccrop:  # seeded boxes covering 10-100% of each side: ContrastiveCrop's sampling path
        rng = np.random.default_rng(0)
        start, extent = rng.uniform(0, 0.9, (len(images), 2)), rng.uniform(0.1, 1.0, (len(images), 2))
        loader.boxes = np.concatenate([start, np.minimum(start + extent, 1.0)], axis=1)
    generator = torch.Generator(device=device).manual_seed(0)
    config = AugmentConfig(blur_p=0.5 if image_size > 64 else 0.0)
    warmup, count, started = 2, 0, None
    for epoch in range(1_000):
        for step, batch in enumerate(loader.epoch(epoch)):
            if aug:
                for view in batch[:3]:
                    augment(view, config, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if started is None and step + 1 >= warmup:
                started = time.perf_counter()
            elif started is not None:
                count += len(batch.labels)
            if count >= steps * batch_size:
                break
        if count >= steps * batch_size:
            break
    loader.close()
    return count / (time.perf_counter() - started)


@click.command(context_settings={"show_default": True})
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="ImageNet-layout folder (its train split is read) for dali and torchvision.",
)
@click.option(
    "--ffcv-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="The same images as .beton (file, or folder with train.beton) for ffcv; ffcv is skipped without it.",
)
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True, default=BACKENDS)
@click.option("--image-size", type=int, default=224)
@click.option("--batch-size", type=int, default=64)
@click.option("--workers", type=int, default=2)
@click.option("--steps", type=int, default=30, help="Timed batches per backend.")
@click.option("--limit", type=int, default=5000, help="Images to index (0 = all).")
@click.option("--augment/--no-augment", "aug", default=False, help="Also run the device augmentation on 3 views.")
@click.option("--ccrop", is_flag=True, help="ContrastiveCrop windows (random boxes) instead of RandomResizedCrop.")
def main(data: Path, ffcv_data: Path | None, backends, image_size, batch_size, workers, steps, limit, aug, ccrop):
    for backend in backends:
        if backend == "ffcv" and ffcv_data is None:
            click.echo("ffcv         skipped (no --ffcv-data; make one with python -m pipeline.convert)")
            continue
        images, _ = load_splits(ffcv_data if backend == "ffcv" else data, backend, limit)
        rate = measure(backend, images, image_size, batch_size, workers, steps, aug, ccrop)
        click.echo(f"{backend:12s} {rate:8.0f} img/s  (3 views, {image_size} px, batch {batch_size}, "
                   f"{workers} workers{', + augmentation' if aug else ''}{', ccrop' if ccrop else ''})")  # fmt: skip


if __name__ == "__main__":
    main()
