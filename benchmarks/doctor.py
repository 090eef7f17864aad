"""Is my GPU starved? Measures, on this machine (a CPU or one GPU) and within a time budget, what each loader
backend delivers, what the training step consumes, and what a run of both gives, and says which one limits
training and what would fix it.

    python -m benchmarks.doctor                                   # a generated JPEG set, every backend
    python -m benchmarks.doctor --data /imagenet --loader dali --workers 8 --json doctor.json
    python -m benchmarks.doctor --tiny                            # under a minute on a 2-core CPU

1. Data: --data (an ImageNet-layout folder, a seeded --images subset of it) or a generated set of --images
   JPEGs: cut from Debian's mate-backgrounds photographs when installed, else synthetic photo-like images
   (benchmarks/photos.py). FFCV reads the same images converted to a .beton in the work folder.
2. Backends: each of --backends is built and gives a first batch, or the report says why not.
3. Loader only: img/s of the method's views (LeOCLR 3, MoCo-v2 2) at the chosen size, augmented on the
   device as train.py does (DALI decodes with `mixed` on CUDA, FFCV copies to CUDA), at --workers.
4. Compute only: benchmarks/train_step.py's Runner step (train.py's training step) on one batch kept on the
   device. End to end: the same step fed by --loader at --workers.
Verdict: end to end >= --keep-up x compute only: compute-bound. Else loader-bound by 1 - end to end /
compute only; a sweep of --workers over the fastest backend then names the fewest workers whose loader-only
rate is enough to feed the step (compute only, scaled by how much slower the loader delivered while training
than alone), and that setting is run end to end to confirm it.
Rates are measured from the page cache (the files were just written or read), over a time slice each.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.loaders import delivered
from benchmarks.photos import SYNTHETIC_SIZES, write_photos
from benchmarks.train_step import Runner, device_name
from model.config import Config, inherited, option, resolve
from model.methods import METHODS
from model.precision import resolve_amp
from pipeline.backends import BACKENDS, load_splits, make_loader
from pipeline.data import ImageList
from pipeline.device import resolve_device
from pipeline.loader import Loader, machine_workers
from run.parts import augment_config, loader_spec, loader_views

# train.py's settings per machine: the paper's ImageNet recipe on a GPU, train.py's own defaults on a CPU. The
# precision is always explicit (bf16 is what a recent GPU trains in; fp32 is safe on any CPU).
RECIPES = {
    "cuda": dict(
        arch="resnet50",
        image_size=224,
        batch_size=256,
        queue_size=65536,
        moco_momentum=0.999,
        temperature=0.2,
        lr=0.03,
        weight_decay=1e-4,
        amp="bf16",
    ),
    "cpu": dict(amp="off"),
    "tiny": dict(arch="resnet18", image_size=32, batch_size=4, queue_size=32, amp="off", bn_splits=2),
}
IMAGES = {"cuda": 2048, "cpu": 512, "tiny": 24}  # generated (or indexed) images per setting
TINY_SIZES = ((64, 48), (48, 64), (80, 60), (96, 72))  # small JPEGs: seconds to write, decode and convert
SLICE_S = {"cuda": (2.0, 12.0), "cpu": (2.0, 12.0), "tiny": (0.3, 1.0)}  # time per measurement: least, most
STEPS = {"cuda": (3, 3), "cpu": (2, 3), "tiny": (1, 2)}  # training steps per measurement: untimed, least timed


class Clock:
    """Seconds since the start, against the budget; `say` prints a progress line stamped with them."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def say(self, text: str) -> None:
        click.echo(f"[{self.elapsed():6.1f} s] {text}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], int], device: torch.device, seconds: float, warmup: int, min_steps: int = 3) -> dict:
    """Images/sec of `step` (returns the images it handled) over `seconds` after `warmup` untimed steps. The
    device is synchronised before the clock starts and after it stops, not per step: the host may queue a
    few steps ahead, as in training, and the last sync counts them."""
    for _ in range(warmup):
        step()
    sync(device)
    images = steps = 0
    started = time.perf_counter()
    while steps < min_steps or time.perf_counter() - started < seconds:
        images += step()
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - started
    return {"images_per_sec": images / elapsed, "steps": steps, "seconds": round(elapsed, 3)}


def forever(loader: Loader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    for epoch in range(1_000_000):
        yield from loader.epoch(epoch)


def reason(error: BaseException) -> str:
    """One line saying why something failed."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def decide(compute: float, end_to_end: float, loader_alone: float, rows: list[dict], keep_up: float) -> dict:
    """The verdict from the rates (img/s): `compute` only, `end_to_end` with the training loader, that loader's
    own rate `loader_alone`, and `rows` of loader-only measurements ({"loader", "workers", "images_per_sec"}).

    Compute-bound when end to end >= keep_up x compute only. Otherwise loader-bound by 1 - end_to_end / compute,
    for one of two causes: the training loader alone delivers less than the step takes ("loader too slow"), or
    enough alone but not while the step runs ("loader and step compete", for CPU cores, or for the GPU with
    DALI's mixed decode). The fix is the row with the fewest workers (then the highest rate) that delivers
    `needed` = compute only x loader_alone / end_to_end (at least compute only): enough to feed the step after
    the loss the training loader showed while training. `best` is the fastest row."""
    fraction = end_to_end / compute
    bound = "compute" if fraction >= keep_up else "loader"
    cause = None
    if bound == "loader":
        cause = "loader too slow" if loader_alone < compute else "loader and step compete"
    needed = compute * max(1.0, loader_alone / end_to_end)
    best = max(rows, key=lambda r: r["images_per_sec"]) if rows else None
    fix = None
    if bound == "loader":
        enough = [r for r in rows if r["images_per_sec"] >= needed]
        fix = min(enough, key=lambda r: (r["workers"], -r["images_per_sec"])) if enough else None
    return {
        "bound": bound,
        "cause": cause,
        "end_to_end_fraction": fraction,
        "loader_bound_percent": round(max(0.0, 100 * (1 - fraction)), 1),
        "keep_up": keep_up,
        "loader_alone_images_per_sec": loader_alone,
        "needed_loader_images_per_sec": needed,
        "fix": fix,
        "best": best,
    }


def prepare_images(data: Path | None, work: Path, count: int, seed: int, tiny: bool, clock: Clock) -> tuple:
    """(folder, ImageList of its train split, source): --data's seeded subset, or a generated set in `work`
    (reused when it is already there)."""
    if data is not None:
        images, _ = load_splits(data, "torchvision", count, val_limit=1, seed=seed)
        return data, images, f"given ({data})"
    folder = work / f"jpeg-{count}-seed{seed}{'-tiny' if tiny else ''}"
    marker = folder / "doctor-set.json"
    if marker.is_file():
        source = json.loads(marker.read_text())["source"]
        clock.say(f"data: reusing {count} {source} JPEGs in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        workers = 1 if tiny else len(os.sched_getaffinity(0))
        clock.say(f"data: writing {count} JPEGs to {folder} ({workers} processes)")
        source = write_photos(folder, count, seed, workers=workers, sizes=TINY_SIZES if tiny else SYNTHETIC_SIZES)
        marker.write_text(json.dumps({"source": source, "count": count, "seed": seed}) + "\n")
    images, _ = load_splits(folder, "torchvision", 0, val_limit=1, seed=seed)
    return folder, images, source


def beton_for(images: ImageList, work: Path, name: str, max_resolution: int, tiny: bool, clock: Clock) -> ImageList:
    """The same images as a .beton in `work` (converted once; FFCV must import), as FFCV's ImageList."""
    from pipeline.convert import convert_split  # ImportError where FFCV is not installed

    beton = work / f"{name}-ffcv{max_resolution}.beton"
    if not beton.is_file():
        # Exactly the indexed images, linked in their folders: the .beton keeps the same sorted order.
        source = work / f"{name}-links" / "train"
        shutil.rmtree(source.parent, ignore_errors=True)
        for path in images.paths:
            link = source / Path(path).parent.name / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).resolve())
        clock.say(f"ffcv: converting {len(images)} images to {beton} (max side {max_resolution or 'kept'})")
        convert_split(source, beton, max_resolution=max_resolution, workers=1 if tiny else 0)
        shutil.rmtree(source.parent, ignore_errors=True)
    return load_splits(beton, "ffcv")[0]


def loader_rate(backend: str, images, cfg: Config, workers: int, device, seconds: float, clock: Clock) -> dict:
    """Build `backend`'s loader at `workers`, take a first batch, then time loader-only img/s (views augmented
    on the device as train.py does). Returns the row, with "error" instead of a rate if it does not run."""
    row = {"loader": backend, "workers": workers}
    started = time.perf_counter()
    views = loader_views(METHODS[cfg.method.method])
    try:
        spec = loader_spec(cfg, device).but(
            backend=backend, train=True, seed=cfg.run.seed, workers=workers, view_count=views
        )
        loader = make_loader(spec, images)
    except Exception as error:  # an import or a build failing: the backend does not run here
        return {**row, "error": reason(error)}
    batches = forever(loader)
    try:
        aug, generator = augment_config(cfg), torch.Generator(device=device).manual_seed(cfg.run.seed)
        step = lambda: len(delivered(next(batches), aug, generator)[0])
        step()
        sync(device)
        row["first_batch_s"] = round(time.perf_counter() - started, 2)
        row.update(measure(step, device, seconds, warmup=2))
    except Exception as error:
        return {**row, "error": reason(error)}
    finally:
        batches.close()
        loader.close()
    clock.say(
        f"loader only  {backend:11s} --workers {workers:<3d} {row['images_per_sec']:9.1f} img/s "
        f"(first batch {row['first_batch_s']} s)"
    )
    return row


def step_rates(cfg: Config, images, device, seconds: float, steps: tuple, clock: Clock, compute: bool = True) -> dict:
    """Compute-only (if `compute`) and end-to-end img/s of train.py's step through benchmarks.train_step's
    Runner, fed by cfg's loader and workers; `steps` = (untimed, least timed) steps per measurement."""
    warmup, least = steps
    runner = Runner(cfg, cfg.method.method, images, device)
    rates = {}
    try:
        if compute:
            rates["compute"] = measure(lambda: runner.step(end_to_end=False), device, seconds, warmup, least)
            rate = rates["compute"]["images_per_sec"]
            clock.say(f"compute only {cfg.model.arch}, {cfg.method.method}: {rate:9.1f} img/s")
        rates["end_to_end"] = measure(lambda: runner.step(end_to_end=True), device, seconds, warmup, least)
        rate = rates["end_to_end"]["images_per_sec"]
        clock.say(f"end to end   {cfg.data.loader:11s} --workers {cfg.data.workers:<3d} {rate:9.1f} img/s")
    finally:
        runner.batches.close()
        runner.loader.close()
    return rates


def release(device: torch.device) -> None:
    """Free a finished Runner's model and batches before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_values(workers: int, tiny: bool) -> list[int]:
    """--workers to try on the fastest backend: powers of two up to this process's cores (1 and 2 in tiny mode),
    and the given one."""
    cores = len(os.sched_getaffinity(0))
    top = 2 if tiny else max(cores, 1)
    return sorted({2**k for k in range(top.bit_length()) if 2**k <= top} | {workers})


def describe(report: dict) -> list[str]:
    """The text report's verdict lines."""
    verdict = report["verdict"]
    compute, e2e = report["compute_only_images_per_sec"], report["end_to_end"]
    lines = []
    share = f"{100 * verdict['end_to_end_fraction']:.0f}%"
    run = f"--loader {e2e['loader']} --workers {e2e['workers']}"
    if verdict["bound"] == "compute":
        lines.append(
            f"compute-bound: end to end {e2e['images_per_sec']:.1f} img/s = {share} of compute only "
            f"{compute:.1f} img/s ({run}): the loader keeps up; only a faster step speeds this run up "
            f"(benchmarks/train_step.py)."
        )
        return lines
    lines.append(
        f"loader-bound by {verdict['loader_bound_percent']:.0f}%: end to end {e2e['images_per_sec']:.1f} img/s"
        f" = {share} of compute only {compute:.1f} img/s ({run}): the training step waits for data "
        f"{verdict['loader_bound_percent']:.0f}% of the time."
    )
    needed, alone = verdict["needed_loader_images_per_sec"], verdict["loader_alone_images_per_sec"]
    if verdict["cause"] == "loader too slow":
        lines.append(f"cause: {e2e['loader']} alone delivers {alone:.1f} img/s, less than the step takes.")
    else:
        lines.append(
            f"cause: {e2e['loader']} alone delivers {alone:.1f} img/s, enough for the step, but not while it runs: "
            "they compete for CPU cores (or for the GPU, with DALI's mixed decode), or the machine is busy."
        )
    fix, best = verdict["fix"], verdict["best"]
    if fix is not None:
        lines.append(
            f"fix: --loader {fix['loader']} --workers {fix['workers']}: loader only "
            f"{fix['images_per_sec']:.1f} img/s >= {needed:.1f} needed."
        )
        confirmed = report.get("confirmed") or {}
        if "images_per_sec" in confirmed:
            share, kept = 100 * confirmed["end_to_end_fraction"], confirmed["end_to_end_fraction"] >= verdict["keep_up"]
            lines.append(
                f"{'confirmed' if kept else 'NOT confirmed'}: end to end with it {confirmed['images_per_sec']:.1f} "
                f"img/s = {share:.0f}% of compute only ({'at or above' if kept else 'below'} the "
                f"{100 * verdict['keep_up']:.0f}% that counts as keeping up)."
            )
        elif "error" in confirmed:
            lines.append(f"not confirmed end to end: {confirmed['error']}")
    elif best is not None:
        lines.append(
            f"no measured setting keeps up: the fastest, --loader {best['loader']} --workers "
            f"{best['workers']}, delivers {best['images_per_sec']:.1f} img/s of the {needed:.1f} needed: "
            + (
                "more CPU cores per GPU, FFCV with a lower --ffcv-max-resolution, or fewer views per image."
                if verdict["cause"] == "loader too slow"
                else "leave the step more of the machine (fewer --workers, a backend that costs less CPU per "
                "image) and measure again on a quiet machine."
            )
        )
    return lines


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="ImageNet-layout folder (DATA/train/<class>/*.jpg). [default: a generated JPEG set]",
)
@click.option(
    "--images",
    type=click.IntRange(1),
    default=None,
    help="Images to generate, or to take (seeded) from --data. [default: 2048 on CUDA, 512 on CPU, 24 with --tiny]",
)
@click.option("--method", type=click.Choice(["leoclr", "mocov2"]), default="leoclr")
@inherited("arch", source="resnet50 on CUDA, train.py's on CPU")
@inherited("image_size", source="224 on CUDA, train.py's on CPU")
@inherited("batch_size", source="256 on CUDA, train.py's on CPU")
@inherited("amp", source="bf16 on CUDA, off (fp32) on CPU")
@inherited("bn_splits", source="train.py's")
@option(
    "loader",
    help="The loader you train with (end to end); the fastest one that runs if it does not.",
)
@option(
    "workers",
    type=click.IntRange(1),
    default=None,
    help="Its --workers. [default: train.py's, this process's share of the CPU cores less one]",
)
@click.option(
    "--backends",
    type=click.Choice(BACKENDS),
    multiple=True,
    default=BACKENDS,
    help="Backends to try (repeat).",
)
@click.option(
    "--ffcv-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="The same images as a .beton already (file or folder with train.beton). [default: convert]",
)
@click.option(
    "--ffcv-max-resolution",
    type=click.IntRange(0),
    default=0,
    help="Longest stored side of the converted .beton (0 = the JPEGs' own size, as the others decode).",
)
@click.option(
    "--keep-up",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.9,
    help="End to end / compute only at or above which the loader counts as keeping up.",
)
@click.option(
    "--sweep/--no-sweep", default=None, help="Sweep --workers on the fastest backend. [default: only when loader-bound]"
)
@click.option(
    "--budget-s", type=click.FloatRange(1), default=None, help="Time budget in seconds. [default: 300; 20 with --tiny]"
)
@option("device", help="auto = cuda if available, else cpu.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the generated set and .beton go, kept and reused. [default: a temporary folder]",
)
@click.option(
    "--tiny",
    is_flag=True,
    help="24 small JPEGs, resnet18 at 32 px, batch 4, fp32, short slices: the plumbing, in seconds.",
)
@option("seed")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(
    data,
    images,
    method,
    arch,
    image_size,
    batch_size,
    amp,
    bn_splits,
    loader,
    workers,
    backends,
    ffcv_data,
    ffcv_max_resolution,
    keep_up,
    sweep,
    budget_s,
    device,
    work_dir,
    tiny,
    seed,
    json_path,
) -> None:
    """Is my GPU starved? Loader-only, compute-only and end-to-end img/s on this machine, and a verdict."""
    device = resolve_device(device)
    dev = torch.device(device)
    setting = "tiny" if tiny else dev.type
    clock = Clock(budget_s or (20.0 if tiny else 300.0))
    count = images or IMAGES[setting]
    backends = list(dict.fromkeys([*backends, loader]))  # the training loader is always measured alone too
    given = dict(
        method=method,
        arch=arch,
        image_size=image_size,
        batch_size=batch_size,
        amp=amp,
        bn_splits=bn_splits,
        workers=workers,
    )
    options = {**Config().to_dict(), **RECIPES[setting], **{k: v for k, v in given.items() if v is not None}}
    # The queue's size barely changes a step's cost; MoCo needs it to be whole batches.
    options["queue_size"] = -(-options["queue_size"] // options["batch_size"]) * options["batch_size"]
    cfg = resolve({**options, "loader": loader, "data": str(data), "device": device, "seed": seed})
    cfg.data.workers = machine_workers() if cfg.data.workers is None else cfg.data.workers
    cfg.optimisation.amp, _ = resolve_amp(cfg.optimisation.amp, dev, cfg.model.arch, cfg.data.image_size)
    views = loader_views(METHODS[method])
    clock.say(
        f"{device_name(dev)}; {method} ({views} views), {cfg.model.arch}, {cfg.data.image_size} px, batch "
        f"{cfg.optimisation.batch_size}, amp {cfg.optimisation.amp}; budget {clock.budget:.0f} s"
    )
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="doctor-")) if temporary else work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = diagnose(
            cfg, dev, data, count, backends, ffcv_data, ffcv_max_resolution, keep_up, sweep, tiny, setting, work, clock
        )
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    report["elapsed_s"] = round(clock.elapsed(), 1)
    say_report(report, cfg, clock)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")


