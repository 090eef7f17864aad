import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    BAD_IMAGES,
    LOADERS,
    ODD_IMAGES,
    TINY_TRAIN,
    signalled_after_first_epoch,
    write_hostile_dataset,
    write_tiny_dataset,
)
from PIL import Image

import train
from pipeline import convert, missing_backend
from pipeline.backends import load_splits, make_loader
from pipeline.data import BadImage, check_image, scan_split
from pipeline.loader import LoaderSpec
from run import report as run_report
from run import state as run_state
from run import step as run_step
from run import stop as run_stop

ROOT = Path(__file__).resolve().parents[1]


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
        pytest.param(["--loader", "ffcv"], "train.beton not found", marks=pytest.mark.ffcv),
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
    step, calls = run_step.training_step, []

    def poisoned(*args):
        calls.append(1)
        loss = step(*args)
        return loss * float("nan") if len(calls) > 3 else loss  # from the second epoch (3 steps each) on

    monkeypatch.setattr(run_step, "training_step", poisoned)
    args = [*TINY_TRAIN, "--workers", 0, "--method", "mocov2", "--data", tiny_data, "--out", out, "--epochs", 2]
    result = invoke(*args)
    assert result.exit_code == 1 and "the loss became nan in epoch 2" in result.output
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1] and not list(out.glob("*.tmp"))


def test_metrics_lines_are_written_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for i in range(3):
        run_report.append_atomic(path, json.dumps({"epoch": i}))
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert not (tmp_path / "metrics.tmp").exists()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return write_hostile_dataset(tmp_path_factory.mktemp("hostile"))


def test_index_pass_names_every_bad_file_or_skips_them(hostile):
    with pytest.raises(ValueError) as error:
        scan_split(hostile / "train")
    for name in BAD_IMAGES:
        assert f"{name}: " in str(error.value)
    images = scan_split(hostile / "train", skip_bad=True)
    assert sorted(Path(p).name for p, _ in images.skipped) == sorted(BAD_IMAGES)
    kept = {Path(p).name for p in images.paths}
    assert set(ODD_IMAGES) <= kept and not set(BAD_IMAGES) & kept


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions_are_bad(tmp_path):
    path = tmp_path / "locked.jpg"
    Image.new("RGB", (8, 8)).save(path)
    path.chmod(0)
    with pytest.raises(BadImage, match="unreadable"):
        check_image(str(path))


