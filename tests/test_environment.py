import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def requirement_pins() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def conda_pip_pins() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pins = []
    for line in lines[start + 1 :]:
        if not line.startswith("      - "):
            break
        pins.append(line.strip()[2:])
    return pins


def test_every_requirement_is_pinned():
    pins = requirement_pins()
    assert pins and all("==" in pin for pin in pins)
    names = [pin.split("==")[0] for pin in pins]
    for needed in ("torch", "torchvision", "nvidia-dali-cuda130", "ffcv", "numpy", "click"):
        assert needed in names


def test_environment_yml_carries_the_same_pins():
    assert conda_pip_pins() == requirement_pins()


def test_dali_is_built_for_torchs_cuda_major():
    """One CUDA stack per process: the DALI wheel's CUDA major (nvidia-dali-cudaXY0) is torch's build's."""
    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build: no CUDA stack to match")
    dali = next(pin for pin in requirement_pins() if pin.startswith("nvidia-dali-cuda"))
    dali_major = int(re.match(r"nvidia-dali-cuda(\d+)0==", dali).group(1))
    assert dali_major == int(torch.version.cuda.split(".")[0]), (dali, torch.version.cuda)
