"""pipeline.convert never destroys what was there and never hangs: it writes OUT.partial and renames it into place
when complete; a partial file is refused as a dataset in one line; an image far longer than wide converts; a writer
process that dies ends the conversion naming the file it held."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_TRAIN, break_entropy_data, write_tiny_dataset
from PIL import Image

import train
from pipeline import convert
from pipeline.data import scan_split

pytestmark = pytest.mark.ffcv  # every test here needs FFCV: skipped (with the reason) where it cannot be imported

ROOT = Path(__file__).resolve().parents[1]


def read_beton(*args, **kwargs):
    from pipeline.backends.ffcv import read_beton

    return read_beton(*args, **kwargs)


def run_converter(args, timeout=120, patch=""):
    """python -m pipeline.convert ARGS in a fresh process (after `patch`, Python run first), killed after
    `timeout` s: a hang fails the test instead of stopping the suite."""
    argv = [str(a) for a in args]
    code = f"import sys; from pipeline import convert; {patch}\nsys.argv[1:] = {argv!r}; convert.main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout)


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "data", per_class=4, classes=2)


def test_a_failed_conversion_keeps_the_previous_file(folder, tmp_path):
    out = tmp_path / "ffcv"
    args = [str(folder), str(out), "--workers", "1"]
    assert CliRunner().invoke(convert.main, args).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("train.beton", "val.beton")}
    bad = scan_split(folder / "val").paths[1]  # the second split fails: the first split's new file is not kept
    break_entropy_data(bad)
    (folder / "train" / "class0" / "new.jpg").write_bytes((folder / "train" / "class0" / "000.jpg").read_bytes())
    result = CliRunner().invoke(convert.main, args)
    assert result.exit_code == 1 and bad in result.output and "is unchanged" in result.output, result.output
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["train.beton", "val.beton"]  # no .partial left


def test_a_killed_conversion_leaves_out_alone_and_its_partial_file_is_refused(folder, tmp_path):
    out = tmp_path / "one.beton"
    # The converter killed (SIGKILL) while its writer process stores the 5th image: as kill -9 mid-conversion.
    patch = (
        "import os, signal, time; to_rgb = convert.to_rgb; seen = []\n"
        "def dying(file):\n"
        "    seen.append(1)\n"
        "    if len(seen) == 5:\n"
        "        parent = os.getppid(); os.kill(parent, signal.SIGKILL)\n"
        "        while os.getppid() == parent: time.sleep(0.01)\n"
        "        os._exit(0)\n"
        "    return to_rgb(file)\n"
        "convert.to_rgb = dying"
    )
    done = run_converter([folder / "train", out, "--workers", "1"], patch=patch)
    assert done.returncode == -signal.SIGKILL
    partial = convert.partial_path(out)
    assert not out.exists() and partial.exists()
    with pytest.raises(ValueError) as error:
        read_beton(partial)
    assert "incomplete .beton" in str(error.value) and "\n" not in str(error.value)
    # The same bytes under a .beton name (as an older converter left them at OUT): training refuses in one line.
    shutil.copy(partial, out)
    result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--loader", "ffcv", "--data", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"Error: {out} is an incomplete .beton" in result.output and "Traceback" not in result.output
    out.unlink()
    result = CliRunner().invoke(convert.main, [str(folder / "train"), str(out), "--workers", "1"])
    assert result.exit_code == 0 and len(read_beton(out)) == 8 and not partial.exists()  # the leftover replaced


def test_an_image_far_longer_than_wide_converts(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (10, 10000, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (10000, 12, 3), dtype=np.uint8)).save(folder / "tall.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "plain.jpg")
    out = tmp_path / "wide.beton"
    done = run_converter([folder, out, "--workers", "1", "--max-resolution", "256"], timeout=90)
    assert done.returncode == 0, done.stderr
    stored = read_beton(out)
    sizes = sorted(zip(stored.heights.tolist(), stored.widths.tolist()))
    assert sizes == [(1, 256), (30, 40), (256, 1)]  # the short side kept at 1 pixel, not rounded to 0


def test_a_writer_process_that_dies_ends_the_conversion_naming_the_file(folder, tmp_path):
    out = tmp_path / "one.beton"
    out.write_bytes(b"the previous file")
    victim = scan_split(folder / "train").paths[3]
    patch = (
        "import os; to_rgb = convert.to_rgb; seen = []\n"
        "def dying(file):\n"
        "    seen.append(1)\n"
        "    if len(seen) == 4: os._exit(3)  # the 4th image this writer process took\n"
        "    return to_rgb(file)\n"
        "convert.to_rgb = dying"
    )
    done = run_converter([folder / "train", out, "--workers", "1"], patch=patch, timeout=60)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "exit code 3" in errors[0] and f"while storing {victim}" in errors[0], done.stderr
    assert out.read_bytes() == b"the previous file" and not convert.partial_path(out).exists()
