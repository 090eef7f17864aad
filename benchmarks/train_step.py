"""End-to-end training throughput of MoCo-v2 and LeOCLR, against the same trainer fed batches already on the
device (compute only), and the LeOCLR / MoCo-v2 cost ratio beside the paper's 81 h / 68 h.

    python -m benchmarks.train_step --loader dali --json docs/train_step.json        # train.py's CPU defaults
    python -m benchmarks.train_step --loader dali --data /imagenet --arch resnet50 --image-size 224 \\
        --batch-size 256 --amp fp16 --json train_step.json                             # a GPU, the paper's setup

End to end = loader -> aug+ -> training step, as train.py runs it (MoCo-v2's loader makes 2 views, LeOCLR's
3). Compute only = the same training step on one augmented batch kept on the device. The four
configurations are timed in interleaved rounds (warm-up steps excluded in every round) so that a slow
stretch of a noisy machine hits them all; the median round counts.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import numpy as np
import torch

import train
from model.methods import METHODS
from pipeline.augment import AugmentConfig, augment
from pipeline.data import load_splits
from pipeline.loader import BACKENDS, make_loader

PAPER_HOURS = {"mocov2": 68, "leoclr": 81}  # 200 epochs of ImageNet on 3 A100s (LeOCLR paper)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


class Runner:
    """One method's model and loader; `run(steps, end_to_end)` times steps (the device synchronised)."""

    def __init__(self, cfg: dict, method: str, images, device: torch.device) -> None:
        torch.manual_seed(cfg["seed"])
        self.cfg, self.method, self.device = cfg, METHODS[method], device
        self.model, self.optimizer, self.scaler = train.build(cfg, device)
        views = train.loader_views(self.method)
        sizes = dict(image_size=cfg["image_size"], batch_size=cfg["batch_size"])
        self.loader = make_loader(cfg["loader"], images, device=device, train=True, seed=cfg["seed"],
                                  workers=cfg["workers"], views=views, **sizes)  # fmt: skip
        self.aug = AugmentConfig(blur_p=0.5 if cfg["blur"] else 0.0)
        self.generator = torch.Generator(device=device).manual_seed(cfg["seed"])
        self.batches = self._forever()
        self.fixed = self._augmented(next(self.batches))  # the compute-only batch

    def _forever(self):
        for epoch in range(1_000_000):
            yield from self.loader.epoch(epoch)

    def _augmented(self, batch) -> dict:
        return {name: augment(getattr(batch, name), self.aug, self.generator) for name in self.method.views}

    def step(self, end_to_end: bool) -> int:
        views = self._augmented(next(self.batches)) if end_to_end else self.fixed
        train.optimize(self.model, self.method, self.optimizer, self.scaler, views, self.cfg, self.generator)
        return len(views[self.method.views[0]])

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

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--loader", type=click.Choice(BACKENDS), default="dali")
@click.option("--data", type=click.Path(exists=True, path_type=Path), default=train.DEFAULT_DATA,
              help="As train.py's --data (a .beton folder or file for --loader ffcv).")  # fmt: skip
@click.option("--arch", default=None, help="[default: train.py's]")
@click.option("--image-size", type=click.IntRange(8), default=None, help="[default: train.py's]")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="[default: train.py's]")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None, help="[default: train.py's]")
@click.option("--train-limit", type=click.IntRange(0), default=None, help="Images to index. [default: train.py's]")
@click.option("--workers", type=click.IntRange(1), default=None, help="[default: train.py's]")
@click.option("--device", default="auto")
@click.option("--steps", type=click.IntRange(1), default=20, help="Timed steps per configuration and round.")
@click.option("--warmup", type=click.IntRange(0), default=3, help="Untimed steps before each timing.")
@click.option("--rounds", type=click.IntRange(1), default=3)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(loader, data, device, steps, warmup, rounds, json_path, **overrides) -> None:
    """Training images/sec per method, end to end and compute only, and the LeOCLR / MoCo-v2 ratios."""
    defaults = {p.name: p.default for p in train.main.params if p.name not in ("resume", "help")}
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = train.resolve({**defaults, **given, "loader": loader, "data": data, "device": device})
    dev = torch.device(cfg["device"])
    images, _ = load_splits(cfg["data"], loader, cfg["train_limit"], val_limit=1, seed=cfg["seed"])
    runners = {name: Runner(cfg, name, images, dev) for name in ("mocov2", "leoclr")}
    rates: dict[str, list[float]] = {f"{m}_{mode}": [] for m in runners for mode in ("e2e", "compute")}
    for r in range(rounds):
        for name, runner in runners.items():
            for mode in ("e2e", "compute"):
                rate = runner.run(steps, warmup, end_to_end=mode == "e2e")
                rates[f"{name}_{mode}"].append(round(rate, 2))
                click.echo(f"round {r + 1}/{rounds} {name:7s} {mode:8s} {rate:8.1f} img/s")
    median = {k: float(np.median(v)) for k, v in rates.items()}
    result = {
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
        "config": {k: cfg[k] for k in ("data", "arch", "image_size", "batch_size", "amp", "workers", "blur")},
    }
    for name in runners:
        fraction = median[f"{name}_e2e"] / median[f"{name}_compute"]
        result[f"{name}_end_to_end_fraction"] = fraction
        click.echo(f"{name}: end to end {median[f'{name}_e2e']:.1f} img/s = {100 * fraction:.1f}% of compute only "
                   f"{median[f'{name}_compute']:.1f} ({'meets' if fraction >= 0.9 else 'misses'} >= 90%)")  # fmt: skip
    gap = result["ratio"] / result["compute_only_ratio"] - 1
    click.echo(f"LeOCLR / MoCo-v2 epoch time: {result['ratio']:.3f} end to end, {result['compute_only_ratio']:.3f} "
               f"compute only ({100 * gap:+.1f}%: {'meets' if abs(gap) <= 0.03 else 'misses'} within 3%); "
               f"paper {result['paper_ratio']:.3f} (81 h / 68 h)")  # fmt: skip
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    for runner in runners.values():
        runner.batches.close()  # an epoch left mid-way holds FFCV's loader thread, which keeps the process alive
        runner.loader.close()


if __name__ == "__main__":
    main()
