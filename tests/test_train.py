import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LOADERS, TINY_BASE
from PIL import Image

import train
from model.config import Config
from model.evaluation import pixel_features
from pipeline.backends import load_splits, make_loader
from pipeline.loader import LoaderSpec
from run import monitor as run_monitor
from run import parts as run_parts
from run import step as run_step

TINY = [*TINY_BASE, "--workers", "1"]


def run(*args):
    result = CliRunner().invoke(train.main, [*TINY, *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("method", ["leoclr", "mocov2"])
def test_one_epoch_writes_the_run_directory(data_for, tmp_path, loader, method):
    out, data = tmp_path / "run", data_for(loader)
    output = run("--loader", loader, "--method", method, "--data", data, "--out", out, "--epochs", 1)
    assert "final kNN top-1" in output
    assert "kNN monitor: a bank of 24 of the 24 training images (--knn-bank), float32 on cpu" in output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["loader"] == loader and config["device"] == "cpu"
    assert config["blur"] is False  # 16 px: the small-image recipe
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["loss"] is None and records[1]["loss"] > 0
    for r in records:
        assert set(r) >= {"epoch", "loss", "knn_top1", "images_per_sec", "lr", "epoch_time_s"}
        assert 0 <= r["knn_top1"] <= 1
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and {"model", "optimizer", "scaler", "rng", "config"} <= set(state)
    assert "queue" in state["model"] and any(k.startswith("key_encoder.") for k in state["model"])


def test_resume_gives_the_same_weights_as_a_straight_run(tiny_data, tmp_path):
    common = ["--loader", "torchvision", "--workers", 0, "--data", tiny_data]
    run(*common, "--out", tmp_path / "straight", "--epochs", 2)
    run(*common, "--out", tmp_path / "split", "--epochs", 1)
    run("--resume", tmp_path / "split" / "checkpoint.pt", "--epochs", 2)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_clear_errors(tmp_path):
    result = CliRunner().invoke(train.main, ["--data", tmp_path / "missing"])
    assert result.exit_code != 0 and "train not found" in result.output
    result = CliRunner().invoke(
        train.main, ["--batch-size", "12", "--queue-size", "1200", "--bn-splits", "8", "--data", tmp_path]
    )
    assert result.exit_code != 0 and "multiple of --bn-splits" in result.output


def test_help_documents_the_paper_recipe():
    result = CliRunner().invoke(train.main, ["--help"])
    assert result.exit_code == 0
    for flag in ("--loader", "--method", "--resume", "--queue-size", "--moco-momentum", "--train-limit"):
        assert flag in result.output


def schedule(cfg: Config, steps: int) -> list[float]:
    """The learning rate of every step of a run with `steps` steps per epoch, in order."""
    return [
        run_step.learning_rate(cfg, e, (k + 1) / steps) for e in range(cfg.optimisation.epochs) for k in range(steps)
    ]


def test_learning_rate_warms_up_then_follows_cosine():
    cfg = Config.from_dict({"lr": 0.1, "epochs": 4, "warmup_epochs": 1.0})
    assert run_step.learning_rate(cfg, 0, 0.25) == pytest.approx(0.025)
    assert run_step.learning_rate(cfg, 0, 1.0) == pytest.approx(0.1)
    # Cosine over the 3 epochs after the warm-up: at epoch 2, a third of the way.
    assert run_step.learning_rate(cfg, 2, 0.5) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 3)))
    cfg.optimisation.warmup_epochs = 0.0  # no warm-up: MoCo's cosine stepped per epoch, unchanged
    assert run_step.learning_rate(cfg, 0, 0.1) == pytest.approx(0.1)
    assert run_step.learning_rate(cfg, 3, 0.9) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


@pytest.mark.parametrize("warmup", [1.0, 2.5, 10.0, 40.0])
def test_learning_rate_has_no_jump_after_the_warmup_and_decays_to_zero(warmup):
    """No step after the warm-up's end falls by more than one epoch's cosine step (the drop there was up to
    half the rate: the epochs' cosine evaluated from 0 starts below lr), and the last epoch is near 0."""
    epochs, steps, lr = 100, 50, 0.3
    rates = schedule(Config.from_dict({"lr": lr, "epochs": epochs, "warmup_epochs": warmup}), steps)
    end = round(warmup * steps) - 1  # the warm-up's last step
    assert rates[end] == pytest.approx(lr) and max(rates) == pytest.approx(lr)
    assert rates[end + 1] == pytest.approx(lr)  # the cosine starts where the warm-up ends
    # Decreasing from there, each drop at most the largest per-epoch step of a cosine over the remaining epochs.
    largest = lr * 0.5 * math.pi / (epochs - warmup) * 1.01  # the cosine's steepest slope, times one epoch
    drops = [a - b for a, b in zip(rates[end:], rates[end + 1 :])]
    assert min(drops) >= -1e-12 and max(drops) <= largest
    assert rates[-1] < 0.003 * lr  # the last epoch: ~0
    assert all(a < b for a, b in zip(rates[:end], rates[1 : end + 1]))  # the warm-up rises every step