def say_report(report: dict, cfg: Config, clock: Clock) -> None:
    """The report's summary on stdout: the setting, each backend alone, the sweep, compute only, the verdict."""
    click.echo("")
    click.echo(
        f"Is the {report['device_type']} starved? {report['device']}; {report['data']['images']} "
        f"{report['data']['source']} JPEGs; {cfg.method.method}, {cfg.model.arch}, {cfg.data.image_size} px, batch "
        f"{cfg.optimisation.batch_size}, amp {cfg.optimisation.amp}"
    )
    for name, row in report["backends"].items():
        shown = f"{row['images_per_sec']:9.1f} img/s loader only" if "images_per_sec" in row else "does not run"
        why = f": {row['error']}" if "error" in row else ""
        click.echo(f"  {name:11s} {shown} ({row['note']}{why})")
    for row in report["sweep"]:
        click.echo(f"  sweep: {row['loader']} --workers {row['workers']}: {row['images_per_sec']:.1f} img/s")
    click.echo(f"  compute only: {report['compute_only_images_per_sec']:.1f} img/s")
    for line in report["verdict"]["lines"]:
        click.echo(line)
    over = clock.elapsed() - clock.budget
    click.echo(
        f"took {clock.elapsed():.0f} s of a {clock.budget:.0f} s budget" + (f" ({over:.0f} s over)" if over > 0 else "")
    )


