"""DALI and FFCV are optional. Without them the suite skips what needs them (saying why) and the commands that
need them stop with one line saying how to install them. Simulated by putting packages whose import raises
ImportError first on PYTHONPATH, in fresh processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAIN

from pipeline import INSTALL, missing_backend

ROOT = Path(__file__).resolve().parents[1]


def hiding(root: Path, *libraries: str) -> dict:
    """The environment of a process in which `libraries` ("ffcv", "dali") cannot be imported."""
    for library in libraries:
        package = root / ("ffcv" if library == "ffcv" else "nvidia/dali")
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(f'raise ImportError("simulated: {library} is not installed")\n')
    if "dali" in libraries:  # the rest of the real `nvidia` package (torch's CUDA libraries) stays importable
        extend = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
        (root / "nvidia" / "__init__.py").write_text(extend)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def python(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_hiding_works(tmp_path):
    env = hiding(tmp_path, "ffcv", "dali")
    check = "from pipeline import missing_backend as m; print(m('ffcv')); print(m('dali')); import torch"
    done = python(env, "-c", check)
    assert done.returncode == 0, done.stderr
    ffcv, dali = done.stdout.splitlines()
    assert "simulated: ffcv" in ffcv and INSTALL["ffcv"] in ffcv
    assert "simulated: dali" in dali and INSTALL["dali"] in dali
    assert missing_backend("torchvision") is None


def test_suite_skips_ffcv_tests_with_the_reason_and_runs_the_rest(tmp_path):
    chosen = [
        "tests/test_ffcv.py::test_a_limit_picks_the_same_images_as_from_the_folder",
        "tests/test_loaders.py::test_training_batches_follow_the_contract",
        "tests/test_reliability.py::test_invalid_options_are_click_errors",
    ]
    done = python(
        hiding(tmp_path / "hidden", "ffcv"),
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "--basetemp",
        tmp_path / "inner",
        *chosen,
    )
    summary = done.stdout.strip().splitlines()[-1]
    # test_ffcv: 1 skipped; the contract: dali and torchvision pass, ffcv skips; the option errors: 6 + 1.
    assert done.returncode == 0 and "8 passed, 3 skipped" in summary, done.stdout[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 3 and all("pip install ffcv==1.0.2" in line for line in skipped), skipped


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The only line a failed command printed (no traceback); fails the test otherwise."""
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in lines[0], done.stdout + done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "library, command",
    [
        ("ffcv", ["train.py", "--loader", "ffcv"]),
        ("ffcv", ["-m", "pipeline.convert", "DATA", "OUT"]),
        ("dali", ["train.py", "--loader", "dali"]),
    ],
)
def test_commands_that_need_a_missing_library_stop_with_one_line(tiny_data, tmp_path, library, command):
    command = [{"DATA": tiny_data, "OUT": tmp_path / "out"}.get(part, part) for part in command]
    if command[0] == "train.py":
        command += ["--data", tiny_data, "--out", tmp_path / "run", "--device", "cpu"]
    line = one_line_error(python(hiding(tmp_path / "hidden", library), *command))
    assert line.startswith("Error: ") and INSTALL[library] in line and f"simulated: {library}" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_torchvision_training_needs_neither_library(tiny_data, tmp_path):
    done = python(
        hiding(tmp_path / "hidden", "ffcv", "dali"),
        "train.py",
        *TINY_TRAIN,
        "--data",
        tiny_data,
        "--out",
        tmp_path / "run",
        "--amp",
        "off",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final kNN top-1" in done.stdout and (tmp_path / "run" / "checkpoint.pt").is_file()
