"""End-to-end training throughput of MoCo-v2 and LeOCLR, against the same trainer fed batches already on the
device (compute only), and the LeOCLR / MoCo-v2 cost ratio beside the paper's 81 h / 68 h.

    python -m benchmarks.train_step --loader dali --json docs/train_step.json        # train.py's CPU defaults
    python -m benchmarks.train_step --loader dali --data /imagenet --arch resnet50 --image-size 224 \\
        --batch-size 256 --amp fp16 --json train_step.json                             # a GPU, the paper's setup

End to end = loader -> aug+ -> training step, as train.py runs it (MoCo-v2's loader makes 2 views, LeOCLR's
3). Compute only = the same training step on one augmented batch kept on the device. The configurations
are timed in interleaved rounds (warm-up steps excluded in every round) so that a slow stretch of a noisy
machine hits them all; the median round counts.

--yardstick adds the supervised step the methods are measured against: the same torchvision ResNet (arch
and stem) with a 1000-way classifier, cross-entropy and SGD, forward + backward at the same size, batch and
precision on the same device, compute only. Forward + backward = 3 units; a LeOCLR step costs 5 (f_q
forward + backward on the original, f_k forward on both crops), MoCo-v2 4. The units are counted with
torch.utils.flop_counter (FLOPs per image of each step over a third of the yardstick's) and printed; a
method's bound is the yardstick's img/s x 3 / units, and its compute-only rate is given as a fraction of it.

--compile adds each method with `train.py --compile` (torch.compile'd encoders), compute only, beside
eager; its first warm-up step (the compile) is timed on its own.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.backbone import resnet
from model.config import Config, DataConfig, inherited, option, resolve
from model.methods import METHODS
from model.precision import autocast, describe, resolve_amp
from pipeline.backends import load_splits, make_loader
from run.parts import augment_config, build, loader_spec, loader_views
from run.step import augment_views, training_step

PAPER_HOURS = {"mocov2": 68, "leoclr": 81}  # 200 epochs of ImageNet on 3 A100s (LeOCLR paper)
CONFIG_KEYS = (
    "data",
    "arch",
    "image_size",
    "batch_size",
    "amp",
    "workers",
    "blur",
    "color_jitter",
    "grayscale",
    "bn_splits",
)
NOMINAL_UNITS = {"mocov2": 4, "leoclr": 5}  # forward = 1 unit, backward = 2, per image; the yardstick is 3


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


class Timed:
    """`run(steps, warmup, end_to_end)` times `step` (the device synchronised); `step` returns its images."""

    device: torch.device

    def step(self, end_to_end: bool) -> int:
        raise NotImplementedError

    def run(self, steps: int, warmup: int, end_to_end: bool) -> float:
        """Images/sec over `steps` steps after `warmup` untimed ones."""
        for _ in range(warmup):
            self.step(end_to_end)
        self._sync()
        count, started = 0, time.perf_counter()
        for _ in range(steps):
            count += self.step(end_to_end)
        self._sync()
        return count / (time.perf_counter() - started)

    def first_step_seconds(self) -> float:
        """One compute-only step, timed alone (for a compiled model: the compile)."""
        started = time.perf_counter()
        self.step(False)
        self._sync()
        return time.perf_counter() - started

    def flops_per_image(self) -> float:
        """FLOPs of one compute-only step (forward, backward, optimizer) per image, counted by torch."""
        with FlopCounterMode(display=False) as counter:
            images = self.step(False)
        return counter.get_total_flops() / images

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Runner(Timed):
    """One method's model and loader. A runner made `like` another shares its loader and compute-only batch
    (compute only: a second model, e.g. compiled, on the same data)."""

    def __init__(self, cfg: Config, method: str, images, device: torch.device, like: Runner | None = None) -> None:
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.method, self.device = cfg, METHODS[method], device
        self.model, self.optimizer, self.scaler = build(cfg, device)
        if like is not None:
            self.loader, self.aug, self.generator = None, like.aug, like.generator
            self.batches, self.fixed = None, like.fixed
            return
        views = loader_views(self.method)
        self.loader = make_loader(loader_spec(cfg, device).but(train=True, seed=cfg.run.seed, view_count=views), images)
        self.aug = augment_config(cfg)
        self.generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
        self.batches = self._forever()
        self.fixed = self._augmented(next(self.batches))  # the compute-only batch

    def _forever(self):
        for epoch in range(1_000_000):
            yield from self.loader.epoch(epoch)

    def _augmented(self, batch) -> dict:
        return augment_views(batch, self.method, self.aug, self.generator)[0]

    def step(self, end_to_end: bool) -> int:
        views = self._augmented(next(self.batches)) if end_to_end else self.fixed
        training_step(self.model, self.method, self.optimizer, self.scaler, views, self.cfg, self.generator)
        return len(views[self.method.views[0]])


class Yardstick(Timed):
    """Supervised training of the methods' backbone (torchvision's ResNet, same arch and stem) with a
    1000-way classifier: forward + backward + SGD on a fixed batch of random images and labels, as
    channels_last and under the same autocast as train.py's step."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.device = cfg, device
        net, dim = resnet(cfg.model.arch, cfg.data.image_size)
        net.fc = nn.Linear(dim, 1000)
        self.net = net.to(device, memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.optimisation.amp == "fp16")
        size, batch = cfg.data.image_size, cfg.optimisation.batch_size
        self.images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(1000, (batch,), device=device)

    def step(self, end_to_end: bool) -> int:
        with autocast(self.device, self.cfg.optimisation.amp):
            loss = F.cross_entropy(self.net(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return len(self.labels)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@option("loader", help=None)
@option(
    "data",
    type=click.Path(exists=True, path_type=Path),
    default=Path(DataConfig.data),
    help="As train.py's --data (a .beton folder or file for --loader ffcv).",
)
@inherited("arch", source="train.py's")
@inherited("image_size", source="train.py's")
@inherited("batch_size", source="train.py's")
@inherited("amp", source="train.py's, auto")
@inherited("bn_splits", source="train.py's")
@inherited("train_limit", "Images to index.", "train.py's")
@inherited("color_jitter", "As train.py's.", "train.py's, on")
@inherited("grayscale", "As train.py's.", "train.py's, on")
@inherited("blur", "As train.py's.", "train.py's, on when S > 64")
@option(
    "workers",
    type=click.IntRange(1),
    default=None,
    help="[default: DALI: from the machine's cores; others: train.py's]",
)
@option("device", help=None)
@click.option("--steps", type=click.IntRange(1), default=20, help="Timed steps per configuration and round.")
@click.option("--warmup", type=click.IntRange(0), default=3, help="Untimed steps before each timing.")
@click.option("--rounds", type=click.IntRange(1), default=3)
@click.option(
    "--yardstick",
    is_flag=True,
    default=False,
    help="Also time the supervised ResNet step; print each method's compute-only rate as a fraction of its bound "
    "(yardstick x 3 / FLOP-counted units).",
)
@click.option(
    "--compile",
    "compiled",
    is_flag=True,
    default=False,
    help="Also time each method compute only with train.py --compile (torch.compile'd encoders).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(loader, data, device, steps, warmup, rounds, yardstick, compiled, json_path, **overrides) -> None:
    """Training images/sec per method, end to end and compute only, and the LeOCLR / MoCo-v2 ratios."""
    given = {k: v for k, v in overrides.items() if v is not None}
    # timing_only: --bn-splits 1 in one process times plain BN as a reference (training refuses it: BN leak).
    cfg = resolve({**given, "loader": loader, "data": data, "device": device}, timing_only=True)
    dev = torch.device(cfg.run.device)
    cfg.optimisation.amp, why = resolve_amp(cfg.optimisation.amp, dev, cfg.model.arch, cfg.data.image_size)
    click.echo(describe(cfg.optimisation.amp, why))
    images, _ = load_splits(cfg.data.data, loader, cfg.data.train_limit, val_limit=1, seed=cfg.run.seed)
    runners = {name: Runner(cfg, name, images, dev) for name in ("mocov2", "leoclr")}
    timed = [(name, runner, mode) for name, runner in runners.items() for mode in ("e2e", "compute")]
    result: dict = {}
    if compiled:
        for name, runner in runners.items():
            twin = Runner(cfg.replace(compile=True), name, images, dev, like=runner)
            result[f"{name}_compile_seconds"] = twin.first_step_seconds()
            click.echo(f"{name} compiled: first step {result[f'{name}_compile_seconds']:.1f} s")
            timed.append((f"{name}_compiled", twin, "compute"))
    if yardstick:
        stick = Yardstick(cfg, dev)
        timed.append(("yardstick", stick, "compute"))
    rates: dict[str, list[float]] = {f"{name}_{mode}": [] for name, _, mode in timed}
    for r in range(rounds):
        for name, runner, mode in timed:
            rate = runner.run(steps, warmup, end_to_end=mode == "e2e")
            rates[f"{name}_{mode}"].append(round(rate, 2))
            click.echo(f"round {r + 1}/{rounds} {name:16s} {mode:8s} {rate:8.1f} img/s")
    median = {k: float(np.median(v)) for k, v in rates.items()}
    result.update(
        {
            "mocov2_images_per_sec": median["mocov2_e2e"],
            "leoclr_images_per_sec": median["leoclr_e2e"],
            "mocov2_compute_only_images_per_sec": median["mocov2_compute"],
            "leoclr_compute_only_images_per_sec": median["leoclr_compute"],
            "ratio": median["mocov2_e2e"] / median["leoclr_e2e"],  # epoch time is images / rate
            "compute_only_ratio": median["mocov2_compute"] / median["leoclr_compute"],
            "paper_ratio": PAPER_HOURS["leoclr"] / PAPER_HOURS["mocov2"],
            "device": device_name(dev),
            "loader": loader,
            "rounds": rates,
            "config": {**{k: cfg.to_dict()[k] for k in CONFIG_KEYS}, "workers": runners["leoclr"].loader.workers},
        }
    )
    for name in runners:
        fraction = median[f"{name}_e2e"] / median[f"{name}_compute"]
        result[f"{name}_end_to_end_fraction"] = fraction
        click.echo(
            f"{name}: end to end {median[f'{name}_e2e']:.1f} img/s = {100 * fraction:.1f}% of compute only "
            f"{median[f'{name}_compute']:.1f} ({'meets' if fraction >= 0.9 else 'misses'} >= 90%)"
        )
    gap = result["ratio"] / result["compute_only_ratio"] - 1
    click.echo(
        f"LeOCLR / MoCo-v2 epoch time: {result['ratio']:.3f} end to end, {result['compute_only_ratio']:.3f} "
        f"compute only ({100 * gap:+.1f}%: {'meets' if abs(gap) <= 0.03 else 'misses'} within 3%); "
        f"paper {result['paper_ratio']:.3f} (81 h / 68 h)"
    )
    if compiled:
        for name in runners:
            speedup = median[f"{name}_compiled_compute"] / median[f"{name}_compute"]
            result[f"{name}_compiled_compute_only_images_per_sec"] = median[f"{name}_compiled_compute"]
            result[f"{name}_compile_speedup"] = speedup
            click.echo(
                f"{name}: compiled {median[f'{name}_compiled_compute']:.1f} img/s compute only = "
                f"{speedup:.2f}x eager (compile {result[f'{name}_compile_seconds']:.0f} s)"
            )
    if yardstick:
        result.update(bounds(stick, runners, median["yardstick_compute"], median))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    for runner in runners.values():
        runner.batches.close()  # an epoch left mid-way holds FFCV's loader thread, which keeps the process alive
        runner.loader.close()


def bounds(stick: Yardstick, runners: dict[str, Runner], stick_rate: float, median: dict) -> dict:
    """Each method's units (FLOP-counted), bound and compute-only fraction of it; printed and returned."""
    unit = stick.flops_per_image() / 3
    cfg = stick.cfg
    click.echo(
        f"yardstick: supervised {cfg.model.arch} forward + backward, {cfg.data.image_size} px, batch "
        f"{cfg.optimisation.batch_size}, amp {cfg.optimisation.amp}: {stick_rate:.1f} img/s; "
        f"1 unit = {unit / 1e9:.3f} GFLOP per image (FlopCounterMode: the yardstick's step / 3)"
    )
    out = {"yardstick_images_per_sec": stick_rate, "unit_gflop_per_image": unit / 1e9}
    for name, runner in runners.items():
        units = runner.flops_per_image() / unit
        bound = stick_rate * 3 / units
        fraction = median[f"{name}_compute"] / bound
        out.update(
            {f"{name}_units": units, f"{name}_bound_images_per_sec": bound, f"{name}_fraction_of_bound": fraction}
        )
        click.echo(
            f"{name}: {units:.2f} units (nominal {NOMINAL_UNITS[name]}); bound {bound:.1f} img/s; compute only "
            f"{median[f'{name}_compute']:.1f} = {100 * fraction:.1f}% of it, end to end "
            f"{median[f'{name}_e2e']:.1f} = {100 * median[f'{name}_e2e'] / bound:.1f}%"
        )
    return out


if __name__ == "__main__":
    main()
