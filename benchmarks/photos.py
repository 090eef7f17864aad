"""A benchmark set of real-photo JPEGs at ImageNet-like sizes, cut from Debian's mate-backgrounds photos.

    apt-get install mate-backgrounds
    python -m benchmarks.photos data/photos --count 1000         # data/photos/train/<photo>/*.jpg, ~500x375

Each image is a random window (10-100% of the photo's area, landscape 4:3 or, one time in four, portrait 3:4)
of one of the package's photographs, resized to 500x375 or 375x500 and saved at JPEG quality 90: real image
statistics and decode cost, at the size of a typical ImageNet training image.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

PHOTOS = Path("/usr/share/backgrounds/mate")


def source_photos(root: Path = PHOTOS) -> list[Path]:
    """The package's photographs: JPEGs of at least 1000 px on the short side (the PNGs are drawings).
    Several sizes of one picture (Name.jpg, Name_3840x2160.jpg) count once, as the largest."""
    by_name: dict[str, Path] = {}
    for path in sorted(root.rglob("*.jpg")):
        with Image.open(path) as image:
            if min(image.size) < 1000:
                continue
            name = path.stem.split("_")[0]
            if name not in by_name or path.stat().st_size > by_name[name].stat().st_size:
                by_name[name] = path
    return sorted(by_name.values())


def cut(photo: Image.Image, rng: np.random.Generator, portrait: bool) -> Image.Image:
    """A random window of `photo` with the target's aspect ratio, resized to 500x375 (375x500 if portrait)."""
    width, height = photo.size
    aspect = 3 / 4 if portrait else 4 / 3
    area = rng.uniform(0.1, 1.0) * width * height
    w = int(min(width, height * aspect, np.sqrt(area * aspect)))
    h = int(min(height, w / aspect))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    size = (375, 500) if portrait else (500, 375)
    return photo.resize(size, Image.BILINEAR, box=(left, top, left + w, top + h), reducing_gap=2.0)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--count", type=int, default=1000, help="Images to write.")
@click.option("--seed", type=int, default=0)
def main(out: Path, count: int, seed: int) -> None:
    """Write OUT/train/<photo>/NNNNN.jpg."""
    photos = source_photos()
    if not photos:
        raise click.ClickException(f"no photographs under {PHOTOS}: apt-get install mate-backgrounds")
    rng = np.random.default_rng(seed)
    opened = {}
    for i in tqdm(range(count), desc="photos", unit="img"):
        path = photos[i % len(photos)]
        if path not in opened:
            opened[path] = Image.open(path).convert("RGB")
        folder = out / "train" / path.stem.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        cut(opened[path], rng, portrait=rng.random() < 0.25).save(folder / f"{i:05d}.jpg", quality=90)
    click.echo(f"{count} images from {len(photos)} photographs in {out}/train")


if __name__ == "__main__":
    main()