def test_training_stops_before_the_first_step_naming_every_bad_file(hostile, tmp_path):
    result = invoke(*TINY_TRAIN, "--data", hostile, "--out", tmp_path / "run")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert all(name in result.output for name in BAD_IMAGES) and "--skip-bad" in result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def hostile_beton(hostile, tmp_path_factory) -> Path:
    if (reason := missing_backend("ffcv")) is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("hostile-ffcv")
    result = CliRunner().invoke(convert.main, [str(hostile), str(out), "--workers", "1"])
    assert result.exit_code == 1 and all(name in result.output for name in BAD_IMAGES)
    assert not list(out.glob("*.beton"))  # nothing half-written
    result = CliRunner().invoke(convert.main, [str(hostile), str(out), "--workers", "1", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert all(f"skipped {hostile / 'train' / 'class1' / name}" in result.output for name in BAD_IMAGES)
    return out


@pytest.mark.parametrize("loader", LOADERS)
def test_skip_bad_trains_and_odd_images_decode_to_rgb(hostile, request, tmp_path, loader):
    data = request.getfixturevalue("hostile_beton") if loader == "ffcv" else hostile
    result = invoke(
        *TINY_TRAIN,
        "--loader",
        loader,
        "--workers",
        1,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--skip-bad",
        "--image-size",
        32,
    )
    assert result.exit_code == 0, result.output
    if loader != "ffcv":  # the converter already left them out
        assert all(f"skipped {hostile / 'train' / 'class1' / name}" in result.output for name in BAD_IMAGES)
    images = scan_split(hostile / "train", skip_bad=True)
    split = load_splits(data, loader, skip_bad=True)[0]
    batch = next(
        iter(
            make_loader(LoaderSpec(loader, 32, len(split), torch.device("cpu"), train=False, workers=1), split).epoch(0)
        )
    )
    for i, path in enumerate(images.paths):
        if Path(path).name in ODD_IMAGES:
            with Image.open(path) as file:
                expected = np.asarray(file.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=int)
            got = batch.original[i].permute(1, 2, 0).numpy().astype(int)
            if loader == "ffcv":  # re-encoded JPEG (q 90) of noise, resized by OpenCV: compare the colours
                assert np.abs(got.mean((0, 1)) - expected.mean((0, 1))).max() < 4, Path(path).name
            else:
                assert np.abs(got - expected).mean() < 1.5, Path(path).name


INTERRUPTED = [*TINY_TRAIN, *"--epochs 3 --method mocov2".split()]


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out + err


def interrupt_after_first_epoch(run: Path, data: Path, signal_number: int) -> tuple[int, str]:
    command = [sys.executable, "train.py", *INTERRUPTED, "--data", data, "--out", run]
    done = signalled_after_first_epoch(command, run, signal_number)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def longer_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("longer"), per_class=40)  # 15 steps per epoch


@pytest.fixture(scope="module")
def straight(longer_data, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("straight")
    code, output = finish(start(*INTERRUPTED, "--data", longer_data, "--out", run))
    assert code == 0, output
    return torch.load(run / "checkpoint.pt", weights_only=False)


# SIGINT and SIGUSR1 take SIGTERM's path (test_other_stop_signals_set_the_flag_as_sigterm_does).
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_interrupted_and_resumed_ends_with_the_straight_runs_weights(
    longer_data, straight, tmp_path, signal_number
):
    run = tmp_path / "run"
    code, output = interrupt_after_first_epoch(run, longer_data, signal_number)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    if signal_number == signal.SIGKILL:
        assert code == -signal.SIGKILL and state["epoch"] >= 1 and "step" not in state  # the last whole epoch
    else:
        name = signal.Signals(signal_number).name
        assert code == 128 + signal_number and f"{name}: checkpoint written" in output, output
        assert "Traceback" not in output and state["step"] > 0
    code, output = finish(start("--resume", run / "checkpoint.pt"))
    assert code == 0, output
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert resumed["epoch"] == 3
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGUSR1])
def test_other_stop_signals_set_the_flag_as_sigterm_does(signal_number):
    """Ctrl-C and SLURM's warning ahead of the time limit (--signal=USR1@120) set the stop flag as SIGTERM does
    (the loop then stops the same way); the previous handler comes back afterwards (torchrun's forwarding of
    SIGUSR1: tests/test_distributed.py)."""
    before = signal.getsignal(signal_number)
    with run_stop.StopSignals() as signals:
        os.kill(os.getpid(), signal_number)
        assert signals.number == signal_number and signals.name == signal.Signals(signal_number).name
    assert signal.getsignal(signal_number) == before


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops(tiny_data, tmp_path, monkeypatch, one_torch_thread):
    out, save, calls = tmp_path / "run", torch.save, []

    def disk_full(state, file, *args, **kwargs):
        calls.append(file.name)
        if len(calls) == 2:  # the second epoch's checkpoint: half written, then the disk is full
            file.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    result = invoke(*TINY_TRAIN, "--method", "mocov2", "--data", tiny_data, "--out", out, "--epochs", 3)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    message = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert message == [
        f"Error: cannot write the checkpoint {out / 'checkpoint.pt'} (No space left on device); the previous "
        "checkpoint there is unchanged. Stopped."
    ]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1 and not list(out.glob("*.tmp"))
    assert len(calls) == 2  # no third epoch


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_checkpoint_into_a_read_only_folder_is_a_one_line_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    run_state.save_atomic({"epoch": 1}, folder / "checkpoint.pt")
    folder.chmod(0o555)
    try:
        with pytest.raises(run_state.CheckpointNotWritten) as error:
            run_state.save_atomic({"epoch": 2}, folder / "checkpoint.pt")
    finally:
        folder.chmod(0o755)
    assert str(folder / "checkpoint.pt") in error.value.message and "\n" not in error.value.message
    assert torch.load(folder / "checkpoint.pt")["epoch"] == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_real_failed_write_through_dev_full_is_a_one_line_error(tmp_path):
    """torch's own writer hitting a full disk (its temporary file is a link to /dev/full: ENOSPC on write)."""
    path = tmp_path / "checkpoint.pt"
    run_state.save_atomic({"epoch": 1}, path)
    (tmp_path / "checkpoint.tmp").symlink_to("/dev/full")
    with pytest.raises(run_state.CheckpointNotWritten) as error:
        run_state.save_atomic({"epoch": 2, "weights": torch.zeros(1000)}, path)
    assert error.value.message == (
        f"cannot write the checkpoint {path} (No space left on device); the previous checkpoint there is unchanged. "
        "Stopped."
    )
    assert torch.load(path)["epoch"] == 1 and not (tmp_path / "checkpoint.tmp").exists()