# The settings the report records.
REPORTED = ("method", "arch", "image_size", "batch_size", "amp", "bn_splits", "blur", "loader", "workers", "seed")


def diagnose(
    cfg, dev, data, count, backends, ffcv_data, ffcv_max_resolution, keep_up, sweep, tiny, setting, work, clock
) -> dict:
    """Every measurement, in budget order; returns the JSON report (without elapsed_s)."""
    try:
        folder, images, source = prepare_images(data, work, count, cfg.run.seed, tiny, clock)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    batch = cfg.optimisation.batch_size
    if len(images) < batch:
        raise click.ClickException(f"{len(images)} images cannot fill a batch of {batch}: more --images")
    data_info = data_summary(folder, images, source, clock)
    per_backend = backend_images(
        backends, images, folder, ffcv_data, ffcv_max_resolution, count, cfg, tiny, work, clock
    )
    least, most = SLICE_S[setting]
    sweep_guess = len(sweep_values(cfg.data.workers, tiny)) if sweep else 2

    def slice_s(measurements_left: int) -> float:
        return float(np.clip(clock.left() / (measurements_left + 1), least, most))

    # Loader only, each backend at --workers.
    rows: dict[str, dict] = {}
    for k, backend in enumerate(backends):
        seconds = 0.0 if isinstance(per_backend[backend], str) else slice_s(len(backends) - k + 2 + sweep_guess)
        rows[backend] = loader_alone(backend, per_backend[backend], cfg, dev, ffcv_max_resolution, clock, seconds)
    running = [b for b in backends if "error" not in rows[b]]
    if not running:
        raise click.ClickException(
            "no loader backend runs here: " + "; ".join(f"{b}: {rows[b]['error']}" for b in rows)
        )
    fastest = max(running, key=lambda b: rows[b]["images_per_sec"])
    e2e_loader = cfg.data.loader if cfg.data.loader in running else fastest
    if e2e_loader != cfg.data.loader:
        clock.say(f"--loader {cfg.data.loader} does not run here: end to end with the fastest, {fastest}")
    # Compute only and end to end, with the training loader.
    rates = training_rates(
        cfg.replace(loader=e2e_loader), per_backend[e2e_loader], dev, slice_s(2 + sweep_guess), STEPS[setting], clock
    )
    compute, e2e = rates["compute"]["images_per_sec"], rates["end_to_end"]["images_per_sec"]
    alone = rows[e2e_loader]["images_per_sec"]
    measured = [{k: r[k] for k in ("loader", "workers", "images_per_sec")} for r in rows.values() if "error" not in r]
    verdict = decide(compute, e2e, alone, measured, keep_up)
    sweep_rows, stopped = [], None
    if sweep or (sweep is None and verdict["bound"] == "loader"):
        needed = None if sweep else verdict["needed_loader_images_per_sec"]
        sweep_rows, stopped = worker_sweep(
            fastest, per_backend[fastest], cfg, dev, tiny, needed, rows, least, slice_s, clock
        )
        measured += [{k: row[k] for k in ("loader", "workers", "images_per_sec")} for row in sweep_rows]
        verdict = decide(compute, e2e, alone, measured, keep_up)
    report = {
        "device": device_name(dev),
        "device_type": "GPU" if dev.type == "cuda" else "CPU",
        "config": {k: cfg.to_dict()[k] for k in REPORTED},
        "views": loader_views(METHODS[cfg.method.method]),
        "budget_s": clock.budget,
        "data": data_info,
        "backends": rows,
        "compute_only_images_per_sec": compute,
        "compute_only": rates["compute"],
        "end_to_end": {"loader": e2e_loader, "workers": cfg.data.workers, **rates["end_to_end"]},
        "sweep": sweep_rows,
        "sweep_stopped": stopped,
        "confirmed": None,
    }
    fix = verdict["fix"]
    if fix is not None and (fix["loader"], fix["workers"]) != (e2e_loader, cfg.data.workers):
        if clock.left() > least + rows[fix["loader"]].get("first_batch_s", 0):
            images = per_backend[fix["loader"]]
            report["confirmed"] = confirm_fix(fix, images, cfg, dev, slice_s(1), STEPS[setting], compute, clock)
        else:
            report["confirmed"] = {"loader": fix["loader"], "workers": fix["workers"], "error": "budget spent"}
    report["verdict"] = verdict
    verdict["lines"] = describe(report)
    return report


