"""Pictures of what training sees: images with their ContrastiveCrop boxes and crop windows, and the views.

    python -m pipeline.views --boxes runs/sc-leoclr-ccrop/boxes.npy --out views.png
    python -m pipeline.views --data data/fashion-mnist --out views.png     # plain RandomResizedCrops

One row per image: the original view (the whole image resized, as the query encoder gets it) with the box
(white) and the two crop windows (orange, cyan) drawn on it, then crop 1 and crop 2 as the loader emits them,
before colour augmentation (pipeline.pictures draws it). The images, their subset and the crop centres' alpha
are the run's that wrote --boxes (its config.json); without --boxes the crops are plain RandomResizedCrops of
train.py's default subset. The flags shared with train.py are its own (model/config.py).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from model.config import DataConfig, RunConfig, option, read_file
from pipeline.backends import load_splits
from pipeline.ccrop import alpha_for
from pipeline.pictures import picture

FROM_RUN = ("data", "train_limit", "seed", "ccrop_alpha")  # the run's, from config.json beside --boxes


def run_settings(boxes: Path | None) -> dict:
    """FROM_RUN's values in the config.json beside `boxes` (the run that wrote them), or {} without one."""
    config = None if boxes is None else boxes.parent / "config.json"
    if config is None or not config.exists():
        return {}
    try:
        settings = read_file(config)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    return {name: settings[name] for name in FROM_RUN if settings.get(name) is not None}


def from_run(help: str) -> str:
    return f"{help} [default: the run's, from config.json beside --boxes; else train.py's]"


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@option("data", default=None, help=from_run("As train.py --data (needed without a run's config.json)."))
@option(
    "loader", default="torchvision", help="Loader backend reading the images (the windows are the same in every one)."
)
@click.option(
    "--boxes",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="RUN_DIR/boxes.npy of a --crop ccrop run; its --data, --train-limit, --seed and --ccrop-alpha come from "
    "RUN_DIR/config.json.",
)
@option("ccrop_alpha", aliases=("--alpha",), help=from_run("ContrastiveCrop Beta(alpha, alpha) for crop centres."))
@option("train_limit", default=None, help=from_run("As train.py: must match the run the boxes are from."))
@option("seed", default=None, help=from_run("As train.py: must match the run the boxes are from."))
@click.option("--epoch", type=int, default=0, help="Whose crop windows to draw.")
@click.option("--count", type=int, default=8, help="Images (rows).")
@click.option("--size", type=int, default=128, help="Panel size in pixels.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("views.png"))
def main(data, loader, boxes, ccrop_alpha, train_limit, seed, epoch, count, size, out) -> None:
    """Draw images with their boxes and sampled crop windows, and the crops, to a PNG."""
    given = dict(zip(FROM_RUN, (data, train_limit, seed, ccrop_alpha)))  # the flags given, in FROM_RUN's order
    data_defaults = DataConfig()  # train.py's default run
    fallback = {
        "train_limit": data_defaults.train_limit,
        "seed": RunConfig().seed,
        "ccrop_alpha": alpha_for(data_defaults.image_size),
    }
    settings = {**fallback, **run_settings(boxes), **{k: v for k, v in given.items() if v is not None}}
    if settings.get("data") is None:
        raise click.UsageError("give --data (or --boxes of a run whose config.json names it)")
    try:
        images, _ = load_splits(settings["data"], loader, settings["train_limit"], 0, settings["seed"])
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    table = None if boxes is None else np.load(boxes)
    if table is not None and table.shape != (len(images), 4):
        raise click.ClickException(
            f"{boxes} holds {table.shape[0]} boxes for {len(images)} images: same --train-limit?"
        )
    count = min(count, len(images))
    grid = picture(loader, images, settings["seed"], epoch, table, settings["ccrop_alpha"], count, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    click.echo(f"{count} images -> {out}")


if __name__ == "__main__":
    main()
