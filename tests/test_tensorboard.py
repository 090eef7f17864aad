"""TensorBoard event files of a run, read back with TensorBoard's own reader: per-poll loss, lr and img/s, per-epoch
metrics equal to metrics.jsonl, pictures of the views; off with --no-tensorboard or without the package."""

import io
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_TRAIN
from PIL import Image

import train
from run import step as run_step
from run import stop as run_stop

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = [arg for arg in TINY_TRAIN if arg != "--no-tensorboard"]  # TensorBoard's default: on where installed


def invoke(*args):
    return CliRunner().invoke(train.main, [*TINY, *map(str, args)], catch_exceptions=False)


def events(out):
    board = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def scalars(board, tag):
    return [(e.step, e.value) for e in board.Scalars(tag)]


def test_event_files_mirror_the_metrics_and_hold_pictures_of_the_views(tiny_data, tmp_path, monkeypatch):
    losses, step = [], run_step.training_step

    def recording(*args):
        loss = step(*args)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(run_step, "training_step", recording)
    monkeypatch.setattr(run_stop, "CHECK_EVERY", 2)  # polls after steps 2 and 3 of each 3-step epoch
    out = tmp_path / "run"
    args = ["--data", tiny_data, "--out", out, "--epochs", 2, "--method", "mocov2", "--crop", "ccrop"]
    result = invoke(*args, "--ccrop-warmup", 1, "--ccrop-interval", 1)
    assert result.exit_code == 0, result.output
    assert f"TensorBoard: event files in {out}" in result.output
    board, records = events(out), [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Per poll: the mean loss of the steps since the previous poll of the epoch, the lr, img/s.
    want = [np.mean(losses[0:2]), losses[2], np.mean(losses[3:5]), losses[5]]
    assert [s for s, _ in scalars(board, "train/loss")] == [2, 3, 5, 6]
    assert np.allclose([v for _, v in scalars(board, "train/loss")], want, rtol=1e-5)
    assert [v for _, v in scalars(board, "train/lr")] == pytest.approx([records[1]["lr"]] * 2 + [records[2]["lr"]] * 2)
    assert all(v > 0 for _, v in scalars(board, "train/images_per_sec"))
    # Per epoch, at the epoch's last step: metrics.jsonl's numbers.
    for name in ("knn_top1", "loss", "images_per_sec", "box_area"):
        logged = [(r["epoch"] * 3, r[name]) for r in records if r[name] is not None]
        assert [s for s, _ in scalars(board, f"epoch/{name}")] == [s for s, _ in logged], name
        assert np.allclose([v for _, v in scalars(board, f"epoch/{name}")], [v for _, v in logged], rtol=1e-6), name
    assert [s for s, _ in scalars(board, "epoch/box_area")] == [6]  # boxes from epoch 2 on (warm-up 1)
    # Pictures: before the first epoch and after the box update, 8 rows of 3 panels of 96 px.
    pictures = board.Images("views")
    assert [p.step for p in pictures] == [0, 3]
    grids = [np.asarray(Image.open(io.BytesIO(p.encoded_image_string))) for p in pictures]
    assert all(g.shape == (8 * 100, 3 * 96 + 8, 3) for g in grids)
    white = [int(np.all(g[:, :96] == 255, axis=-1).sum()) for g in grids]  # ContrastiveCrop's boxes are white
    assert white[1] > white[0]


def test_a_resumed_run_and_a_rerun_leave_one_value_per_step(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--data", tiny_data, "--out", out, "--method", "mocov2"]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    assert invoke("--resume", out / "checkpoint.pt", "--epochs", 2).exit_code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(events(out), "epoch/knn_top1")
    assert logged == [(r["epoch"] * 3, pytest.approx(r["knn_top1"])) for r in records]
    # A fresh run into the same directory: its own values only (the earlier files' events are purged).
    assert invoke(*common, "--epochs", 1, "--seed", 1, "--overwrite").exit_code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert scalars(events(out), "epoch/loss") == [(3, pytest.approx(records[1]["loss"]))]


def test_off_with_the_switch_or_without_the_package(tiny_data, tmp_path, monkeypatch):
    result = invoke("--data", tiny_data, "--out", tmp_path / "a", "--no-tensorboard")
    assert result.exit_code == 0 and "TensorBoard: off (--no-tensorboard)" in result.output
    assert not list((tmp_path / "a").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    result = invoke("--data", tiny_data, "--out", tmp_path / "b")
    assert (
        result.exit_code == 0 and "TensorBoard: off (" in result.output and "pip install tensorboard==" in result.output
    )
    assert not list((tmp_path / "b").glob("events.out.tfevents.*"))
    result = CliRunner().invoke(train.main, [*TINY, "--data", str(tiny_data), "--tensorboard"])
    assert result.exit_code == 1 and "--tensorboard: " in result.output and "pip install tensorboard==" in result.output