def backend_images(backends, images, folder, ffcv_data, ffcv_max_resolution, count, cfg, tiny, work, clock) -> dict:
    """What each backend reads: the JPEGs, for FFCV --ffcv-data or a .beton converted from them (or, where FFCV
    does not run here, why: a string)."""
    per_backend: dict[str, ImageList | str] = {b: images for b in backends if b != "ffcv"}
    if "ffcv" in backends:
        try:
            if ffcv_data is not None:
                per_backend["ffcv"] = load_splits(ffcv_data, "ffcv", count, val_limit=1, seed=cfg.run.seed)[0]
            else:
                per_backend["ffcv"] = beton_for(images, work, folder.name, ffcv_max_resolution, tiny, clock)
        except Exception as error:  # FFCV not importing, a conversion failing: FFCV does not run here
            per_backend["ffcv"] = reason(error)
    return per_backend


def data_summary(folder: Path, images: ImageList, source: str, clock: Clock) -> dict:
    """The report's "data": where, from where, how many, mean size and bytes (said on the way)."""
    sizes = np.stack([images.widths, images.heights], axis=1)
    info = {
        "path": str(folder),
        "source": source,
        "images": len(images),
        "mean_width": float(sizes[:, 0].mean()),
        "mean_height": float(sizes[:, 1].mean()),
        "mean_bytes": float(np.mean([os.path.getsize(p) for p in images.paths])),
    }
    clock.say(
        f"data: {len(images)} {source} JPEGs, mean {info['mean_width']:.0f} x {info['mean_height']:.0f} "
        f"px, {info['mean_bytes'] / 1e3:.0f} KB"
    )
    return info


