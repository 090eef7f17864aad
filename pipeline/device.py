"""The device `--device` names, resolved in one place for train.py, eval.py, model.pairs and the benchmarks:
`auto` is CUDA where torch can use a GPU and the CPU where the machine has none. Requests that cannot run here
stop with one line saying why and what to do (click.BadParameter), never a CUDA trace later."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import torch

# The oldest Linux driver each CUDA major runs on (CUDA toolkit release notes, "minimum required driver").
MINIMUM_DRIVER = {11: 450, 12: 525, 13: 580}
PROC_DRIVER = Path("/proc/driver/nvidia")


def nvidia_driver(proc: Path = PROC_DRIVER) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), "unknown" when a driver is present but its version
    unreadable, or None when this machine shows no NVIDIA GPU (no /proc/driver/nvidia, no working nvidia-smi)."""
    try:
        found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", (proc / "version").read_text())
        return found.group(1) if found else "unknown"
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.split()[0]
    return "unknown" if proc.is_dir() else None


def unusable_gpu(driver: str) -> str:
    """Why torch cannot use the NVIDIA GPU of a machine with `driver`, and what to install (one line)."""
    build = torch.version.cuda
    if build is None:
        return (
            f"an NVIDIA GPU is here (driver {driver}) but torch {torch.__version__} is a CPU-only build: "
            "install a CUDA build of torch"
        )
    major = int(build.split(".")[0])
    needed = MINIMUM_DRIVER.get(major)
    installed = int(driver.split(".")[0]) if driver[:1].isdigit() else None
    if needed is not None and (installed is None or installed < needed):
        return (
            f"an NVIDIA GPU is here (driver {driver}) but torch {torch.__version__} is a CUDA {build} build, "
            f"which needs driver >= {needed}: install NVIDIA driver >= {needed}, or a torch build for the "
            "driver's CUDA version (nvidia-smi shows it)"
        )
    return (
        f"an NVIDIA GPU is here (driver {driver}) but torch {torch.__version__} (CUDA {build}) cannot use it: "
        "check CUDA_VISIBLE_DEVICES and that this process may open /dev/nvidia*"
    )


def resolve_device(requested: str = "auto") -> str:
    """--device -> what config.json records: "cpu", "cuda", "cuda:N" (or another torch device type as given).

    auto = CUDA when torch can use a GPU here, else the CPU, except on a machine whose NVIDIA GPU torch cannot
    use (a driver too old for torch's CUDA, a CPU-only torch): that stops with what to install, since a silent
    CPU run would be orders of magnitude slower; --device cpu trains on the CPU there. Under torchrun each
    process of a CUDA run takes one GPU of its node, so more processes per node than GPUs stop too.
    """
    hint = "--device"
    if requested == "auto":
        if not torch.cuda.is_available():
            driver = nvidia_driver()
            if driver is not None:
                raise click.BadParameter(f"{unusable_gpu(driver)}; --device cpu trains on the CPU", param_hint=hint)
            return "cpu"
        requested = "cuda"
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise click.BadParameter(f"{requested!r} is not a device (auto, cpu, cuda, cuda:N)", param_hint=hint) from error
    if device.type != "cuda":
        return requested
    if not torch.cuda.is_available():
        driver = nvidia_driver()
        why = unusable_gpu(driver) if driver is not None else "torch sees no CUDA device on this machine"
        raise click.BadParameter(f"{why}; --device cpu trains on the CPU", param_hint=hint)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise click.BadParameter(
            f"{requested}: torch sees {count} GPU(s) here (cuda:0 to cuda:{count - 1})", param_hint=hint
        )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this node
    if local > count:
        raise click.BadParameter(
            f"torchrun starts {local} processes on this node but torch sees {count} GPU(s), "
            f"one per process: use --nproc_per_node {count}, or --device cpu to train on the "
            "CPU (gloo)",
            param_hint=hint,
        )
    return requested
