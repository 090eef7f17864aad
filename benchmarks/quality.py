"""A sweep of training configurations x seeds, each checkpoint evaluated the same way, beside raw pixels and a
randomly initialised network on the same bank and queries:

    python -m benchmarks.quality --out runs/quality --seeds 0,1,2                  # LeOCLR vs MoCo-v2, default run
    python -m benchmarks.quality --out runs/q30 --seeds 0,1,2 --common "--epochs 30" \
        --config "leoclr=" --config "mocov2=--method mocov2" --config "leoclr-ccrop=--crop ccrop"

Every run is `train.py COMMON CONFIG --seed S --out OUT/NAME-sS` (same data, sizes and steps unless a
configuration overrides them). Each finished checkpoint's query backbone is then evaluated in fp32 on the
un-augmented whole images (the kNN monitor's view): the bank is the run's training subset (--train-limit,
seeded by the run's seed), the queries its val subset; weighted kNN top-1 with k 20 and k 200 (T 0.1) and a
linear probe on the cached bank features (100 epochs, scored on the queries). The same three numbers for
the baselines, per seed: raw pixels (the [0, 1] image at the training size, flattened), the same normalised
with ImageNet's mean/std, and a ResNet of the run's architecture at its random initialisation (seeded by S).

Outputs in OUT: results.json (every run and baseline, and per configuration the mean and sample standard
deviation over seeds), results.md (the table) and knn.png (the training monitor's kNN top-1 per epoch: one
line per configuration, the mean over seeds, a band from the lowest to the highest seed; dashed: the
baselines' kNN k 200). An interrupted sweep resumes: finished runs are not trained or evaluated again, a run
stopped part-way continues from its checkpoint (train.py --resume), and a run directory made with other
options, or a seed whose resolved settings (config.json) differ from its configuration's first seed's (train.py's
defaults changed between them), is refused rather than mixed in.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from model.backbone import resnet
from model.config import Config, option, read_file
from model.evaluation import extract_features, fit_linear, load_backbone, pixel_features, topk_accuracy
from model.knn import knn_top1
from pipeline.backends import load_splits, make_loader
from pipeline.loader import LoaderSpec
from run.state import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("leoclr=", "mocov2=--method mocov2")
KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.1
BASELINES = ("raw pixels", "raw pixels, normalised", "random network")


def parse_config(text: str) -> tuple[str, list[str]]:
    """'NAME=train.py options' -> (NAME, [options]); the name is a run directory's prefix."""
    name, sep, options = text.partition("=")
    name = name.strip()
    if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise click.BadParameter(f"{text!r}: give NAME=OPTIONS, NAME of letters, digits, - _ .", param_hint="--config")
    return name, shlex.split(options)