def loader_alone(backend: str, target, cfg: Config, dev, ffcv_max_resolution: int, clock: Clock, seconds: float):
    """One backend's loader-only row at --workers over `target` (its images, or why it cannot run here)."""
    if isinstance(target, str):
        row = {"loader": backend, "workers": cfg.data.workers, "error": target}
    else:
        row = loader_rate(backend, target, cfg, cfg.data.workers, dev, seconds, clock)
    if "error" in row:
        clock.say(f"backend      {backend:11s} does not run: {row['error']}")
    row["note"] = {
        "dali": f"{'mixed' if dev.type == 'cuda' else 'cpu'} decode",
        "ffcv": f".beton, max side {ffcv_max_resolution or 'kept'}, to {dev.type}",
        "torchvision": "PIL in DataLoader workers",
    }[backend]
    return row


def training_rates(cfg: Config, images, dev, seconds: float, steps: tuple, clock: Clock) -> dict:
    """`step_rates` compute only and end to end, its failures one-line errors (as train.py would stop)."""
    try:
        rates = step_rates(cfg, images, dev, seconds, steps, clock)
    except torch.OutOfMemoryError as error:
        message = f"the training step ran out of device memory ({reason(error)}): lower --batch-size"
        raise click.ClickException(message) from error
    except Exception as error:  # one line for the user, as train.py would stop
        raise click.ClickException(
            f"the training step with --loader {cfg.data.loader} failed: {reason(error)}"
        ) from error
    release(dev)
    return rates


