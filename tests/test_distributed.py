import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    """train.py under torchrun on this machine: `processes` CPU ranks (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "train.py", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("loader", ["dali", "ffcv", "torchvision"])
def test_two_cpu_processes_train_share_the_queue_and_resume(tiny_data, tiny_beton, tmp_path, loader):
    out, data = tmp_path / "run", tiny_beton if loader == "ffcv" else tiny_data
    common = [*TINY_TRAIN, "--loader", loader, "--workers", 1, "--method", "mocov2", "--data", data, "--out", out]
    if loader == "torchvision":  # ContrastiveCrop boxes from both ranks' shards, before the first epoch
        common += ["--crop", "ccrop", "--ccrop-warmup", 0]
    done = torchrun(*common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (gloo), 4 images per rank and step" in done.stdout
    assert done.stdout.count("final kNN top-1") == 1  # rank 0 alone prints and writes
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    # 24 images, global batch 8: 3 steps of 4 keys per rank; the queue (K = 32) got both ranks' 8 per step.
    assert state["config"]["world_size"] == 2 and int(state["model"]["queue_ptr"]) == 24
    if loader == "torchvision":
        boxes = np.load(out / "boxes.npy")  # every image boxed by one rank or the other
        assert boxes.shape == (24, 4) and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and 0 <= records[1]["knn_top1"] <= 1
    resumed = torchrun("--resume", out / "checkpoint.pt", "--epochs", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2] and torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_resume_needs_the_same_number_of_processes(tiny_data, tmp_path):
    out = tmp_path / "run"
    done = torchrun(*TINY_TRAIN, "--method", "mocov2", "--data", tiny_data, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    result = CliRunner().invoke(train.main, ["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert result.exit_code != 0 and "trained by 2 process(es)" in result.output


def test_global_batch_must_split_over_the_processes(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = CliRunner().invoke(train.main, [*map(str, TINY_TRAIN), "--data", str(tiny_data)])
    assert result.exit_code != 0 and "multiple of the 3 processes" in result.output
