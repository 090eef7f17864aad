"""Bad inputs to train.py and eval.py: each stops with one line on stderr before any work (no traceback, a
non-zero exit, nothing written), and a small folder trains as it stands with the sizes fitted to it and said."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import eval as evaluation
import train
from model.config import fit_to_images, resolve
from run import clock as run_clock
from run import monitor as run_monitor
from run import state as run_state

ROOT = Path(__file__).resolve().parents[1]


def shown(text: str) -> list[str]:
    """The lines a terminal shows of `text`: a progress bar that clears itself (carriage returns) leaves none."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def one_line_refusal(command, args: list, written: Path) -> str:
    """Run a click command in-process; check it stopped with one line on stderr, no traceback, a non-zero exit
    and nothing at `written`. Returns the line."""
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
    assert "Traceback" not in result.output
    lines = shown(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert not written.exists()
    return lines[0]


def without(args: list, *options: str) -> list:
    """`args` without `options` and their values."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            kept.append(arg)
    return kept


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, tiny_data) -> Path:
    """A flat folder of 20 images, fewer than the default batch of 64 (no labels)."""
    folder = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(sorted((tiny_data / "train").rglob("*.jpg"))[:20]):
        shutil.copy(path, folder / f"{i:02d}.jpg")
    return folder


@pytest.fixture(scope="module")
def one_image(tmp_path_factory, tiny_data) -> Path:
    folder = tmp_path_factory.mktemp("one")
    shutil.copy(sorted((tiny_data / "train").rglob("*.jpg"))[0], folder / "only.jpg")
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "'--lr': must be a finite number, not nan"),
        (["--lr", "inf"], "'--lr': must be a finite number, not inf"),
        (["--temperature", "nan"], "'--temperature': must be a finite number"),
        (["--moco-momentum", "nan"], "'--moco-momentum': must be a finite number"),
        (["--weight-decay", "nan"], "'--weight-decay': must be a finite number"),
        (["--epochs", "1.7"], "'--epochs': '1.7' is not a whole number"),
        (["--queue-size", "0"], "'--queue-size': 0 is not in the range x>=1"),
        (["--method", "simclr", "--batch-size", "1", "--bn-splits", "1"], "--method simclr needs 2 or more"),
        # every broken constraint at once, each with what would satisfy it
        (
            ["--batch-size", "36", "--queue-size", "1000", "--bn-splits", "8"],
            "2 settings do not fit together: --batch-size: 36 must be a multiple of --bn-splits (8): e.g. "
            "--batch-size 32 or 40, or --bn-splits 6; --queue-size: 1000 must be a multiple of --batch-size (36): "
            "e.g. --queue-size 972 or 1008",
        ),
    ],
)
def test_bad_training_options_are_one_line(tiny_data, tmp_path, args, message):
    out = tmp_path / "run"
    line = one_line_refusal(train.main, [*TINY_TRAIN, "--data", tiny_data, "--out", out, *args], out)
    assert message in line


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 1.7\n", "epochs: 1.7 is not a whole number"),
        ("epochs: true\n", "epochs: True is not a whole number"),
        ("", "holds no settings (it is empty)"),
        ("model:\n  lr: .nan\n", "lr: must be a finite number, not nan"),
    ],
)
def test_bad_settings_files_are_one_line(tiny_data, tmp_path, text, message):
    settings, out = tmp_path / "run.yaml", tmp_path / "run"
    settings.write_text(text)
    line = one_line_refusal(train.main, [*TINY_TRAIN, "--data", tiny_data, "--out", out, "--config", settings], out)
    assert message in line and str(settings) in line


def test_a_batch_larger_than_the_folder_it_was_given_for_says_what_to_pass(small_folder, tmp_path):
    out = tmp_path / "run"
    args = [*without(TINY_TRAIN, "--queue-size"), "--data", small_folder, "--out", out, "--batch-size", 64]
    line = one_line_refusal(train.main, args, out)
    assert (
        line
        == "Error: Invalid value for --batch-size: 64 is more than the 20 training images: pass --batch-size 20 or less"
    )


def test_a_folder_of_one_image_is_one_line_in_a_subprocess(one_image, tmp_path):
    """The whole command as a user types it: exit 2, no traceback, one line on stderr, no run directory."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--data", one_image, "--out", out, "--loader", "torchvision"]
    done = subprocess.run([str(a) for a in command], cwd=ROOT, capture_output=True, timeout=300)
    stderr = done.stderr.decode()  # not text=True: that reads a progress bar's carriage returns as new lines
    assert done.returncode == 2 and "Traceback" not in stderr
    assert shown(stderr) == [
        "Error: Invalid value for --data: 1 training image for 1 process(es): contrastive training needs 2 or more "
        "per process (the other images are the negatives)"
    ]
    assert not out.exists()


