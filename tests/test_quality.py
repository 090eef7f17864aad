"""benchmarks/quality.py: the sweep's tiny mode end to end (train.py runs at 16 px on a few dozen JPEGs), its
summary against the per-seed numbers, resuming an interrupted sweep, and refusing a run made otherwise."""

import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_BASE
from PIL import Image

from benchmarks import quality

TINY = [*TINY_BASE, *"--epochs 2 --workers 0 --loader torchvision".split()]


def sweep(out, data, seeds="0,1", common=TINY):
    args = ["--out", str(out), "--common", shlex.join([*common, "--data", str(data)]), "--seeds", seeds]
    args += ["--config", "leoclr=", "--config", "mocov2=--method mocov2", "--probe-epochs", "3", "--workers", "0"]
    return CliRunner().invoke(quality.main, args)


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = sweep(out, tiny_data)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_sweep_writes_runs_summary_table_and_plot(swept):
    out, output = swept
    record = json.loads((out / "results.json").read_text())
    assert set(record["runs"]) == {"leoclr", "mocov2"} and record["seeds"] == [0, 1]
    for name in ("leoclr", "mocov2"):
        runs = record["runs"][name]
        assert set(runs) == {"0", "1"}
        for metric in ("knn20", "knn200", "linear"):
            values = [runs[s][metric] for s in ("0", "1")]
            assert all(0 <= v <= 100 for v in values)
            stats = record["summary"][name][metric]
            assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(values))
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
        # the training monitor's kNN per epoch, 0 = before training, as train.py wrote it
        metrics = [json.loads(line) for line in (out / f"{name}-s0" / "metrics.jsonl").read_text().splitlines()]
        assert runs["0"]["monitor_knn"] == {str(r["epoch"]): 100 * r["knn_top1"] for r in metrics}
        assert runs["0"]["epochs"] == 2
    # the baselines are per seed (each seed draws its own subsets), scored the same way
    assert set(record["baselines"]) == {"0", "1"}
    for scores in record["baselines"].values():
        assert set(scores) == set(quality.BASELINES)
    table = (out / "results.md").read_text()
    for row in ("leoclr", "mocov2", *quality.BASELINES):
        assert f"| {row} |" in table
    assert Image.open(out / "knn.png").size == (900, 520)
    assert "leoclr seed 1: knn200" in output


def test_interrupted_sweep_resumes_without_redoing_finished_runs(swept, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(swept[0], out)
    before = json.loads((out / "results.json").read_text())
    # mocov2 seed 0 stopped after its last checkpoint (not marked done); leoclr seed 1 before its first one
    (out / "mocov2-s0" / "done.json").unlink()
    (out / "mocov2-s0" / "eval.json").unlink()
    for name in ("checkpoint.pt", "done.json", "eval.json"):
        (out / "leoclr-s1" / name).unlink()
    kept = {run: (out / run / "checkpoint.pt").stat().st_mtime_ns for run in ("leoclr-s0", "mocov2-s0", "mocov2-s1")}
    result = sweep(out, tiny_data)
    assert result.exit_code == 0, result.output
    assert "leoclr-s0: trained earlier, reused" in result.output
    # its checkpoint holds every epoch (train.py would refuse to resume it): reused, evaluated again
    assert "mocov2-s0: trained earlier (its checkpoint holds every epoch), reused" in result.output
    assert {run: (out / run / "checkpoint.pt").stat().st_mtime_ns for run in kept} == kept
    assert (out / "mocov2-s0" / "eval.json").exists()
    assert "leoclr-s1: training" in result.output
    after = json.loads((out / "results.json").read_text())
    for name in ("leoclr", "mocov2"):  # fixed seeds on the CPU in fp32: the same numbers again
        for metric in ("knn20", "knn200", "linear"):
            assert after["summary"][name][metric] == pytest.approx(before["summary"][name][metric])


def test_a_run_made_with_other_options_is_refused(swept, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(swept[0], out)
    result = sweep(out, tiny_data, seeds="0", common=[*TINY, "--lr", "0.01"])
    assert result.exit_code != 0
    assert "leoclr-s0 was trained with other options" in result.output


def test_seeds_of_one_configuration_with_other_settings_are_refused(swept, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(swept[0], out)
    config = out / "leoclr-s1" / "config.json"  # as if train.py's default lr had changed before seed 1 ran
    config.write_text(json.dumps({**json.loads(config.read_text()), "lr": 0.01}))
    result = sweep(out, tiny_data)
    assert result.exit_code != 0
    assert "leoclr-s1 ran with other settings than leoclr's first seed (lr)" in result.output


def test_queue_staleness_trains_as_train_py_and_leaves_the_model_as_it_was(tiny_data, tmp_path):
    import train
    from benchmarks import queue_staleness

    options = [*"--image-size 16 --batch-size 8 --bn-splits 2 --queue-size 32 --amp off --train-limit 0".split()]
    options += [*"--workers 0 --loader torchvision --epochs 2".split(), "--data", str(tiny_data)]
    result = CliRunner().invoke(
        queue_staleness.main, [*options, "--probe-batches", "2", "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 0, result.output
    epochs = json.loads((tmp_path / "s.json").read_text())["epochs"]
    straight = CliRunner().invoke(
        train.main,
        [*options, *"--knn-k 5 --val-limit 0 --no-tensorboard --device cpu --out".split(), str(tmp_path / "r")],
    )
    assert straight.exit_code == 0, straight.output
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][1:]
    # the probes after epoch 1 changed nothing: epoch 2 trains as train.py's does
    assert [e["loss"] for e in epochs] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert all(e["gap"] == pytest.approx(e["fresh_queue"] - e["own_queue"]) for e in epochs)
    assert "probe loss against its own queue" in result.output


def test_probe_losses_agree_when_the_fresh_queue_is_the_own_queue():
    from benchmarks import queue_staleness
    from model.config import resolve
    from model.methods import method_for
    from run.parts import build_model

    cfg = resolve({"batch_size": 8, "bn_splits": 2, "queue_size": 16, "amp": "off", "device": "cpu"})
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    views = [{v: torch.rand(8, 3, 16, 16) for v in ("original", "crop1", "crop2")}]
    own, fresh = queue_staleness.probe_losses(model, method_for("leoclr"), cfg, views, model.queue.clone())
    assert own == fresh
    other = torch.nn.functional.normalize(torch.randn_like(model.queue), dim=1)
    own_again, other_loss = queue_staleness.probe_losses(model, method_for("leoclr"), cfg, views, other)
    assert own_again == own and other_loss != own
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # state restored


def test_settings_compare_as_resolved_across_train_py_versions():
    from model.config import Config

    given = Config.from_dict({"data": "data/fashion-mnist", "knn_bank": 131072, "train_limit": 2000, "seed": 0})
    resolved = Config.from_dict(
        {"data": str(quality.ROOT / "data" / "fashion-mnist"), "knn_bank": 2000, "train_limit": 2000, "seed": 1}
    )
    assert quality.comparable_settings(given) == quality.comparable_settings(resolved)
    assert quality.comparable_settings(given) != quality.comparable_settings(given.replace(lr=0.01))
