"""Loader-only throughput: images/sec delivered to the training device (uint8 views -> aug+ float views,
normalised, channels_last), for each loader, 1-3 views and both crop kinds, plus each backend's decode alone
and the official-MoCo-style torchvision pipeline users run today.

    python -m benchmarks.photos data/photos --count 1000
    python -m pipeline.convert data/photos data/photos-ffcv256 --max-resolution 256
    python -m benchmarks.loaders --data data/photos --ffcv-data data/photos-ffcv256 \\
        --json docs/loaders.json --plot docs/loaders.png

Every configuration runs in a fresh process (its own peak RSS, no threads left over from another): one
warm-up pass over the images (FFCV's compile, DALI's start, page cache), then --passes timed passes; the
median and spread of the passes are reported, the process's peak RSS and its RSS after each pass, and the
peak unique memory of DataLoader worker processes (sampled every 2 s).
Views: 1 = one crop, 2 = two crops (MoCo-v2), 3 = the original + two crops (LeOCLR).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from model.config import option

LOADERS = (
    "decode-only-dali",
    "decode-only-ffcv",
    "decode-only-pil",
    "official-torchvision",
    "torchvision",
    "dali",
    "ffcv",
)
DECODE_ONLY = {"decode-only-dali": "dali", "decode-only-ffcv": "ffcv", "decode-only-pil": "torchvision"}


@dataclass
class Config:
    loader: str
    views: int | None  # None for decode-only
    crop: str
    data: str
    image_size: int
    batch_size: int
    workers: int
    passes: int
    limit: int
    augment: bool
    device: str


@dataclass
class Result:
    loader: str
    views: int | None
    crop: str
    images_per_sec: float  # median over the timed passes
    images_per_sec_passes: list[float]
    peak_rss_mb: float  # this process (DALI and FFCV threads run in it)
    workers_peak_uss_mb: float  # DataLoader worker processes, memory of their own
    base_rss_mb: float  # after imports and data indexing, before the loader starts
    rss_after_pass_mb: list[float]  # the warm-up pass first
    images: int
    image_size: int
    batch_size: int
    workers: int
    augment: bool
    device: str
    extra: dict = field(default_factory=dict)


class RssSampler:
    """Peak RSS (MiB) of this process, the loader's, and peak unique memory (USS) of its worker processes
    (DataLoader workers share most pages with it: their RSS would count those again), sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self.workers_peak, self._stop = psutil.Process(), 0.0, 0.0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> float:
        rss = self.process.memory_info().rss / 2**20
        self.peak = max(self.peak, rss)
        return rss

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(0.05):
            self.now()
            ticks += 1
            if ticks % 40:  # reading a worker's smaps costs milliseconds of a core: every 2 s only
                continue
            workers = 0
            for child in self.process.children(recursive=True):
                try:
                    workers += child.memory_full_info().uss
                except Exception:  # a worker that just exited
                    pass
            self.workers_peak = max(self.workers_peak, workers / 2**20)

    def stop(self) -> None:
        self._stop.set()