def test_a_file_link_loop_in_the_folder_is_named_not_a_traceback(small_folder, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(small_folder, folder)
    (folder / "a.jpg").symlink_to(folder / "b.jpg")
    (folder / "b.jpg").symlink_to(folder / "a.jpg")
    out = tmp_path / "run"
    result = CliRunner().invoke(train.main, [str(a) for a in [*TINY_TRAIN, "--data", folder, "--out", out]])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"{folder / 'a.jpg'}: unreadable (Too many levels of symbolic links)" in result.stderr
    assert not out.exists()


def test_a_small_folder_trains_with_its_sizes_fitted_and_said(small_folder, tmp_path, one_torch_thread):
    """Not given --batch-size, --queue-size or --bn-splits, a 20-image folder trains: a batch of whole BN groups
    of 2 or more images within the 20, a queue of at most the images, a multiple of the batch."""
    out = tmp_path / "run"
    args = without(TINY_TRAIN, "--batch-size", "--bn-splits", "--queue-size")
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, "--data", small_folder, "--out", out]])
    assert result.exit_code == 0, result.output
    assert "fitted to the batch and the 20 training images: --batch-size 16, --queue-size 16" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["queue_size"], config["bn_splits"]) == (16, 16, 8)


def test_a_given_batch_fits_the_queue_and_groups_not_given(small_folder, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    args = without(TINY_TRAIN, "--batch-size", "--bn-splits", "--queue-size")
    result = CliRunner().invoke(
        train.main, [str(a) for a in [*args, "--data", small_folder, "--out", out, "--batch-size", 12]]
    )
    assert result.exit_code == 0, result.output
    assert "--bn-splits 6, --queue-size 12" in result.stdout  # 1,020 (the multiple of 12 nearest 1,024) > 20
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["queue_size"], config["bn_splits"]) == (12, 12, 6)


def test_resuming_a_finished_run_says_it_is_complete(tiny_checkpoint, tmp_path):
    before = {path: path.stat().st_mtime_ns for path in tiny_checkpoint.parent.iterdir()}
    line = one_line_refusal(train.main, ["--resume", tiny_checkpoint], tmp_path / "nothing")
    assert f"{tiny_checkpoint}: the run is complete (1 of 1 epochs trained)" in line
    assert f"--resume {tiny_checkpoint} --epochs N (N > 1" in line
    assert {path: path.stat().st_mtime_ns for path in tiny_checkpoint.parent.iterdir()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["knn", "--image-size", "0"], "'--image-size': 0 is not in the range x>=8"),
        (["knn", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
        (["knn", "--k", "-3"], "'--k': -3 is not in the range x>=1"),
        (["knn", "--k", "0"], "'--k': 0 is not in the range x>=1"),
        (["knn", "--temperature", "0"], "'--temperature': 0.0 is not in the range x>0"),
        (["linear", "--epochs", "0"], "'--epochs': 0 is not in the range x>=1"),
        (["linear", "--lr", "nan"], "'--lr': must be a finite number, not nan"),
        (["knn", "--train-limit", "-5"], "'--train-limit': -5 is not in the range x>=0"),
        (["finetune", "--fraction", "0"], "'--fraction': 0.0 is not in the range 0<x<=1"),
        (["knn", "--crop-fraction", "1.5"], "'--crop-fraction': 1.5 is not in the range 0<x<=1"),
    ],
)
def test_bad_evaluation_options_are_one_line(tiny_checkpoint, tmp_path, args, message):
    out = tmp_path / "result.json"
    line = one_line_refusal(evaluation.main, [*args, "--checkpoint", tiny_checkpoint, "--json", out], out)
    assert message in line


