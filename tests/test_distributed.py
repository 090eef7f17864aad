import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    LOADERS,
    TINY_TRAIN,
    break_entropy_data,
    signalled_after_first_epoch,
    tiny_loader,
    write_tiny_dataset,
)
from schedule_recorder import global_batches, recorded_epoch

import train
from pipeline.data import scan_split
from pipeline.loader import Loader
from pipeline.verify import decode_error

ROOT = Path(__file__).resolve().parents[1]


def torchrun_command(*args, processes: int = 2, script: str = "train.py") -> list[str]:
    """train.py (or `script`) under torchrun on this machine: `processes` CPU ranks (gloo; TINY_TRAIN says
    --device cpu)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        script,
        *map(str, args),
    ]


# PYTHONPATH: RECORDER, run as a file, imports train.py and this checkout's packages (not an installed copy's).
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
RECORDER = "tests/schedule_recorder.py"  # train.py with the schedule its loaders apply written down


def torchrun(
    *args, processes: int = 2, env: dict | None = None, script: str = "train.py"
) -> subprocess.CompletedProcess:
    env = {**ENV, **{k: str(v) for k, v in (env or {}).items()}}
    command = torchrun_command(*args, processes=processes, script=script)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("loader", LOADERS)
def test_two_cpu_processes_train_share_the_queue_and_resume(data_for, tmp_path, loader):
    out, data = tmp_path / "run", data_for(loader)
    common = [*TINY_TRAIN, "--loader", loader, "--workers", 1, "--method", "mocov2", "--data", data, "--out", out]
    if loader == "torchvision":  # ContrastiveCrop boxes from both ranks' shards, after one epoch (the resumed run)
        common += ["--crop", "ccrop", "--ccrop-warmup", 1, "--ccrop-interval", 1]
    done = torchrun(*common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (gloo), 4 images per rank and step" in done.stdout
    assert done.stdout.count("final kNN top-1") == 1  # rank 0 alone prints and writes
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    # 24 images, global batch 8: 3 steps of 4 keys per rank; the queue (K = 32) got both ranks' 8 per step.
    assert state["config"]["world_size"] == 2 and int(state["model"]["queue_ptr"]) == 24
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and 0 <= records[1]["knn_top1"] <= 1
    if loader != "torchvision":
        return  # resuming is the backends' common code: one resume (with ContrastiveCrop's boxes) tests it
    resumed = torchrun("--resume", out / "checkpoint.pt", "--epochs", 2, "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2] and torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2
    boxes = np.load(out / "boxes.npy")  # every image boxed by one rank or the other
    assert boxes.shape == (24, 4) and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_two_cpu_processes_refresh_forward_boxes_from_both_shards(tiny_data, tmp_path):
    """--ccrop-boxes forward under torchrun: each rank refreshes the boxes of its own shard in its steps; the epoch
    ends merge them, so every image's box is one of the last epoch's refreshes and the loader's boxes localise."""
    out = tmp_path / "run"
    crop = ["--crop", "ccrop", "--ccrop-boxes", "forward", "--ccrop-warmup", 1, "--ccrop-interval", 1]
    args = [*TINY_TRAIN, "--method", "leoclr", "--bn-splits", 1, "--epochs", 3, "--ccrop-k", 0.5, *crop]
    done = torchrun(*args, "--data", tiny_data, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    # 24 images, global batch 8: 3 steps per epoch; the last epoch's steps are 7..9, each rank's 4 images a step.
    stamps = state["forward_boxes"]["stamps"]
    assert stamps.shape == (24,) and set(stamps.tolist()) == {7, 8, 9}
    area = (state["boxes"][:, 2] - state["boxes"][:, 0]) * (state["boxes"][:, 3] - state["boxes"][:, 1])
    assert area.mean() < 1 and f"boxes updated before epoch 3: mean area {area.mean():.3f}" in done.stdout


def recorded_run(monkeypatch, record: Path, *args) -> str:
    """train.py in this process (one process) with its training schedule recorded to `record` (schedule_recorder)."""
    with monkeypatch.context() as patch:
        patch.setattr(Loader, "epoch", recorded_epoch(str(record)))
        result = CliRunner().invoke(train.main, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_two_processes_for_an_epoch_then_one_go_on_with_the_same_schedule(
    tiny_data, tmp_path, monkeypatch, one_torch_thread
):
    """--batch-size is global and the schedule too: a checkpoint of 2 processes resumed by 1 trains the same
    global batches, with the same crop windows, as a straight one-process run."""
    common = [*TINY_TRAIN, "--method", "mocov2", "--data", tiny_data]
    recorded_run(monkeypatch, tmp_path / "straight", *common, "--epochs", 2, "--out", tmp_path / "straight-run")
    out, record = tmp_path / "run", tmp_path / "run-record"
    done = torchrun(*common, "--out", out, env={"SCHEDULE_RECORD": record}, script=RECORDER)
    assert done.returncode == 0, done.stderr[-3000:]
    output = recorded_run(monkeypatch, record, "--resume", out / "checkpoint.pt", "--epochs", 2)
    assert "by 1 process(es) (the checkpoint's run had 2)" in output
    straight = global_batches(tmp_path / "straight")
    assert len(straight) == 6 and global_batches(record) == straight
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and state["config"]["world_size"] == 1 and int(state["model"]["queue_ptr"]) == 48 % 32


def test_sigusr1_mid_epoch_to_two_processes_then_one_go_on_with_the_same_schedule(
    longer_data, tmp_path, monkeypatch, one_torch_thread
):
    """SLURM's SIGUSR1 to torchrun (which forwards it when --signals-to-handle names it) stops both ranks
    mid-epoch with a checkpoint; one process goes on from that step with the straight run's batches and windows.
    A file rank 1 finds undecodable in epoch 1 is replaced alike in both runs and listed once by rank 0."""
    data = tmp_path / "data"
    shutil.copytree(longer_data / "train", data / "train")  # no val split: only the training loader reads
    paths = scan_split(data / "train").paths
    bad = paths[tiny_loader("torchvision", scan_split(data / "train")).schedule(0).order[3 * 8 + 5]]
    break_entropy_data(bad)  # global batch 4 of epoch 1, rank 1's slice
    common = [*TINY_TRAIN, "--method", "mocov2", "--data", data, "--epochs", 3]
    recorded_run(monkeypatch, tmp_path / "straight", *common, "--out", tmp_path / "straight-run")
    run, record = tmp_path / "run", tmp_path / "run-record"
    env = {"SCHEDULE_RECORD": str(record), "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    command = torchrun_command(*common, "--out", run, script=RECORDER)
    done = signalled_after_first_epoch(command, run, signal.SIGUSR1, {**ENV, **env})  # PYTHONPATH: this checkout
    out, err = done.stdout, done.stderr
    assert "SIGUSR1: checkpoint written" in out + err, err[-3000:]
    assert (out + err).count(f"undecodable {bad}: ") == 1  # rank 1 found it
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] > 0 and state["generators"].shape[0] == 2
    assert [path for path, _ in state["bad_files"]] == [bad]  # rank 0 learnt it at the next loss check
    output = recorded_run(monkeypatch, record, "--resume", run / "checkpoint.pt")
    assert "each rank's augmentation drawn from (seed, epoch, step, rank)" in output and "undecodable /" not in output
    straight = global_batches(tmp_path / "straight")
    assert len(straight) == 45 and global_batches(record) == straight
    assert (run / "bad_files.txt").read_text().splitlines() == [f"{bad}\t{decode_error(bad)}"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]


def test_global_batch_must_split_over_the_processes(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = CliRunner().invoke(train.main, [*map(str, TINY_TRAIN), "--data", str(tiny_data)])
    assert result.exit_code != 0 and "multiple of the 3 processes" in result.output


@pytest.fixture(scope="module")
def longer_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("longer"), per_class=40)  # 15 global batches of 8 per epoch


def test_two_processes_interrupted_mid_epoch_resume_each_ranks_own_draws(longer_data, tmp_path):
    """SIGTERM to torchrun mid-epoch: every rank's generator state and partial sums go into the checkpoint, and
    the resumed run ends with the straight run's weights and logs its losses (with rank 0's state on every rank,
    rank 1's augmentation and epoch sums would differ)."""
    common = [*TINY_TRAIN, "--method", "mocov2", "--data", longer_data, "--epochs", 3, "--val-limit", 6]
    done = torchrun(*common, "--out", tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    done = signalled_after_first_epoch(torchrun_command(*common, "--out", run), run, signal.SIGTERM)  # to both ranks
    out, err = done.stdout, done.stderr
    assert "SIGTERM: checkpoint written" in out + err, err[-3000:]  # (torchrun itself reports the signal)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] > 0 and state["generators"].shape[0] == 2 and state["partials"].shape == (2, 2)
    assert not torch.equal(state["generators"][0], state["generators"][1])  # each rank draws its own
    resumed = torchrun("--resume", run / "checkpoint.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    final = torch.load(run / "checkpoint.pt", weights_only=False)
    assert final["epoch"] == 3
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, final["model"][name]), name

    def losses(folder: Path) -> list:
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert losses(run) == losses(tmp_path / "straight")  # the interrupted epoch's sums included, rank by rank
