"""A benchmark set of real-photo JPEGs at ImageNet-like sizes, cut from Debian's mate-backgrounds photos, or,
where that package is absent, synthetic photo-like JPEGs.

    apt-get install mate-backgrounds
    python -m benchmarks.photos data/photos --count 1000         # data/photos/train/<photo>/*.jpg, ~500x375
    python -m benchmarks.photos data/synthetic --source synthetic --workers 8

Each image is a random window (10-100% of the photo's area, landscape 4:3 or, one time in four, portrait 3:4)
of one of the package's photographs, resized to 500x375 or 375x500 and saved at JPEG quality 90: real image
statistics and decode cost, at the size of a typical ImageNet training image.

The synthetic images (no photographs needed) have a natural image's 1/f amplitude spectrum (a luminance field
and two smoother colour fields), a few flat shapes with sharp edges, and sensor-like noise, at ImageNet's mix
of sizes (mostly 500 px on the long side): ~0.44 bytes per pixel at quality 90 (81 KB at 500x375), about what
the photographs give, so they cost a JPEG decoder about as much.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

PHOTOS = Path("/usr/share/backgrounds/mate")
SOURCES = ("auto", "mate-backgrounds", "synthetic")
# (width, height) of the synthetic images and how often each occurs: ImageNet's common shapes.
SYNTHETIC_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480), (400, 300), (1024, 768))
SYNTHETIC_WEIGHTS = (0.35, 0.15, 0.15, 0.05, 0.1, 0.1, 0.05, 0.05)
SYNTHETIC_CLASSES = 10


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


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB picture of width x height: 1/f^1.2 luminance and 1/f^1.7 colour fields, 2-6 flat
    shapes blended over them, Gaussian noise of 2.5 levels."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    fields = []
    for exponent in (1.2, 1.7, 1.7):  # colour varies more slowly than brightness in photographs
        amplitude = (frequency**-exponent).astype(np.float32)
        shape = frequency.shape
        spectrum = amplitude * (rng.standard_normal(shape, np.float32) + 1j * rng.standard_normal(shape, np.float32))
        spectrum[0, 0] = 0
        field = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
        fields.append(field / field.std())
    luminance, red_green, blue_yellow = (f[..., None] for f in fields)
    tint = rng.uniform(-0.3, 0.3, 3).astype(np.float32)
    rgb = luminance + 0.5 * red_green * np.array([1, -0.5, -0.5], np.float32) + tint
    rgb += 0.5 * blue_yellow * np.array([0, 1, -1], np.float32)
    rgb = rng.uniform(90, 150) + rng.uniform(35, 60) * rgb
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert("RGBA")
    overlay = Image.new("RGBA", image.size)
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(0, width, 2), rng.uniform(0, height, 2)
        colour = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(120, 230)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([min(x), min(y), max(x), max(y)], fill=colour)
    pixels = np.asarray(Image.alpha_composite(image, overlay).convert("RGB"), dtype=np.float32)
    pixels += rng.normal(0, 2.5, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_synthetic(job: tuple[Path, int, int, tuple]) -> int:
    """Write synthetic image i of the set (its own seed: the same image whatever the number of processes)."""
    out, i, seed, sizes = job
    rng = np.random.default_rng([seed, i])
    width, height = sizes[rng.choice(len(sizes), p=_weights(sizes))]
    folder = out / "train" / f"synthetic{i % SYNTHETIC_CLASSES}"
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_photo(rng, width, height).save(folder / f"{i:05d}.jpg", quality=90)
    return i


def _weights(sizes: tuple) -> np.ndarray:
    if tuple(sizes) == SYNTHETIC_SIZES:
        return np.asarray(SYNTHETIC_WEIGHTS)
    return np.full(len(sizes), 1 / len(sizes))


def write_photos(
    out: Path, count: int, seed: int = 0, source: str = "auto", workers: int = 1, sizes: tuple = SYNTHETIC_SIZES
) -> str:
    """Write `count` JPEGs as OUT/train/<group>/NNNNN.jpg; returns the source used: "mate-backgrounds" (cut from
    the package's photographs; `source` auto picks it when installed) or "synthetic" (`synthetic_photo` at
    `sizes`, (width, height) pairs, written by `workers` processes). ValueError if mate-backgrounds was asked
    for and is not installed."""
    photos = source_photos() if source != "synthetic" and PHOTOS.is_dir() else []
    if source == "mate-backgrounds" and not photos:
        raise ValueError(f"no photographs under {PHOTOS}: apt-get install mate-backgrounds")
    if not photos:
        jobs = [(out, i, seed, tuple(sizes)) for i in range(count)]
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                written = pool.imap_unordered(_write_synthetic, jobs, chunksize=8)
                for _ in tqdm(written, total=count, desc="synthetic photos", unit="img", mininterval=1):
                    pass
        else:
            for job in tqdm(jobs, desc="synthetic photos", unit="img", mininterval=1):
                _write_synthetic(job)
        return "synthetic"
    rng = np.random.default_rng(seed)
    opened = {}
    for i in tqdm(range(count), desc="photos", unit="img"):
        path = photos[i % len(photos)]
        if path not in opened:
            opened[path] = Image.open(path).convert("RGB")
        folder = out / "train" / path.stem.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        cut(opened[path], rng, portrait=rng.random() < 0.25).save(folder / f"{i:05d}.jpg", quality=90)
    return "mate-backgrounds"


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--count", type=int, default=1000, help="Images to write.")
@click.option("--seed", type=int, default=0)
@click.option(
    "--source",
    type=click.Choice(SOURCES),
    default="auto",
    help="auto = the mate-backgrounds photographs when installed, else synthetic photo-like images.",
)
@click.option("--workers", type=click.IntRange(1), default=1, help="Processes writing synthetic images.")
def main(out: Path, count: int, seed: int, source: str, workers: int) -> None:
    """Write OUT/train/<photo>/NNNNN.jpg."""
    try:
        used = write_photos(out, count, seed, source, workers)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{count} images ({used}) in {out}/train")


if __name__ == "__main__":
    main()
