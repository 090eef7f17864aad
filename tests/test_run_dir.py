"""A run never destroys an earlier one without being asked, two runs never share a folder, a folder it cannot write
in is refused before any work, and a resume refuses what its checkpoint fixes (issue 30). Each refusal is one line,
nothing written."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train
from pipeline import backends
from run import directory as runs
from run import monitor as run_monitor

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def contents(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != runs.LOCK}


def test_the_default_out_moves_on_to_a_fresh_folder_and_says_which(tiny_data, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/<method>-<loader>, under the test's folder
    first = invoke(*TINY_TRAIN, "--data", tiny_data)
    assert first.exit_code == 0, first.output
    earlier = contents(tmp_path / "runs" / "leoclr-torchvision")
    again = invoke(*TINY_TRAIN, "--data", tiny_data, "--seed", 1)
    assert again.exit_code == 0, again.output
    default = tmp_path / "runs" / "leoclr-torchvision"  # run paths are absolute
    said = f"run directory {default}-2 ({default} holds an earlier run; --out chooses another)"
    assert said in again.output
    assert contents(tmp_path / "runs" / "leoclr-torchvision") == earlier  # untouched
    assert json.loads((tmp_path / "runs" / "leoclr-torchvision-2" / "config.json").read_text())["seed"] == 1


def test_an_out_holding_a_run_is_refused_unless_overwrite(tiny_data, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    assert invoke(*TINY_TRAIN, "--data", tiny_data, "--out", out).exit_code == 0
    (out / "notes.txt").write_text("mine")  # not a run's file: never removed
    earlier = contents(out)
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", out, "--seed", 1)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert errors(result) == [
        f"Error: --out {out} holds a run (checkpoint.pt, metrics.jsonl, config.json): continue it with --resume "
        f"{out / 'checkpoint.pt'}, replace it with --overwrite, or choose another --out"
    ]
    assert contents(out) == earlier and "train images" not in result.output  # refused before any work
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", out, "--seed", 1, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (
        f"--overwrite: removed the earlier run's checkpoint.pt, metrics.jsonl, config.json from {out}" in result.output
    )
    assert json.loads((out / "config.json").read_text())["seed"] == 1 and (out / "notes.txt").read_text() == "mine"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's run lock (as a run does for its life), until it is killed."""
    code = (
        "import sys; from pathlib import Path; from run.directory import RunLock\n"
        f"lock = RunLock(Path({str(folder)!r})); lock.acquire(); print('held', flush=True); sys.stdin.read()"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"held"
    return process


def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_does_not_block(
    tiny_data, tmp_path, monkeypatch, one_torch_thread
):
    out = tmp_path / "run"
    out.mkdir()
    other = hold_lock(out)
    try:
        result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", out)
        assert result.exit_code == 1, result.output
        assert errors(result) == [
            f"Error: {out} is in use by another run (pid {other.pid}): wait for it to end, or choose another --out"
        ]
        assert contents(out) == {}  # nothing written
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    assert (out / runs.LOCK).exists()  # left by the killed process: no longer held
    held = []
    knn = run_monitor.knn_monitor
    monkeypatch.setattr(run_monitor, "knn_monitor", lambda *args: held.append(runs.locked(out)) or knn(*args))
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", out)
    assert result.exit_code == 0, result.output
    assert held == [True, True] and not runs.locked(out)  # held while the run lives, released at its end


def test_an_out_that_cannot_be_written_is_one_line_before_any_work(tiny_data, tmp_path, monkeypatch):
    indexed = []
    monkeypatch.setattr(backends, "load_splits", lambda *args: indexed.append(args))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", blocker / "run")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert errors(result) == [f"Error: cannot create the run directory {blocker / 'run'} (Not a directory)"]
    assert not indexed


def test_a_read_only_file_system_is_one_line_before_any_work(tiny_data, tmp_path):
    """--out on a read-only mount (a bind mount remounted read-only in a user and mount namespace)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mount = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
    if subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a read-only mount")
    command = " ".join(
        [sys.executable, "train.py", *TINY_TRAIN, "--data", str(tiny_data), "--out", str(folder / "run")]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"{mount} && exec {command}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"Error: cannot create the run directory {folder / 'run'} (Read-only file system)"
    ]
    assert "train images" not in done.stdout and not list(folder.iterdir())


@pytest.fixture
def run_copy(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny one-epoch run's folder (the fixture's is shared)."""
    shutil.copytree(tiny_checkpoint.parent, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "option, value, fixes",
    [
        ("--arch", "resnet50", "the weights' shapes"),
        ("--image-size", "24", "the weights' shapes (the stem) and every crop window"),
        ("--queue-size", "64", "the queue's size"),
        ("--method", "mocov2", "what the run trains"),
    ],
)
def test_resume_refuses_what_the_checkpoint_fixes_before_writing_anything(run_copy, option, value, fixes):
    saved = torch.load(run_copy / "checkpoint.pt", weights_only=False)["config"]
    earlier = contents(run_copy)
    result = invoke("--resume", run_copy / "checkpoint.pt", option, value)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    old = saved[option[2:].replace("-", "_")]
    assert errors(result) == [
        f"Error: --resume cannot change {option} ({old} in the checkpoint, {value} given: it fixes {fixes}); start a "
        f"new run with --out, or resume without {option}"
    ]
    assert contents(run_copy) == earlier  # config.json too


def test_resume_says_what_it_changes(run_copy, one_torch_thread):
    result = invoke("--resume", run_copy / "checkpoint.pt", "--epochs", 2, "--knn-k", 3, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "resumed with changed settings: --epochs 1 -> 2, --knn-k 5 -> 3" in result.output
    config = json.loads((run_copy / "config.json").read_text())
    assert config["epochs"] == 2 and config["knn_k"] == 3
