"""A stop signal is honoured wherever it comes (issue 30): in an epoch's last steps (with 10 or fewer steps per epoch
that is every step), while the epoch's checkpoint is written, in the kNN pass, between epochs, in the first passes
before training, in ContrastiveCrop's box pass and in the last epoch's tail. Each time the run ends at once with the
usual line and a checkpoint from which a resume ends with the straight run's weights and metrics. A kill between an
epoch's checkpoint and its metrics line no longer loses that line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train
from model import evaluation
from run import boxes as run_boxes
from run import monitor as run_monitor
from run import report as run_report
from run import state as run_state
from run import step as run_step
from run import stop as run_stop

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY_TRAIN, "--epochs", "2", "--method", "mocov2"]  # 24 images in batches of 8: 3 steps per epoch


def invoke(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def epochs_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def straight_run(data: Path, out: Path, *extra) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_torch_thread: the interrupted runs below use one thread too
    try:
        result = invoke(*RUN, *extra, "--data", data, "--out", out)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return torch.load(out / "checkpoint.pt", weights_only=False)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> tuple[dict, list[dict]]:
    out = tmp_path_factory.mktemp("straight")
    return straight_run(tiny_data, out), epochs_of(out)


@pytest.fixture
def guard():
    """SIGTERM caught here when the run does not handle it (as it did not in its first passes): the test fails
    on its checks instead of pytest being terminated."""
    caught = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: caught.append(number))
    yield caught
    signal.signal(signal.SIGTERM, previous)


def signal_at(monkeypatch, module, name: str, call: int, after: bool = False) -> None:
    """SIGTERM to this process at the `call`-th call of module.name (before the call runs, or after it)."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        hit = len(calls) == call
        if hit and not after:
            os.kill(os.getpid(), signal.SIGTERM)
        result = original(*args, **kwargs)
        if hit and after:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, wrapped)


# Where the signal comes -> (the function whose call it comes in, which call, after it returns, where the run says
# its checkpoint was written, the epochs metrics.jsonl holds when it stops). Between epochs the next poll stops:
# with 3 steps per epoch, the next epoch's last step.
WHERE = {
    "mid-epoch": (run_step, "training_step", 2, True, "at epoch 1, step 2/3", [0]),  # polled every step (CHECK_EVERY 1)
    "last-step": (run_step, "training_step", 3, True, "at the end of epoch 1", [0]),
    "checkpoint-write": (run_state, "save_atomic", 1, False, "at the end of epoch 1", [0]),
    "knn-pass": (run_monitor, "extract_features", 3, False, "at the end of epoch 1 (its kNN pass cut short", [0]),
    "between-epochs": (run_report, "log_epoch", 2, True, "at the end of epoch 2", [0, 1]),
    "first-knn-pass": (run_monitor, "extract_features", 1, False, "before the first epoch", []),
    "pixel-pass": (run_monitor, "pixel_features", 2, False, "before the first epoch", []),
    "last-epoch-tail": (run_step, "training_step", 6, True, "at the end of epoch 2", [0, 1]),
}


@pytest.mark.parametrize("where", WHERE)
def test_a_signal_anywhere_stops_the_run_and_the_resume_ends_as_the_straight_run(
    tiny_data, straight, tmp_path, monkeypatch, one_torch_thread, guard, where
):
    module, name, call, after, said, logged = WHERE[where]
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_at(patch, module, name, call, after)
        if where == "mid-epoch":
            patch.setattr(run_stop, "CHECK_EVERY", 1)
        result = invoke(*RUN, "--data", tiny_data, "--out", out)
    assert not guard, "the run did not handle SIGTERM"
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    lines = [line for line in result.output.splitlines() if "SIGTERM" in line]
    assert len(lines) == 1 and lines[0].startswith(f"SIGTERM: checkpoint written {said}"), result.output
    assert lines[0].endswith(f"continue with: python train.py --resume {out / 'checkpoint.pt'}")
    assert "Traceback" not in result.output
    assert [record["epoch"] for record in epochs_of(out)] == logged
    resumed = invoke("--resume", out / "checkpoint.pt")
    assert resumed.exit_code == 0, resumed.output
    weights, records = straight
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2
    for key, tensor in weights["model"].items():
        assert torch.equal(tensor, state["model"][key]), key
    got = epochs_of(out)
    assert [r["epoch"] for r in got] == [0, 1, 2]
    assert [r["knn_top1"] for r in got] == [r["knn_top1"] for r in records]  # every epoch's kNN, once
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in records])


def test_a_signal_in_the_box_pass_stops_the_run_and_the_resume_boxes_again(
    tiny_data, tmp_path, monkeypatch, one_torch_thread, guard
):
    ccrop = ["--crop", "ccrop", "--ccrop-warmup", "1", "--ccrop-interval", "1", "--epochs", "3"]  # boxes before 2, 3
    weights = straight_run(tiny_data, tmp_path / "straight", *ccrop)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_at(patch, run_boxes, "localize", 1)
        result = invoke(*RUN, *ccrop, "--data", tiny_data, "--out", out)
    assert not guard and result.exit_code == 128 + signal.SIGTERM, result.output
    assert "SIGTERM: checkpoint written at the end of epoch 1; continue with" in result.output
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    resumed = invoke("--resume", out / "checkpoint.pt")
    assert resumed.exit_code == 0 and "boxes updated before epoch 2" in resumed.output, resumed.output
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    for key, tensor in weights["model"].items():
        assert torch.equal(tensor, state["model"][key]), key
    assert (state["boxes"] == weights["boxes"]).all()
    assert [r["epoch"] for r in epochs_of(out)] == [0, 1, 2, 3]


def test_a_kill_between_the_checkpoint_and_the_metrics_line_loses_no_line(tiny_data, straight, tmp_path):
    """kill -9 in the kNN pass after epoch 1 (its checkpoint written, its metrics line not): the resumed run
    writes epoch 1's line (with its kNN) before it trains epoch 2."""
    out = tmp_path / "run"
    patch = (
        "import os, signal\n"
        "from run import monitor\n"
        "embed, calls = monitor.extract_features, []\n"
        "def dying(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)  # epoch 1's kNN bank pass\n"
        "    return embed(*args, **kwargs)\n"
        "monitor.extract_features = dying\n"
    )
    argv = [*RUN, "--data", str(tiny_data), "--out", str(out)]
    code = f"{patch}import sys, train\nsys.argv[1:] = {argv!r}\ntrain.main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in epochs_of(out)] == [0]  # the line the kill left out
    done = subprocess.run(
        [sys.executable, "train.py", "--resume", str(out / "checkpoint.pt")], cwd=ROOT, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    got, (_, records) = epochs_of(out), straight
    assert [r["epoch"] for r in got] == [0, 1, 2]
    assert got[1]["knn_top1"] == records[1]["knn_top1"] and got[1]["loss"] == pytest.approx(records[1]["loss"])


def test_an_aborted_pass_restores_the_network_mode(tiny_data):
    """A pass cut short by `stop` leaves the network in the mode it had (training), and closes its loader epoch."""
    from conftest import tiny_loader

    from model.backbone import resnet
    from pipeline.data import scan_split

    net, _ = resnet("resnet18", 16, bn_splits=1)
    net.train()
    loader = tiny_loader("torchvision", scan_split(tiny_data / "train"), train=False)
    with pytest.raises(evaluation.Stopped):
        evaluation.extract_features(net, loader, "off", stop=lambda: True)
    assert net.training
