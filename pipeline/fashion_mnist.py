"""Turn Debian's Fashion-MNIST IDX files into an ImageNet-layout folder of JPEGs.

    python -m pipeline.fashion_mnist data/fashion-mnist

writes DIR/train/<class>/<index>.jpg (the official 60k training split) and DIR/val/<class>/<index>.jpg
(the official 10k test split). Images stay 28 x 28 grayscale; every loader decodes them to RGB.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
SPLITS = {"train": "train", "val": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file into a uint8 array of the shape its header declares."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, quality: int, desc: str) -> None:
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    progress = tqdm(zip(images, labels), total=len(images), desc=desc, unit="img", mininterval=2)
    for i, (image, label) in enumerate(progress):
        Image.fromarray(image, mode="L").save(out / CLASSES[label] / f"{i:05d}.jpg", quality=quality)


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_SOURCE,
    show_default=True,
    help="Folder with the IDX files (apt-get install dataset-fashion-mnist).",
)
@click.option("--quality", default=95, show_default=True, help="JPEG quality.")
@click.option("--force", is_flag=True, help="Rewrite the folder even if it looks complete.")
def main(out: Path, source: Path, quality: int, force: bool) -> None:
    """Write Fashion-MNIST as OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg."""
    marker = out / ".complete"
    if marker.exists() and not force:
        click.echo(f"{out} is already prepared (use --force to rewrite)")
        return
    for split, prefix in SPLITS.items():
        files = [source / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise click.ClickException(
                f"missing {', '.join(missing)}: run 'apt-get install dataset-fashion-mnist' or pass --source"
            )
        images, labels = read_idx(files[0]), read_idx(files[1])
        if len(images) != len(labels):
            raise click.ClickException(f"{files[0]} and {files[1]} disagree on the number of samples")
        write_split(images, labels, out / split, quality, desc=split)
    marker.touch()
    counts = {split: sum(1 for _ in (out / split).rglob("*.jpg")) for split in SPLITS}
    click.echo(f"wrote {counts} to {os.fspath(out)}")


if __name__ == "__main__":
    main()
