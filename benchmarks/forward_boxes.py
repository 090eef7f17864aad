"""ContrastiveCrop's boxes from LeOCLR's training forward (--ccrop-boxes forward) against the reference's
localisation pass (--ccrop-boxes pass), on the off-centre set (python -m benchmarks.scattered data/scattered):

    python -m benchmarks.forward_boxes --data data/scattered          # 32 px, 512 train / 500 val, 4 epochs
    python -m benchmarks.forward_boxes --data data/scattered --epochs 20 --train-limit 4000 --val-limit 1000 \
        --ccrop-k 0.5 --amp bf16 --knn-every 5 --seed 0 --runs runs/fb-0   # README's table (14 min a run, 2 cores)

(c) kNN top-1 of three train.py runs with the same seed and epochs: random crops (--crop random), ccrop with
pass-sourced boxes and ccrop with forward-sourced boxes (their commands are printed; finished runs in RUNS are
reused). Then, at the forward run's final weights:
(b) the mean IoU of the two sources' boxes at the same weights: the pass (eval mode, plain whole images) against
    the forward's source (f_q in train mode on the augmented originals of one epoch's batches, no weight update),
    for k = 0.1 (the default) and larger thresholds, with the boxes' mean area;
(a) the wall time of one box update by the pass against the forward source's overhead per epoch: steps with and
    without the map and the box refresh, interleaved in rounds (median round), and the refresh alone.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from model.config import from_checkpoint, option
from model.localize import ForwardBoxes, localize
from model.methods import method_for
from model.options import Integer
from pipeline.augment import normalize
from pipeline.backends import load_splits, make_loader
from pipeline.ccrop import box_areas, heatmap_boxes, mean_box_area
from pipeline.loader import LoaderSpec
from run.parts import augment_config, build_model, optimizer_and_scaler
from run.step import augment_views, training_step

RUNS = {
    "rrc": ["--crop", "random"],
    "pass": ["--crop", "ccrop"],
    "forward": ["--crop", "ccrop", "--ccrop-boxes", "forward"],
}


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (N, 4) [top, left, bottom, right] row by row."""
    height = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    width = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = height * width
    return inter / (box_areas(a) + box_areas(b) - inter)