def worker_sweep(backend, images, cfg, dev, tiny, needed, rows, least, slice_s, clock) -> tuple[list, str | None]:
    """The --workers sweep on `backend`, fewest workers first, until one reaches `needed` img/s (None: all of
    them) or the budget is spent: (its rows, why it stopped early or None)."""
    sweep_rows = []
    values = [w for w in sweep_values(cfg.data.workers, tiny) if w != cfg.data.workers]
    for k, w in enumerate(values):
        setup = rows[backend].get("first_batch_s", 0)
        if clock.left() < setup + least:
            stopped = f"budget spent before --workers {w}"
            clock.say(f"sweep stopped: {stopped}")
            return sweep_rows, stopped
        row = loader_rate(backend, images, cfg, w, dev, slice_s(len(values) - k + 1), clock)
        if "error" in row:
            stopped = f"--workers {w}: {row['error']}"
            clock.say(f"sweep stopped: {stopped}")
            return sweep_rows, stopped
        sweep_rows.append(row)
        if needed is not None and row["images_per_sec"] >= needed:
            break
    return sweep_rows, None


def confirm_fix(fix: dict, images, cfg: Config, dev, seconds: float, steps: tuple, compute: float, clock) -> dict:
    """End to end again with the verdict's fix (its loader and workers): the report's "confirmed"."""
    fixed_cfg = cfg.replace(loader=fix["loader"], workers=fix["workers"])
    try:
        confirmed = step_rates(fixed_cfg, images, dev, seconds, steps, clock, compute=False)
        release(dev)
        rate = confirmed["end_to_end"]["images_per_sec"]
        return {
            "loader": fix["loader"],
            "workers": fix["workers"],
            "images_per_sec": rate,
            "end_to_end_fraction": rate / compute,
        }
    except Exception as error:
        return {"loader": fix["loader"], "workers": fix["workers"], "error": reason(error)}


if __name__ == "__main__":
    main()