@pytest.mark.parametrize(
    "args, recorded",
    [
        (["--method", "simclr"], {"method": "simclr"}),
        (["--method", "leoclr-e2e"], {"method": "leoclr-e2e"}),
        (["--method", "mocov2", "--symmetric"], {"symmetric": True}),
        (["--method", "leoclr", "--attract-all"], {"attract_all": True}),
        (["--method", "leoclr", "--original", "random-crop"], {"original": "random-crop"}),
        (
            ["--method", "mocov2", "--no-color-jitter", "--no-grayscale", "--no-blur"],
            {"color_jitter": False, "grayscale": False, "blur": False},
        ),
    ],
)
def test_variants_train_and_record_their_flags(tiny_data, tmp_path, args, recorded):
    out = tmp_path / "run"
    run("--loader", "torchvision", "--workers", 0, "--data", tiny_data, "--out", out, "--epochs", 1, *args)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in recorded} == recorded
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["loss"]) and last["loss"] > 0


def test_variant_flags_only_where_they_apply(tmp_path):
    for args, message in (
        (["--method", "leoclr", "--symmetric"], "--symmetric applies to --method mocov2, sepp"),
        (["--method", "mocov2", "--attract-all"], "--attract-all applies to --method leoclr"),
        (["--method", "mocov2", "--original", "random-crop"], "has no original view"),
    ):
        result = CliRunner().invoke(train.main, [*args, "--data", tmp_path])
        assert result.exit_code != 0 and message in result.output, result.output


def test_augmentation_removal_reaches_the_augment_config():
    cfg = Config.from_dict({"color_jitter": False, "grayscale": True, "blur": False})
    config = run_parts.augment_config(cfg)
    assert config.jitter_p == 0 and config.grayscale_p == 0.2 and config.blur_p == 0


def test_knn_monitor_every_n_epochs_and_the_last_on_a_bank_subset(tiny_data, tmp_path, monkeypatch):
    banks, vote = [], run_monitor.knn_top1

    def recording(bank, *args):
        banks.append(tuple(bank.shape))
        return vote(bank, *args)

    monkeypatch.setattr(run_monitor, "knn_top1", recording)
    out = tmp_path / "run"
    output = run(
        "--loader",
        "torchvision",
        "--workers",
        0,
        "--data",
        tiny_data,
        "--out",
        out,
        "--epochs",
        3,
        "--knn-every",
        2,
        "--knn-bank",
        10,
    )
    assert "kNN monitor: a bank of 10 of the 24 training images" in output and "every 2 epoch(s)" in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn_top1"] is not None for r in records] == [True, False, True, True]  # 0, 2 and the last, 3
    # the 10 bank images' raw pixels (3 x 16 x 16) once, then their ResNet-18 features at each evaluation
    assert banks == [(10, 768)] + [(10, 512)] * 3
    config = json.loads((out / "config.json").read_text())
    assert config["knn_every"] == 2 and config["knn_bank"] == 10
    every5 = Config.from_dict({"knn_every": 5, "epochs": 12})
    assert run_monitor.knn_due(every5, 0) and run_monitor.knn_due(every5, 12)
    assert not run_monitor.knn_due(every5, 4)


def test_the_run_prints_raw_pixels_and_the_random_network_beside_its_knn(tmp_path):
    """On noise images (no class signal, so the scores are not all 100%) the printed raw-pixel kNN is a slow
    reference's on the monitor's bank and queries (k 5, T 0.1), and the random network is epoch 0's kNN."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 10), ("val", 8)):
        for c in range(3):
            (tmp_path / "noise" / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / "noise" / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "run"
    output = run("--loader", "torchvision", "--data", tmp_path / "noise", "--out", out, "--epochs", 1)
    pixels = float(re.search(r"raw pixels ([\d.]+)%, the random network ([\d.]+)% \(epoch 0\)", output)[1])
    random_network = float(re.search(r"the random network ([\d.]+)% \(epoch 0\)", output)[1])
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert random_network == pytest.approx(100 * first["knn_top1"], abs=0.005)
    assert "after 1 epoch: " in output and f"raw pixels ({pixels:.2f}%); the random network" in output
    # slow reference: every query's 5 most similar bank images (cosine on [0, 1] pixels) vote exp(sim / 0.1)
    train_images, val_images = load_splits(tmp_path / "noise", "torchvision", 0, 0, 0)
    spec = LoaderSpec("torchvision", 16, 8, torch.device("cpu"), train=False, workers=0)
    loader = lambda images: make_loader(spec, images)  # noqa: E731
    (bank, bank_labels), (queries, query_labels) = (pixel_features(loader(i)) for i in (train_images, val_images))
    assert bank.shape == (30, 3 * 16 * 16) and 0 <= bank.min() and bank.max() <= 1
    hits = 0
    for query, label in zip(queries.tolist(), query_labels.tolist(), strict=True):
        sims = [sum(a * b for a, b in zip(query, row)) / math.sqrt(sum(a * a for a in query) * sum(b * b for b in row))
                for row in bank.tolist()]  # fmt: skip
        votes = [0.0] * 3
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:5]:
            votes[bank_labels[j]] += math.exp(sims[j] / 0.1)
        hits += votes.index(max(votes)) == label
    assert pixels == pytest.approx(100 * hits / len(queries), abs=0.005)