def test_a_run_started_elsewhere_evaluates_and_resumes_from_anywhere(
    tiny_data, tmp_path, monkeypatch, one_torch_thread
):
    """Relative --data and --out are stored absolute; an older checkpoint's relative ones are rebased on load from
    where it lies (RUN_DIR/checkpoint.pt, RUN_DIR = its --out, relative to where that run started)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "mydata").symlink_to(tiny_data)
    monkeypatch.chdir(work)
    result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--data", "mydata", "--out", "runs/x"])
    assert result.exit_code == 0, result.output
    checkpoint = work / "runs" / "x" / "checkpoint.pt"
    config = json.loads((checkpoint.parent / "config.json").read_text())
    assert (config["data"], config["out"]) == (str(work / "mydata"), str(work / "runs" / "x"))
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(evaluation.main, ["knn", "--checkpoint", str(checkpoint), "--k", "5"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(train.main, ["--resume", str(checkpoint), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert not (elsewhere / "runs").exists()
    state = torch.load(checkpoint, weights_only=False)
    assert state["epoch"] == 2 and state["config"]["out"] == str(checkpoint.parent)
    # A checkpoint written before paths were stored absolute: its relative paths, from where it ran.
    torch.save({**state, "config": {**state["config"], "data": "mydata", "out": "runs/x"}}, checkpoint)
    rebased = run_state.load_checkpoint(checkpoint)["config"]
    assert (rebased["data"], rebased["out"]) == (str(work / "mydata"), str(work / "runs" / "x"))
    moved = tmp_path / "moved.pt"
    checkpoint.rename(moved)  # out of its run directory: nothing to rebase from, the paths stay as they were
    assert run_state.load_checkpoint(moved)["config"]["data"] == "mydata"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_run_clock_estimates_at_the_first_poll_and_again_past_the_start_up(monkeypatch):
    now, lines = FakeTime(), []
    monkeypatch.setattr(run_clock.time, "perf_counter", now)
    clock = run_clock.RunClock(lines.append)
    clock.start_loop()
    clock.start_epoch(0, 0)
    now.now = 10.0  # 10 steps in 10 s, a slow start among them
    clock.polled(0, 10, False, {"steps": 90, "knn": 0, "boxes": 0}, lines.append)
    assert lines == ["estimated time to the end of the run: about 1 min 30 s (90 steps at 1.00 s)"]
    now.now = 15.0  # then 10 steps in 5 s: 80 steps left at 0.5 s is 40 s, not the 80 s the first rate says
    clock.polled(0, 20, False, {"steps": 80, "knn": 0, "boxes": 0}, lines.append)
    assert (
        lines[1]
        == "estimated time to the end of the run, measured again past the start-up: about 40 s (80 steps at 0.50 s)"
    )
    now.now = 20.0
    clock.polled(0, 30, False, {"steps": 70, "knn": 0, "boxes": 0}, lines.append)
    assert len(lines) == 2  # said twice at most


def test_a_resumed_run_clock_counts_its_own_steps_and_says_nothing_with_none_left(monkeypatch):
    now, lines = FakeTime(), []
    monkeypatch.setattr(run_clock.time, "perf_counter", now)
    clock = run_clock.RunClock(lines.append)
    clock.start_loop()
    clock.start_epoch(3, 28)  # resumed at step 28 of a 31-step last epoch
    now.now = 2.0
    clock.polled(3, 30, False, {"steps": 1, "knn": 1, "boxes": 0}, lines.append)
    assert lines == ["estimated time to the end of the run: about 1 s (1 steps at 1.00 s)"]  # 2 steps in 2 s
    now.now = 0.0
    clock = run_clock.RunClock(lines.append)
    clock.start_loop()
    clock.start_epoch(3, 30)
    now.now = 3.0
    clock.polled(3, 31, True, {"steps": 0, "knn": 1, "boxes": 0}, lines.append)
    assert len(lines) == 1  # no "about 1 s (0 steps ...)" at the very end
    clock.epoch_done(0)
    assert lines[-1] == "  3 s so far"
    clock = run_clock.RunClock(lines.append)
    clock.start_loop()
    clock.start_epoch(1, 20)  # 10 of 30 steps of epoch 2 left, then epoch 3
    now.now = 13.0
    clock.polled(1, 30, True, {"steps": 30, "knn": 0, "boxes": 0}, lines.append)
    clock.epoch_done(30)
    assert lines[-1] == "  10 s so far, about 30 s left"  # 1 s per step of this process, not per epoch


def test_a_small_folder_with_val_data_monitors_on_a_bank_fitted_to_the_run(
    small_folder, tiny_data, tmp_path, monkeypatch, one_torch_thread
):
    """README: --data ~/photos --val-data data/fashion-mnist. The bank is as many images as the run trains on, at
    least 2,000 (not all 60,000 of Fashion-MNIST's train split, before training and after every epoch), and the
    monitor's cost is said where it is large (here made so)."""
    monkeypatch.setattr(run_monitor, "KNN_COST_SAID", 0.0)
    out = tmp_path / "run"
    args = [*without(TINY_TRAIN, "--batch-size", "--bn-splits", "--queue-size"), "--data", small_folder]
    result = CliRunner().invoke(train.main, [str(a) for a in [*args, "--val-data", tiny_data, "--out", out]])
    assert result.exit_code == 0, result.output
    assert f"kNN monitor: a bank of 24 of the 24 {tiny_data} train images" in result.stdout
    assert "  kNN monitor: " in result.stdout and "2 passes in this run" in result.stdout
    assert json.loads((out / "config.json").read_text())["knn_bank"] == 2000
    cfg = resolve({"device": "cpu"}, given=())
    for count, bank in ((20, 2000), (60_000, 60_000), (1_281_167, 131_072)):
        fitted = cfg.replace(knn_bank=None)
        fit_to_images(fitted, count, ())
        assert fitted.run.knn_bank == bank
    given = cfg.replace(knn_bank=0)
    fit_to_images(given, 20, ())
    assert given.run.knn_bank == 0  # given: kept (0 = every image)


PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    print("exit", done.code, "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, code",
    [
        (["train.py", "--help"], 0),
        (["train.py", "--lr", "nan"], 2),
        (["train.py", "--epochs", "1.7"], 2),
        (["eval.py", "linear", "--help"], 0),
        (["eval.py", "knn", "--k", "0", "--checkpoint", "README.md"], 2),
    ],
)
def test_help_and_option_refusals_import_no_torch(args, code):
    """click parses before torch is imported (about 6 s of a 2-core CPU's time before; README: measured)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == f"exit {code} False", done.stderr


def test_the_method_names_the_command_line_offers_are_the_methods():
    from model.methods import METHODS
    from model.options import METHOD_NAMES

    assert sorted(METHODS) == sorted(METHOD_NAMES)
