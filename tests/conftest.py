import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device, tests marked `ffcv` only where FFCV imports;
    elsewhere they skip with the reason."""
    import torch

    from pipeline import missing_backend

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False here")
    if (reason := missing_backend("ffcv")) is not None:
        skips["ffcv"] = pytest.mark.skip(reason=reason)
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


# The loader backends as test parameters: FFCV's tests skip (with the reason) where FFCV cannot be imported.
LOADERS = ["dali", pytest.param("ffcv", marks=pytest.mark.ffcv), "torchvision"]


def write_tiny_dataset(root: Path, per_class: int = 8, classes: int = 3, seed: int = 0) -> Path:
    """ImageNet-layout JPEGs of varied sizes: each class a different colour blob on noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                image = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
                image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, c] = 230
                Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_beton(tiny_data, tmp_path_factory) -> Path:
    """`tiny_data` converted to OUT/{train,val}.beton with raw pixels, so FFCV sees exactly PIL's decode.
    Skips the test (with the reason) where FFCV cannot be imported."""
    from pipeline import missing_backend
    from pipeline.convert import convert_split

    if (reason := missing_backend("ffcv")) is not None:
        pytest.skip(reason)

    out = tmp_path_factory.mktemp("tiny-ffcv")
    for split in ("train", "val"):
        convert_split(tiny_data / split, out / f"{split}.beton", write_mode="raw", workers=1)
    return out


@pytest.fixture
def data_for(request, tiny_data):
    """backend -> the tiny data it reads: `tiny_data`, or for ffcv `tiny_beton` (made, or skipped, only then)."""
    return lambda backend: request.getfixturevalue("tiny_beton") if backend == "ffcv" else tiny_data


def tiny_loader(
    backend: str, images, train: bool = True, seed: int = 0, size: int = 16, batch: int = 8, view_count=3, **kwargs
):
    """A CPU loader for the tiny test data (torchvision in-process, the others with one worker thread); kwargs:
    `pairs`, `bad_files` and `LoaderSpec` fields."""
    import torch

    from pipeline.backends import make_loader
    from pipeline.loader import LoaderSpec

    shared = {name: kwargs.pop(name) for name in ("pairs", "bad_files") if name in kwargs}
    workers = 0 if backend == "torchvision" else 1
    spec = LoaderSpec(backend, size, batch, torch.device("cpu"), train, seed, workers, view_count, **kwargs)
    return make_loader(spec, images, **shared)


# The tiny runs' options: 16 px, batch 8, fp32 on the CPU, every image of tiny data (later options override these).
TINY_BASE = "--image-size 16 --batch-size 8 --bn-splits 2 --queue-size 32 --knn-k 5 --amp off --device cpu".split()
TINY_BASE += "--train-limit 0 --val-limit 0 --no-tensorboard".split()  # tests/test_tensorboard.py turns it on
TINY_TRAIN = [*TINY_BASE, *"--epochs 1 --workers 0 --loader torchvision".split()]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """RUN_DIR/checkpoint.pt of one LeOCLR epoch on `tiny_data` (16 px, torchvision loader)."""
    from click.testing import CliRunner

    import train

    out = tmp_path_factory.mktemp("pretrained")
    result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--data", str(tiny_data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "checkpoint.pt"


ODD_IMAGES = ("png-data.jpg", "cmyk.jpg", "gray.jpg", "tiny-16px.jpg", "huge-5000px.jpg")
BAD_IMAGES = ("truncated.jpg", "empty.jpg", "text.jpg", "dangling-link.jpg")


def write_hostile_dataset(root: Path, good_per_class: int = 6) -> Path:
    """An ImageNet-layout folder with good images, readable odd ones (`ODD_IMAGES`, in class0) and files no
    loader can decode (`BAD_IMAGES`, in class1); the val split is good images only."""
    write_tiny_dataset(root, per_class=good_per_class, classes=2)
    rng = np.random.default_rng(5)
    odd, bad = root / "train" / "class0", root / "train" / "class1"
    picture = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(picture).save(odd / "png-data.jpg", format="PNG")
    Image.fromarray(picture).convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(picture).convert("L").save(odd / "gray.jpg", quality=95)
    Image.fromarray(picture[:16, :16]).save(odd / "tiny-16px.jpg", quality=95)
    ramp = np.linspace(0, 255, 5000, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (300, 1))] * 3, axis=2)).save(odd / "huge-5000px.jpg", quality=90)
    whole = (root / "train" / "class1" / "000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image\n")
    (bad / "dangling-link.jpg").symlink_to(root / "nowhere.jpg")
    return root


def break_entropy_data(path: str) -> None:
    """Overwrite the 16 code-length counts of the first DHT segment (after FF C4, its 2-byte length and its
    class/id byte) with FF: the header and the end marker stay intact, the Huffman table does not."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"\xff\xc4")
    data[at + 5 : at + 21] = b"\xff" * 16
    Path(path).write_bytes(bytes(data))


def cut_entropy_data(path: str) -> None:
    """Cut the entropy-coded data of a JPEG in the middle and end it there (FF D9): PIL, DALI's CPU decoder and
    OpenCV decode it without an error, as garbled pixels ("Corrupt JPEG data: premature end of data segment")."""
    data = Path(path).read_bytes()
    scan = data.index(b"\xff\xda")
    Path(path).write_bytes(data[: scan + (len(data) - scan) // 2] + b"\xff\xd9")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for a test's in-process training runs, as the subprocess runs get with
    OMP_NUM_THREADS=1: a 2-core machine shared with other work runs tiny steps several times faster so."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_defaults() -> dict:
    """train.py's settings as its options default them (not --resume, --config, --overwrite or --help), by name."""
    import train

    return {p.name: p.default for p in train.main.params if p.name not in train.NOT_SETTINGS + ("help",)}


def signalled_after_first_epoch(command: list, run: Path, signal_number: int, env: dict | None = None):
    """Run `command` (train.py, or torchrun of it) from the repo root on one torch thread and send it
    `signal_number` once RUN/metrics.jsonl holds epoch 1 (its checkpoint is written; the run is in epoch 2).
    Returns the CompletedProcess (returncode, stdout, stderr) once it has exited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [str(arg) for arg in command]
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, metrics = time.time() + 300, Path(run) / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            process.send_signal(signal_number)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, out, err)
