"""Pictures of what training sees: images with their ContrastiveCrop boxes and crop windows, and the views.

    python -m pipeline.views --data data/scattered --boxes runs/sc-leoclr-ccrop/boxes.npy --out views.png

One row per image: the original view (the whole image resized, as the query encoder gets it) with the box
(white) and the two crop windows (orange, cyan) drawn on it, then crop 1 and crop 2 as the loader emits them,
before colour augmentation. Without --boxes the crops are plain RandomResizedCrops.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.backends import BACKENDS, load_splits, make_loader
from pipeline.data import ImageList
from pipeline.loader import BadFiles, LoaderSpec

BOX, WINDOWS = (255, 255, 255), ((255, 140, 0), (0, 220, 255))


def outline(pen: ImageDraw.ImageDraw, top, left, bottom, right, colour) -> None:
    """The rectangle [top, bottom) x [left, right) in panel pixels, at least one pixel wide."""
    pen.rectangle([left, top, max(left, right - 1), max(top, bottom - 1)], outline=colour)


def draw(batch, windows: np.ndarray, boxes: np.ndarray | None, heights, widths, count: int) -> Image.Image:
    """A grid of `count` rows x 3 panels from one training batch; windows (N, 2, 4) and sizes of its images."""
    size = batch.original.shape[-1]
    grid = Image.new("RGB", (3 * size + 8, count * (size + 4)), (40, 40, 40))
    for row in range(count):
        panels = [Image.fromarray(v[row].permute(1, 2, 0).cpu().numpy()) for v in batch[:3]]
        pen = ImageDraw.Draw(panels[0])
        sy, sx = size / heights[row], size / widths[row]
        if boxes is not None:
            top, left, bottom, right = boxes[row] * size
            outline(pen, top, left, bottom, right, BOX)
        for (top, left, h, w), colour in zip(windows[row], WINDOWS):
            outline(pen, top * sy, left * sx, (top + h) * sy, (left + w) * sx, colour)
        for column, panel in enumerate(panels):
            grid.paste(panel, (column * (size + 4), row * (size + 4)))
    return grid


def picture(
    backend: str,
    images: ImageList,
    seed: int,
    epoch: int,
    boxes: np.ndarray | None = None,
    alpha: float = 0.6,
    count: int = 8,
    size: int = 128,
    bad_files: BadFiles | None = None,
) -> Image.Image:
    """The grid `draw` makes of the first `count` images of a training epoch, read through `backend` on the CPU at
    `size` px panels: the windows and crops of that epoch with the seed, boxes (N, 4) and alpha given; a run's
    `bad_files` stay out of it as they do of its training batches."""
    workers = 0 if backend == "torchvision" else 1
    spec = LoaderSpec(backend, size, count, torch.device("cpu"), train=True, seed=seed, workers=workers)
    loader = make_loader(spec, images, bad_files=bad_files)
    try:
        loader.boxes, loader.alpha = boxes, alpha
        order, windows, _ = loader.schedule(epoch)
        batches = loader.epoch(epoch)
        batch = next(batches)
        batches.close()
    finally:
        loader.close()
    picked = order[:count]
    chosen = None if boxes is None else boxes[picked]
    return draw(batch, windows[:count], chosen, images.heights[picked], images.widths[picked], count)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(exists=True, path_type=Path), required=True, help="As train.py --data.")
@click.option("--loader", "backend", type=click.Choice(BACKENDS), default="torchvision")
@click.option(
    "--boxes",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="RUN_DIR/boxes.npy of a --crop ccrop run (with its --train-limit and --seed).",
)
@click.option("--alpha", type=float, default=0.6, help="ContrastiveCrop Beta parameter.")
@click.option("--train-limit", type=int, default=4000, help="As train.py: must match the run the boxes are from.")
@click.option("--seed", type=int, default=0)
@click.option("--epoch", type=int, default=0, help="Whose crop windows to draw.")
@click.option("--count", type=int, default=8, help="Images (rows).")
@click.option("--size", type=int, default=128, help="Panel size in pixels.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("views.png"))
def main(data, backend, boxes, alpha, train_limit, seed, epoch, count, size, out) -> None:
    """Draw images with their boxes and sampled crop windows, and the crops, to a PNG."""
    try:
        images, _ = load_splits(data, backend, train_limit, 0, seed)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    table = None if boxes is None else np.load(boxes)
    if table is not None and table.shape != (len(images), 4):
        raise click.ClickException(
            f"{boxes} holds {table.shape[0]} boxes for {len(images)} images: same --train-limit?"
        )
    count = min(count, len(images))
    grid = picture(backend, images, seed, epoch, table, alpha, count, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    click.echo(f"{count} images -> {out}")


if __name__ == "__main__":
    main()
