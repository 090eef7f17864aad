"""A dataset whose objects are not centred: Fashion-MNIST items placed at random on real photographs.

    python -m benchmarks.scattered data/scattered        # train/<class>/*.jpg (4,000) and val/<class>/*.jpg (1,000)

Each image is a random 64x64 window of one of Debian's mate-backgrounds photographs with one Fashion-MNIST
item pasted at a random place, 24-40 px tall, in a random saturated colour, its pixel values used as opacity
so the photo shows around it. The class is the item's. RandomResizedCrop often misses such an object;
ContrastiveCrop is meant to find it (the test bed of the [ccrop] comparison).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmarks.photos import source_photos
from pipeline.fashion_mnist import CLASSES, DEFAULT_SOURCE, SPLITS, read_idx


def scatter(item: np.ndarray, background: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Paste a 28x28 uint8 item, resized to 24-40 px, at a random place on a random size x size window."""
    width, height = background.size
    side = int(rng.integers(size * 2, min(width, height)))  # a window of the photo, shrunk to size x size
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    canvas = background.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    scale = int(rng.integers(24, 41))
    mask = Image.fromarray(item).resize((scale, scale), Image.BILINEAR)
    hue = (int(rng.integers(0, 256)), int(rng.integers(200, 256)), int(rng.integers(200, 256)))
    tint = Image.new("HSV", (1, 1), hue).convert("RGB").getpixel((0, 0))
    x, y = int(rng.integers(0, size - scale + 1)), int(rng.integers(0, size - scale + 1))
    canvas.paste(Image.new("RGB", (scale, scale), tint), (x, y), mask)
    return canvas


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--train", "train_count", type=int, default=4000, help="Training images.")
@click.option("--val", "val_count", type=int, default=1000, help="Validation images.")
@click.option("--size", type=int, default=64, help="Image side in pixels.")
@click.option("--seed", type=int, default=0)
def main(out: Path, train_count: int, val_count: int, size: int, seed: int) -> None:
    """Write OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg."""
    photos = [Image.open(path).convert("RGB") for path in source_photos()]
    if not photos:
        raise click.ClickException("no photographs: apt-get install mate-backgrounds")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_count), ("val", val_count)):
        prefix = DEFAULT_SOURCE / SPLITS[split]
        items = read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz"))
        chosen = rng.choice(len(items), size=count, replace=False)
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in tqdm(chosen, desc=split, unit="img"):
            image = scatter(items[i], photos[int(rng.integers(len(photos)))], rng, size)
            image.save(out / split / CLASSES[labels[i]] / f"{i:05d}.jpg", quality=95)
    click.echo(f"{train_count} train and {val_count} val images in {out}")


if __name__ == "__main__":
    main()
