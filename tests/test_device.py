"""--device resolution, with torch's CUDA check mocked: a GPU torch cannot use stops `auto` with what to install,
torchrun with more processes per node than GPUs stops with one line, and every script resolves it the same way."""

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import eval as evaluation
import train
from model import pairs
from pipeline import device as devices
from pipeline.device import nvidia_driver, resolve_device


@pytest.fixture
def machine(monkeypatch):
    """Set what this machine looks like to resolve_device: GPUs torch can use, the NVIDIA driver, torchrun's
    processes per node and torch's CUDA build."""

    def set_up(gpus: int = 0, driver: str | None = None, local_processes: int | None = None, build: str = "13.0"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(devices, "nvidia_driver", lambda: driver)
        monkeypatch.setattr(torch.version, "cuda", build)
        if local_processes is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))

    return set_up


def refused(requested: str) -> str:
    with pytest.raises(click.BadParameter) as error:
        resolve_device(requested)
    message = error.value.format_message()
    assert "\n" not in message
    return message


def test_auto_picks_cuda_where_torch_can_use_a_gpu_and_cpu_where_there_is_none(machine):
    machine(gpus=2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    machine(gpus=0, driver=None)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    assert "torch sees no CUDA device" in refused("cuda")


def test_a_gpu_torch_cannot_use_stops_auto_with_what_to_install(machine):
    machine(gpus=0, driver="535.104.05", build="13.0")  # a CUDA 13 torch on a CUDA 12 driver
    message = refused("auto")
    assert "driver 535.104.05" in message and "CUDA 13.0 build" in message and "driver >= 580" in message
    assert "a torch build for the driver's CUDA" in message and "--device cpu" in message
    assert "driver >= 580" in refused("cuda")
    assert resolve_device("cpu") == "cpu"  # the explicit way to train on the CPU there
    machine(gpus=0, driver="535.104.05", build="12.8")  # new enough for CUDA 12: something else hides the GPU
    assert "CUDA_VISIBLE_DEVICES" in refused("auto")
    machine(gpus=0, driver="580.65.06", build=None)  # a CPU-only torch
    assert "CPU-only build" in refused("auto")


def test_more_torchrun_processes_per_node_than_gpus_stop_with_one_line(machine):
    machine(gpus=1, local_processes=2)
    message = refused("auto")
    assert "torchrun starts 2 processes on this node but torch sees 1 GPU(s)" in message
    assert "--nproc_per_node 1" in message and "--device cpu" in message and "gloo" in message
    assert resolve_device("cpu") == "cpu"  # gloo on the CPU, whatever the GPUs
    machine(gpus=2, local_processes=2)
    assert resolve_device("auto") == "cuda"
    assert "cuda:0 to cuda:1" in refused("cuda:2")


def test_nonsense_is_refused(machine):
    machine(gpus=0)
    assert "not a device" in refused("gpu0")


def test_driver_version_read_from_proc(tmp_path, monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # no nvidia-smi either
    assert nvidia_driver(tmp_path / "absent") is None
    proc = tmp_path / "nvidia"
    proc.mkdir()
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)"
    (proc / "version").write_text(f"{open_module}  Tue Jul 15 2025\nGCC version:  gcc 12\n")
    assert nvidia_driver(proc) == "580.65.06"
    (proc / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023\n")
    assert nvidia_driver(proc) == "535.104.05"
    (proc / "version").unlink()
    assert nvidia_driver(proc) == "unknown"  # a driver is loaded: its version just cannot be read


def test_every_script_stops_the_same_way(machine, tiny_data, tiny_checkpoint, tmp_path):
    machine(gpus=0, driver="535.104.05")
    runs = [
        (train.main, [*TINY_TRAIN, "--device", "auto", "--data", tiny_data, "--out", tmp_path / "run"]),
        (evaluation.main, ["knn", "--checkpoint", tiny_checkpoint, "--device", "auto"]),
        (pairs.main, ["--checkpoint", tiny_checkpoint, "--device", "auto", "--out", tmp_path / "pairs.npy"]),
    ]
    for command, args in runs:
        result = CliRunner().invoke(command, [str(a) for a in args])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "driver >= 580" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "pairs.npy").exists()