def train_run(out: Path, name: str, seed: int, argv: list[str], echo) -> dict:
    """Train (or resume, or reuse) one run in OUT/NAME-sSEED; returns {"dir", "wall_s", "reused"}. The run's
    argv is kept in sweep.json: a directory made with other options raises ClickException."""
    run = out / f"{name}-s{seed}"
    spec = {"config": name, "seed": seed, "argv": argv}
    spec_path, done_path, wall_path = run / "sweep.json", run / "done.json", run / "wall_s.txt"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        raise click.ClickException(
            f"{run} was trained with other options ({spec_path}); use another --out or remove it"
        )
    if done_path.exists():
        echo(f"{run.name}: trained earlier, reused")
        return {"dir": run, "wall_s": json.loads(done_path.read_text())["wall_s"], "reused": True}
    run.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec) + "\n")
    checkpoint = run / "checkpoint.pt"
    command = [sys.executable, str(ROOT / "train.py")]
    command += ["--resume", str(checkpoint)] if checkpoint.exists() else [*argv, "--out", str(run)]
    if not checkpoint.exists() and any(run.glob("*.json*")):  # a try stopped before its first checkpoint
        command.append("--overwrite")  # the sweep's own directory (sweep.json matched): start it again
    if checkpoint.exists() and trained_out(checkpoint):  # stopped after its last epoch, before done.json
        echo(f"{run.name}: trained earlier (its checkpoint holds every epoch), reused")
        wall = float(wall_path.read_text()) if wall_path.exists() else 0.0
        done_path.write_text(json.dumps({"wall_s": round(wall, 1)}) + "\n")
        return {"dir": run, "wall_s": round(wall, 1), "reused": True}
    echo(f"{run.name}: {'resuming' if checkpoint.exists() else 'training'}: python {shlex.join(command[1:])}")
    spent = float(wall_path.read_text()) if wall_path.exists() else 0.0  # the interrupted tries' time
    started = time.perf_counter()
    with open(run / "train.log", "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = spent + time.perf_counter() - started
    wall_path.write_text(f"{wall:.1f}\n")
    if result.returncode:
        tail = (run / "train.log").read_text().splitlines()[-1:] or [""]
        raise click.ClickException(
            f"{run.name}: train.py failed (exit {result.returncode}): {tail[0]} ({run}/train.log)"
        )
    done_path.write_text(json.dumps({"wall_s": round(wall, 1)}) + "\n")
    return {"dir": run, "wall_s": round(wall, 1), "reused": False}


def trained_out(checkpoint: Path) -> bool:
    """Whether train.py's CHECKPOINT holds every epoch its run asked for (train.py refuses to resume it)."""
    state = load_checkpoint(checkpoint)
    return state.get("epoch", 0) >= state["config"]["epochs"] and not state.get("step")


class Evaluation:
    """The bank (a run's training subset) and queries (its val subset) of one data setting, as un-augmented
    whole images, and the scores of features on them."""

    def __init__(self, cfg: Config, probe_epochs: int, workers: int | None) -> None:
        data = cfg.data
        self.cfg, self.probe_epochs = cfg, probe_epochs
        train, val = load_splits(data.data, data.loader, data.train_limit, data.val_limit, cfg.run.seed)
        if val is None or not (train.labelled and val.labelled):
            raise click.ClickException(f"{data.data}: the sweep scores on labelled train and val splits")
        self.classes = len(train.classes)
        spec = LoaderSpec(data.loader, data.image_size, 256, torch.device("cpu"), False, cfg.run.seed, workers)
        self.loaders = [make_loader(spec, images) for images in (train, val)]

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()

    def pixels(self, normalised: bool) -> tuple[torch.Tensor, ...]:
        """(bank, bank labels, queries, query labels): the views' pixels flattened, in [0, 1] or normalised."""
        return tuple(t for loader in self.loaders for t in pixel_features(loader, normalised))

    def network(self, net: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """(bank, bank labels, queries, query labels): `net`'s features in fp32, eval mode."""
        net = net.to(memory_format=torch.channels_last)
        return tuple(t for loader in self.loaders for t in extract_features(net, loader, "off"))

    def scores(self, features: tuple[torch.Tensor, ...]) -> dict:
        """kNN top-1 (%) for each k of KNN_KS and the linear probe's top-1 (%) on the queries."""
        bank, bank_labels, queries, query_labels = features
        result = {
            f"knn{k}": 100 * knn_top1(bank, bank_labels, queries, query_labels, self.classes, k, KNN_TEMPERATURE)
            for k in KNN_KS
        }
        probe = fit_linear(bank, bank_labels, self.classes, self.probe_epochs, 0.1, 256, seed=self.cfg.run.seed)
        with torch.no_grad():
            result["linear"] = topk_accuracy(probe(queries), query_labels, (1,))[0]
        return result


def data_key(cfg: Config) -> dict:
    """What decides a run's bank and queries (baselines are shared by the runs with the same key)."""
    d = cfg.data
    return dict(
        data=d.data, loader=d.loader, image_size=d.image_size, train_limit=d.train_limit, val_limit=d.val_limit,
        seed=cfg.run.seed, arch=cfg.model.arch,
    )  # fmt: skip


def comparable_settings(cfg: Config) -> dict:
    """A run's settings as compared across the seeds of a configuration: seed and out aside, the data folder as a
    resolved path and the kNN bank as the number of images it holds (train.py versions record these as given or
    as resolved)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "out")}
    settings["data"] = str((ROOT / settings["data"]).resolve())
    limits = [n for n in (settings["knn_bank"], settings["train_limit"]) if n]
    settings["knn_bank"] = min(limits) if limits else 0
    return settings


def evaluate_run(run: Path, evaluation: Evaluation) -> dict:
    """The run's final checkpoint scored (cached in RUN/eval.json), with its monitor's kNN per epoch."""
    cached = run / "eval.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        for curve in ("monitor_knn", "loss"):  # JSON's keys are strings
            result[curve] = {int(e): v for e, v in result[curve].items()}
        return result
    state = load_checkpoint(run / "checkpoint.pt")
    net, _ = load_backbone(state)
    result = evaluation.scores(evaluation.network(net))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["epochs"] = state["epoch"]
    result["monitor_knn"] = {int(r["epoch"]): None if r["knn_top1"] is None else 100 * r["knn_top1"] for r in records}
    result["loss"] = {int(r["epoch"]): r["loss"] for r in records if r["loss"] is not None}
    cached.write_text(json.dumps(result) + "\n")
    return result


def evaluate_baselines(out: Path, cfg: Config, evaluation: Evaluation) -> dict:
    """Raw pixels, normalised pixels and the random network on the bank and queries of `cfg` (cached by data
    setting in OUT/baselines.json)."""
    path = out / "baselines.json"
    known = json.loads(path.read_text()) if path.exists() else []
    key = data_key(cfg)
    for entry in known:
        if entry["key"] == key:
            return entry["scores"]
    torch.manual_seed(cfg.run.seed)
    net, _ = resnet(cfg.model.arch, cfg.data.image_size)
    scores = {
        "raw pixels": evaluation.scores(evaluation.pixels(normalised=False)),
        "raw pixels, normalised": evaluation.scores(evaluation.pixels(normalised=True)),
        "random network": evaluation.scores(evaluation.network(net)),
    }
    path.write_text(json.dumps([*known, {"key": key, "scores": scores}], indent=1) + "\n")
    return scores


def mean_spread(values: list[float]) -> dict:
    """{"mean", "std" (sample, 0 for one value), "min", "max", "n"} of the seeds' values."""
    a = np.asarray(values, dtype=float)
    return dict(mean=a.mean(), std=a.std(ddof=1) if len(a) > 1 else 0.0, min=a.min(), max=a.max(), n=len(a))


def summarise(runs: dict, baselines: dict) -> dict:
    """Per configuration and per baseline: mean_spread over seeds of each score, the monitor's kNN per epoch
    (mean, min, max over seeds), epochs and wall time."""
    summary = {}
    for name, seeds in runs.items():
        entry = {m: mean_spread([r[m] for r in seeds.values()]) for m in ("knn20", "knn200", "linear")}
        epochs = sorted(set.intersection(*(set(r["monitor_knn"]) for r in seeds.values())))
        curve = {e: [r["monitor_knn"][e] for r in seeds.values()] for e in epochs}
        entry["monitor_knn"] = {
            e: dict(mean=float(np.mean(v)), min=min(v), max=max(v)) for e, v in curve.items() if None not in v
        }
        entry["epochs"] = sorted({r["epochs"] for r in seeds.values()})
        entry["wall_s"] = mean_spread([r["wall_s"] for r in seeds.values()])
        summary[name] = entry
    for name in BASELINES:
        per_seed = [b[name] for b in baselines.values()]
        summary[name] = {m: mean_spread([s[m] for s in per_seed]) for m in ("knn20", "knn200", "linear")}
    return summary


def table(summary: dict, seeds: list[int]) -> str:
    """The markdown table: mean +- sample std over the seeds (n in the header), epochs and wall time."""

    def cell(stats: dict) -> str:
        return f"{stats['mean']:.1f} ± {stats['std']:.1f}"

    lines = [
        "| run | kNN k200 | kNN k20 | linear probe | epochs | wall time per run |",
        "|---|---|---|---|---|---|",
    ]
    lines[0] = lines[0].replace("run |", f"run ({len(seeds)} seeds: {', '.join(map(str, seeds))}) |", 1)
    for name, entry in summary.items():
        baseline = name in BASELINES
        epochs = "-" if baseline else "/".join(map(str, entry["epochs"]))
        wall = "-" if baseline else f"{entry['wall_s']['mean'] / 60:.1f} min"
        scores = " | ".join(cell(entry[m]) for m in ("knn200", "knn20", "linear"))
        lines.append(f"| {name} | {scores} | {epochs} | {wall} |")
    lines.append("")
    lines.append(
        f"Top-1 (%) on the val subset, mean ± sample standard deviation over the seeds; kNN weighted (T "
        f"{KNN_TEMPERATURE}) on the un-augmented training subset as the bank; the linear probe on its cached "
        "features; features in fp32."
    )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """kNN top-1 per epoch of every configuration (mean line, min-max band over seeds), baselines dashed."""
    from PIL import Image, ImageDraw

    curves = {n: e["monitor_knn"] for n, e in summary.items() if n not in BASELINES and e["monitor_knn"]}
    flat = [v for c in curves.values() for s in c.values() for v in (s["min"], s["max"])]
    flat += [summary[b]["knn200"]["mean"] for b in BASELINES]
    if not curves:
        return
    low, high = np.floor(min(flat) - 1), np.ceil(max(flat) + 1)
    last = max(max(c) for c in curves.values())
    width, height, left, top, right, bottom = 900, 520, 60, 40, 230, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x = lambda e: left + (width - left - right) * e / max(1, last)  # noqa: E731
    y = lambda v: top + (height - top - bottom) * (high - v) / (high - low)  # noqa: E731
    draw.text((10, 10), title, fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for v in np.linspace(low, high, 6):
        draw.text((8, y(v) - 6), f"{v:.1f}", fill="black")
    for e in sorted({e for c in curves.values() for e in c}):
        draw.text((x(e) - 4, height - bottom + 6), str(e), fill="black")
    draw.text((width // 2 - 100, height - 16), "epoch (0 = before training); kNN k200 top-1 %", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    bands = Image.new("RGBA", image.size, (0, 0, 0, 0))
    band_draw = ImageDraw.Draw(bands)
    legend = 0
    for i, (name, curve) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        epochs = sorted(curve)
        upper = [(x(e), y(curve[e]["max"])) for e in epochs]
        lower = [(x(e), y(curve[e]["min"])) for e in reversed(epochs)]
        rgb = tuple(int(colour[j : j + 2], 16) for j in (1, 3, 5))
        if len(epochs) > 1:
            band_draw.polygon(upper + lower, fill=(*rgb, 60))
        draw.line([(x(e), y(curve[e]["mean"])) for e in epochs], fill=colour, width=2)
        draw.text((width - right + 10, top + 16 * legend), name, fill=colour)
        legend += 1
    image.paste(bands, (0, 0), bands)
    for j, name in enumerate(BASELINES):
        v = summary[name]["knn200"]["mean"]
        grey = ["#555555", "#999999", "#bbbb00"][j]
        for start in range(left, width - right, 12):
            draw.line((start, y(v), min(start + 6, width - right), y(v)), fill=grey, width=1)
        draw.text((width - right + 10, top + 16 * (legend + j)), f"{name} ({v:.1f})", fill=grey)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The sweep's folder.")
@click.option(
    "--config",
    "configs",
    multiple=True,
    default=DEFAULT_CONFIGS,
    help="A configuration: NAME=train.py options (repeat the option for each; '' after = is train.py's defaults).",
)
@click.option("--common", default="", help="train.py options shared by every configuration (before its own).")
@click.option("--seeds", default="0,1,2", help="Comma-separated seeds: each configuration trains once per seed.")
@click.option("--probe-epochs", type=click.IntRange(min=1), default=100, help="Linear probe epochs (cached features).")
@option("workers", help="Evaluation loader workers.")
def main(out: Path, configs: tuple[str, ...], common: str, seeds: str, probe_epochs: int, workers: int | None):
    """Train every configuration at every seed with train.py, score each final checkpoint the same way (kNN k 20
    and k 200, linear probe on cached features) beside raw pixels and a random network, and write OUT/results.json,
    OUT/results.md and OUT/knn.png. Run it again to resume an interrupted sweep."""
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: comma-separated integers", param_hint="--seeds") from None
    parsed = dict(parse_config(c) for c in configs)
    if len(parsed) != len(configs):
        raise click.BadParameter("two configurations share a name", param_hint="--config")
    out.mkdir(parents=True, exist_ok=True)
    shared = shlex.split(common)
    runs: dict[str, dict[int, dict]] = {name: {} for name in parsed}
    baselines: dict[int, dict] = {}
    evaluations: dict[str, Evaluation] = {}
    settings: dict[str, dict] = {}  # each configuration's resolved train.py settings, seed and out aside
    try:
        for seed in seed_list:  # seed-major: an interrupted sweep has every configuration at the early seeds
            for name, options in parsed.items():
                argv = [*shared, *options, "--seed", str(seed)]
                trained = train_run(out, name, seed, argv, click.echo)
                cfg = Config.from_dict(read_file(trained["dir"] / "config.json"))
                settled = comparable_settings(cfg)
                if settings.setdefault(name, settled) != settled:  # e.g. train.py's defaults changed in between
                    changed = sorted(k for k in settled if settled[k] != settings[name].get(k))
                    raise click.ClickException(
                        f"{trained['dir']} ran with other settings than {name}'s first seed ({', '.join(changed)}): "
                        "give those options in --config, or another --out"
                    )
                key = json.dumps(data_key(cfg), sort_keys=True)
                if key not in evaluations:
                    evaluations[key] = Evaluation(cfg, probe_epochs, workers)
                result = evaluate_run(trained["dir"], evaluations[key])
                runs[name][seed] = {**result, "wall_s": trained["wall_s"]}
                baselines.setdefault(seed, evaluate_baselines(out, cfg, evaluations[key]))
                shown = ", ".join(f"{m} {result[m]:.1f}" for m in ("knn200", "knn20", "linear"))
                click.echo(f"{name} seed {seed}: {shown} ({trained['wall_s'] / 60:.1f} min)")
    finally:
        for evaluation in evaluations.values():
            evaluation.close()
    summary = summarise(runs, baselines)
    record = {
        "common": shared,
        "configs": {n: o for n, o in parsed.items()},
        "seeds": seed_list,
        "runs": runs,
        "baselines": baselines,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    markdown = table(summary, seed_list)
    (out / "results.md").write_text(markdown)
    plot(summary, out / "knn.png", f"kNN monitor, {', '.join(parsed)}; common: {common or 'defaults'}")
    click.echo(markdown)


if __name__ == "__main__":
    main()
