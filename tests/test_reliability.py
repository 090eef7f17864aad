import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train


def invoke(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", -1], "--batch-size"),
        (["--image-size", 0], "--image-size"),
        (["--epochs", 0], "--epochs"),
        (["--lr", 0], "--lr"),
        (["--queue-size", 100, "--batch-size", 64], "multiple of --batch-size"),
        (["--data", "missing-folder"], "train not found"),
        (["--loader", "ffcv"], "train.beton not found"),
    ],
)
def test_invalid_options_are_click_errors(tiny_data, args, message):
    data = [] if "--data" in args else ["--data", tiny_data]
    result = invoke(*data, *args)
    assert result.exit_code == 2 or result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
    assert message in result.output


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    broken, foreign = tmp_path / "broken.pt", tmp_path / "foreign.pt"
    broken.write_bytes(b"\x80\x02not a checkpoint at all")
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, message in ((broken, "cannot read"), (foreign, "not a train.py checkpoint")):
        result = invoke("--resume", path)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and message in result.output


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    step, calls = train.optimize, []

    def poisoned(*args):
        calls.append(1)
        loss = step(*args)
        return loss * float("nan") if len(calls) > 3 else loss  # from the second epoch (3 steps each) on

    monkeypatch.setattr(train, "optimize", poisoned)
    args = [*TINY_TRAIN, "--workers", 0, "--method", "mocov2", "--data", tiny_data, "--out", out, "--epochs", 2]
    result = invoke(*args)
    assert result.exit_code == 1 and "the loss became nan in epoch 2" in result.output
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1] and not list(out.glob("*.tmp"))


def test_metrics_lines_are_written_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for i in range(3):
        train.append_atomic(path, json.dumps({"epoch": i}))
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert not (tmp_path / "metrics.tmp").exists()