def train_runs(data: Path, runs: Path, epochs: int, common: list[str]) -> dict:
    """Each run's kNN top-1 per epoch and wall time (a finished run in RUNS is read back, not trained again)."""
    results = {}
    for name, crop in RUNS.items():
        out = runs / f"fb-{name}"
        command = [sys.executable, "train.py", "--data", str(data), *common, *crop, "--out", str(out)]
        click.echo("$ " + " ".join(command[1:]))
        metrics = out / "metrics.jsonl"
        done = metrics.exists() and len(metrics.read_text().splitlines()) == epochs + 1
        if not done:
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            (out / "wall_s.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        wall = (out / "wall_s.txt").read_text().strip() if (out / "wall_s.txt").exists() else "?"
        results[name] = ([r["knn_top1"] for r in records], wall)
    return results


@torch.no_grad()
def forward_source(model, loader, method, cfg, epoch: int, ks: tuple[float, ...]) -> tuple[dict, np.ndarray]:
    """Boxes (N, 4) per threshold k from f_q's maps of one epoch's augmented originals, as --ccrop-boxes forward
    computes them in the step (train mode, a copy of the model so no statistics change), at fixed weights; and
    which images the epoch boxed (N,) bool."""
    net = copy.deepcopy(model).train()
    boxes = {k: ForwardBoxes(len(loader.images), loader.image_size, k, torch.device("cpu"), start=0) for k in ks}
    generator = torch.Generator().manual_seed(epoch)
    for batch in loader.epoch(epoch):
        views, flipped = augment_views(batch, method, augment_config(cfg), generator)
        _, maps = net.query(views["original"], with_map=True)
        for each in boxes.values():
            each.record(batch.indices, maps, flipped, 1)
    stamps = boxes[ks[0]].stamps.numpy()
    return {k: each.merge()["boxes"] for k, each in boxes.items()}, stamps > 0


@torch.no_grad()
def pass_source(model, box_loader, ks: tuple[float, ...]) -> dict[float, np.ndarray]:
    """The reference pass's boxes per k, as `localize` computes them (eval mode, plain whole images, the
    encoder's `feature_map`), its maps kept once and thresholded at every k."""
    net = copy.deepcopy(model.query_encoder).eval()
    parts, order = [], []
    for batch in box_loader.epoch(0):
        parts.append(net.feature_map(normalize(batch.original)))
        order.append(batch.indices.numpy())
    maps, order, size = torch.cat(parts), np.concatenate(order), (box_loader.image_size, box_loader.image_size)
    out = {}
    for k in ks:
        out[k] = np.zeros((len(box_loader.images), 4), dtype=np.float32)
        out[k][order] = heatmap_boxes(maps, size, k).numpy()
    return out


def timing(model, cfg, loader, box_loader, method, rounds: int, steps: int) -> dict:
    """Seconds: one pass (`localize`), `steps` training steps with and without the refresh (interleaved rounds,
    median round each) and one `ForwardBoxes.record` alone (median of many)."""
    optimizer, scaler = optimizer_and_scaler(cfg, model, torch.device("cpu"))
    aug, generator = augment_config(cfg), torch.Generator().manual_seed(0)
    boxes = ForwardBoxes(len(loader.images), loader.image_size, cfg.method.ccrop_k, torch.device("cpu"), start=0)
    batches = []
    for batch in loader.epoch(0):
        batches.append(batch)
        if len(batches) == steps:
            break
    times = {"pass": [], "with": [], "without": []}

    def run(refresh: bool) -> float:
        started = time.perf_counter()
        for batch in batches:
            views, flipped = augment_views(batch, method, aug, generator)
            maps = {} if refresh else None
            training_step(model, method, optimizer, scaler, views, cfg, generator, maps)
            if refresh:
                boxes.record(batch.indices, maps["original"], flipped, 1)
        return time.perf_counter() - started

    run(True)  # warm-up
    for _ in range(rounds):
        started = time.perf_counter()
        localize(model.query_encoder, box_loader, cfg.method.ccrop_k)
        times["pass"].append(time.perf_counter() - started)
        times["with"].append(run(True))
        times["without"].append(run(False))
    maps = {}
    views, flipped = augment_views(batches[0], method, aug, generator)
    with torch.no_grad():
        _, maps = model.train().query(views["original"], with_map=True)
    alone = []
    for _ in range(50):
        started = time.perf_counter()
        boxes.record(batches[0].indices, maps, flipped, 1)
        alone.append(time.perf_counter() - started)
    result = {name: float(np.median(values)) for name, values in times.items()}
    result["record"] = float(np.median(alone))
    result["rounds"] = {name: [round(v, 2) for v in values] for name, values in times.items()}
    return result


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@option("data", default=Path("data/scattered"), help=None)
@click.option("--runs", type=click.Path(path_type=Path), default=Path("runs"), help="Where the three runs go.")
@option("epochs", default=4)
@option("image_size", default=32, help=None)
@option("train_limit", default=512, help=None)
@option("val_limit", default=500, help=None)
@option("ccrop_k", help="train.py's --ccrop-k for the ccrop runs.")
@option("amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", help="train.py's --amp for the runs.")
@option("knn_every", type=Integer(min=0), default=0, help="train.py's --knn-every (0 = only after the last epoch).")
@option("seed", help="train.py's --seed for every run (and the analysis').")
@click.option("--rounds", type=int, default=2, help="Timing rounds (pass, steps with, steps without).")
@click.option("--steps", type=int, default=3, help="Training steps per timing round and variant.")
def main(data, runs, epochs, image_size, train_limit, val_limit, ccrop_k, amp, knn_every, seed, rounds, steps) -> None:
    """Train the three runs, then compare the boxes' sources at the forward run's final weights."""
    if not (data / "train").is_dir():
        raise click.ClickException(f"{data}/train not found: python -m benchmarks.scattered {data}")
    common = ["--method", "leoclr", "--image-size", str(image_size), "--epochs", str(epochs)]
    common += ["--train-limit", str(train_limit), "--val-limit", str(val_limit), "--amp", amp, "--seed", str(seed)]
    common += ["--knn-every", str(knn_every or epochs), "--ccrop-warmup", "1", "--ccrop-interval", "1"]
    common += ["--ccrop-k", str(ccrop_k), "--no-tensorboard"]
    results = train_runs(data, runs, epochs, common)
    click.echo("\n(c) kNN top-1 (%) after epochs 0.." + str(epochs) + ", and the run's wall time")
    for name, (knn, wall) in results.items():
        click.echo(
            f"  {name:8s} " + " ".join("    -" if v is None else f"{100 * v:5.1f}" for v in knn) + f"   {wall} s"
        )

    torch.manual_seed(seed)
    state = torch.load(runs / "fb-forward" / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = from_checkpoint(state)
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(state["model"])
    method = method_for("leoclr")
    train_images, _ = load_splits(data, cfg.data.loader, train_limit, val_limit, seed)
    passes = LoaderSpec(cfg.data.loader, image_size, cfg.optimisation.batch_size, torch.device("cpu"), train=False)
    loader = make_loader(passes.but(train=True, seed=seed, view_count=3), train_images)
    box_loader = make_loader(passes, train_images)

    ks = tuple(sorted({0.1, 0.3, 0.5, 0.7, ccrop_k}))
    passed = pass_source(model, box_loader, ks)
    assert np.array_equal(passed[0.1], localize(model.query_encoder, box_loader, 0.1))  # the pass's own boxes
    forwarded, seen = forward_source(model, loader, method, cfg, epochs, ks)
    click.echo(f"\n(b) boxes at the forward run's final weights ({seen.sum()} of {len(seen)} images in one epoch)")
    click.echo("  k     mean IoU  IoU>0.5  area pass  area forward")
    area = mean_box_area
    for k in ks:
        p, f = passed[k][seen], forwarded[k][seen]
        overlap = iou(p, f)
        click.echo(
            f"  {k:.1f}   {overlap.mean():.3f}     {np.mean(overlap > 0.5):.3f}    {area(p):.3f}      {area(f):.3f}"
        )
    used = np.load(runs / "fb-forward" / "boxes.npy")
    used_pass = np.load(runs / "fb-pass" / "boxes.npy")
    click.echo(
        f"  boxes the runs last cropped around (boxes.npy): forward area {area(used):.3f}, pass area "
        f"{area(used_pass):.3f}, mean IoU {iou(used, used_pass).mean():.3f}"
    )

    times = timing(model, cfg, loader, box_loader, method, rounds, steps)
    per_step = (times["with"] - times["without"]) / steps
    epoch_steps = len(loader)
    click.echo(f"\n(a) wall time, {rounds} interleaved rounds (median), {torch.get_num_threads()} torch threads")
    click.echo(f"  one box update by the pass over {len(train_images)} images: {times['pass']:.2f} s")
    click.echo(
        f"  {steps} steps with / without the forward's refresh: {times['with']:.2f} / {times['without']:.2f} s "
        f"-> {per_step * epoch_steps:+.2f} s per epoch of {epoch_steps} steps"
    )
    click.echo(
        f"  the refresh alone (box rule + scatter, batch {cfg.optimisation.batch_size}): "
        f"{1000 * times['record']:.2f} ms per step -> {times['record'] * epoch_steps:.3f} s per epoch"
    )
    click.echo(f"  rounds: {times['rounds']}")


if __name__ == "__main__":
    main()