def official_torchvision(cfg: Config, images):
    """The official MoCo-v2 pipeline (main_moco.py's aug+ and TwoCropsTransform, here with 1-3 views; the
    LeOCLR original is the whole image resized, then the same colour/blur/flip): per-sample PIL in DataLoader
    workers. Yields lists of float (N, 3, S, S) views."""
    import torch
    from PIL import Image, ImageFilter
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

    class Blur:  # moco.loader.GaussianBlur
        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))

    size = cfg.image_size
    colour = (
        [
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([Blur()], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
        if cfg.augment
        else []
    )
    tail = [*colour, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    crop = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), *tail])
    whole = transforms.Compose([transforms.Resize((size, size)), *tail])
    per_view = ([whole] if cfg.views == 3 else []) + [crop] * min(cfg.views, 2)

    class Folder(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            with Image.open(images.paths[i]) as file:
                image = file.convert("RGB")
            return [t(image) for t in per_view], int(images.labels[i])

    device = torch.device(cfg.device)
    data = DataLoader(
        Folder(),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )

    def passes():
        while True:
            yield (
                [v.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for v in views]
                for views, _ in data
            )

    return passes()


def ours(cfg: Config, images):
    """Our loaders (decode once, all views from one decode) + the device augmentation, as train.py runs them."""
    import torch

    from pipeline.augment import AugmentConfig
    from pipeline.backends import make_loader
    from pipeline.loader import LoaderSpec

    device = torch.device(cfg.device)
    backend = DECODE_ONLY.get(cfg.loader, cfg.loader)
    views = 0 if cfg.loader in DECODE_ONLY else cfg.views
    spec = LoaderSpec(backend, cfg.image_size, cfg.batch_size, device, True, workers=cfg.workers, view_count=views)
    loader = make_loader(spec, images)
    if cfg.crop == "ccrop":  # seeded boxes covering 10-100% of each side: ContrastiveCrop's sampling path
        rng = np.random.default_rng(0)
        start, extent = rng.uniform(0, 0.9, (len(images), 2)), rng.uniform(0.1, 1.0, (len(images), 2))
        loader.boxes = np.concatenate([start, np.minimum(start + extent, 1.0)], axis=1)
    generator = torch.Generator(device=device).manual_seed(0)
    aug = AugmentConfig(blur_p=0.5 if cfg.image_size > 64 else 0.0) if cfg.augment else None

    def passes():
        for epoch in range(1_000_000):
            yield (delivered(batch, aug, generator) for batch in loader.epoch(epoch))

    return passes()


def delivered(batch, aug, generator) -> list:
    """What a training step gets from a loader's `Batch`: each view it holds, uint8 (N, 3, S, S), as float32
    (N, 3, S, S) channels_last on the batch's device, augmented with the AugmentConfig `aug` (None: normalised
    only); for a batch without views (decode only) its labels, so that the caller can count images."""
    from pipeline.augment import augment, normalize

    raw = [v for v in (batch.original, batch.crop1, batch.crop2) if v is not None]
    return [normalize(v) if aug is None else augment(v, aug, generator) for v in raw] or [batch.labels]


def run_one(cfg: Config) -> Result:
    """Time one configuration in this process."""
    import torch

    from pipeline.backends import load_splits

    backend = "ffcv" if cfg.loader in ("ffcv", "decode-only-ffcv") else "torchvision"
    images, _ = load_splits(cfg.data, backend, cfg.limit, val_limit=1)  # the val split is not read
    rss = RssSampler()
    base = rss.now()
    make = official_torchvision if cfg.loader == "official-torchvision" else ours
    passes = make(cfg, images)
    rates, after = [], []
    cuda = cfg.device == "cuda"
    for k in range(cfg.passes + 1):  # pass 0 warms up
        count, started = 0, time.perf_counter()
        for views in next(passes):
            count += len(views[0])
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        after.append(round(rss.now(), 1))
        if k:
            rates.append(round(count / elapsed, 1))
    rss.stop()
    return Result(
        loader=cfg.loader,
        views=cfg.views,
        crop=cfg.crop,
        images_per_sec=float(np.median(rates)),
        images_per_sec_passes=rates,
        peak_rss_mb=round(rss.peak, 1),
        base_rss_mb=round(base, 1),
        workers_peak_uss_mb=round(rss.workers_peak, 1),
        rss_after_pass_mb=after,
        images=count,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        augment=cfg.augment,
        device=cfg.device,
    )


def _child(cfg: Config, queue) -> None:
    # This process was spawned, which makes spawn the default for DataLoader workers too: each epoch would
    # start fresh interpreters that import torch. Fork, as a training script's DataLoader does on Linux.
    multiprocessing.set_start_method("fork", force=True)
    try:
        result = asdict(run_one(cfg))
        if result["views"] is None:  # decode only: no views at all
            del result["views"]
        queue.put(result)
    except Exception as error:  # reported by the parent, which goes on with the next configuration
        queue.put({"error": f"{type(error).__name__}: {error}"})


def run_isolated(cfg: Config) -> dict:
    """run_one in a fresh spawned process: its own RSS, its own threads."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(cfg, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def plot(results: list[dict], path: Path) -> None:
    """Horizontal bars of images/sec (median, with the min-max spread as a line), one row per configuration."""
    from PIL import Image, ImageDraw

    rows = [r for r in results if "error" not in r]
    top = max(r["images_per_sec"] for r in rows)
    width, label_w, row_h = 1000, 290, 22
    image = Image.new("RGB", (width, 40 + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    first = rows[0]
    title = (
        f"images/sec delivered, {first['image_size']} px, batch {first['batch_size']}, "
        f"{first['workers']} workers, device {first['device']}, aug+ {first['augment']}"
    )
    draw.text((10, 10), title, fill="black")
    colours = {None: "#888888", 1: "#9ecae1", 2: "#4292c6", 3: "#08519c"}
    scale = (width - label_w - 80) / top
    for i, r in enumerate(rows):
        y = 35 + i * row_h
        views = r.get("views")
        name = r["loader"] + ("" if views is None else f" {views} view{'s' * (views > 1)}")
        name += ", ccrop" if r["crop"] == "ccrop" else ""
        draw.text((10, y + 4), name, fill="black")
        draw.rectangle((label_w, y + 2, label_w + r["images_per_sec"] * scale, y + row_h - 4), fill=colours[views])
        low, high = min(r["images_per_sec_passes"]), max(r["images_per_sec_passes"])
        draw.line((label_w + low * scale, y + row_h // 2, label_w + high * scale, y + row_h // 2), fill="red")
        right = label_w + max(r["images_per_sec"], high) * scale
        draw.text((right + 6, y + 4), f"{r['images_per_sec']:.0f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def report(results: list[dict]) -> list[str]:
    """The cost model's readings: per backend, seconds per image t0 (decode only), t1, t2, t3 (views), the
    third view's cost against one view's, and the best 3-view loader against the official pipeline."""
    ok = [r for r in results if "error" not in r]
    rate = {(r["loader"], r.get("views"), r["crop"]): r["images_per_sec"] for r in ok}
    lines = []
    for backend, decode in (
        ("dali", "decode-only-dali"),
        ("ffcv", "decode-only-ffcv"),
        ("torchvision", "decode-only-pil"),
    ):
        t = [rate.get((decode, None, "random"))] + [rate.get((backend, v, "random")) for v in (1, 2, 3)]
        if None in t:
            continue
        t0, t1, t2, t3 = (1e3 / x for x in t)
        third, per_view = t3 - t2, (t2 - t0) / 2
        lines.append(
            f"{backend:12s} ms/img: decode {t0:.3f}, 1 view {t1:.3f}, 2 views {t2:.3f}, 3 views {t3:.3f}; "
            f"third view {third:.3f} vs (t2-t0)/2 = {per_view:.3f}: {third / per_view:.2f}x "
            f"({'meets' if third <= 1.15 * per_view else 'misses'} <= 1.15x)"
        )
    official = rate.get(("official-torchvision", 3, "random"))
    best = max(((rate.get((b, 3, "random")) or 0), b) for b in ("dali", "ffcv", "torchvision"))
    if official and best[0]:
        factor = best[0] / official
        lines.append(
            f"best 3-view loader {best[1]} {best[0]:.0f} img/s = {factor:.1f}x official-torchvision {official:.0f} "
            f"({'meets' if factor >= 10 else 'misses'} >= 10x)"
        )
    for r in ok:  # memory growth over the timed passes (the warm-up pass fills pools and caches)
        first, last = r["rss_after_pass_mb"][1], r["rss_after_pass_mb"][-1]
        if last > 1.05 * first:
            name = f"{r['loader']} {r.get('views', '-')} {r['crop']}"  # decode-only rows have no views
            lines.append(f"RSS grew {first:.0f} -> {last:.0f} MiB over the timed passes: {name}")
    return lines


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="ImageNet-layout JPEG folder (its train split) for dali, torchvision and the PIL pipelines.",
)
@click.option(
    "--ffcv-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="The same images as .beton (file, or folder with train.beton); ffcv rows are skipped without it.",
)
@click.option(
    "--loader",
    "loaders",
    type=click.Choice(LOADERS),
    multiple=True,
    default=LOADERS,
    help="Repeat to pick several. [default: all]",
)
@click.option("--views", "view_counts", type=click.IntRange(1, 3), multiple=True, default=(1, 2, 3))
@click.option(
    "--crop",
    "crops",
    type=click.Choice(["random", "ccrop"]),
    multiple=True,
    default=("random", "ccrop"),
    help="ccrop = ContrastiveCrop sampling with seeded random boxes (our loaders only).",
)
@click.option("--augment/--no-augment", default=True, help="aug+ colour, grayscale, blur, flip (normalise always).")
@option("image_size", default=224, help=None)
@option("batch_size", default=64, help=None)
@option("workers", type=click.IntRange(1), default=2, help="Loader threads/processes.")
@click.option("--passes", type=click.IntRange(1), default=5, help="Timed passes over the images after the warm-up.")
@click.option("--limit", type=click.IntRange(0), default=1000, help="Images per pass (0 = all).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(
    data,
    ffcv_data,
    loaders,
    view_counts,
    crops,
    augment,
    image_size,
    batch_size,
    workers,
    passes,
    limit,
    device,
    json_path,
    plot_path,
) -> None:
    """Loader throughput in images/sec, each configuration in a fresh process."""
    from pipeline.device import resolve_device

    device = resolve_device(device)
    configs = []
    for loader in loaders:
        if "ffcv" in loader and ffcv_data is None:
            click.echo(f"{loader}: skipped (no --ffcv-data; make one with python -m pipeline.convert)")
            continue
        source = str(ffcv_data if "ffcv" in loader else data)
        own = loader in ("torchvision", "dali", "ffcv")
        for views in [None] if loader in DECODE_ONLY else view_counts:
            for crop in crops if own else ["random"]:
                configs.append(
                    Config(loader, views, crop, source, image_size, batch_size, workers, passes, limit, augment, device)
                )
    results = []
    for cfg in configs:
        result = run_isolated(cfg)
        results.append(result)
        name = f"{cfg.loader:21s} {'-' if cfg.views is None else cfg.views} {cfg.crop:6s}"
        if json_path:  # written as it goes: a long run interrupted keeps what it measured
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(results, indent=1) + "\n")
        if "error" in result:
            click.echo(f"{name} FAILED: {result['error']}")
            continue
        spread = result["images_per_sec_passes"]
        rss = f"RSS peak {result['peak_rss_mb']:.0f} MiB, after passes {result['rss_after_pass_mb']}"
        click.echo(f"{name} {result['images_per_sec']:8.0f} img/s  (passes {min(spread):.0f}-{max(spread):.0f}; {rss})")
    for line in report(results):
        click.echo(line)
    if plot_path and any("error" not in r for r in results):
        plot(results, plot_path)
    if all("error" in r for r in results):  # nothing measured: a failure for scripts and CI, not a quiet exit 0
        first = f": the first says {results[0]['error']}" if results else ""
        raise click.ClickException(f"none of the {len(results)} configurations ran{first}")


if __name__ == "__main__":
    main()
