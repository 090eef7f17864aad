import gzip

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.data import scan_split
from pipeline.fashion_mnist import CLASSES, main, read_idx


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_source(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_read_idx_round_trip(idx_source):
    images = read_idx(idx_source / "train-images-idx3-ubyte.gz")
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert read_idx(idx_source / "train-labels-idx1-ubyte.gz").tolist() == [i % 10 for i in range(12)]


def test_writes_imagenet_layout(idx_source, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(out), "--source", str(idx_source)])
    assert result.exit_code == 0, result.output
    train, val = scan_split(out / "train"), scan_split(out / "val")
    assert len(train) == 12 and len(val) == 5 and train.classes == sorted(CLASSES)
    assert (train.heights == 28).all() and (train.widths == 28).all()
    label = train.labels[0]
    assert train.paths[0].split("/")[-2] == train.classes[label]
    original = read_idx(idx_source / "train-images-idx3-ubyte.gz")[int(train.paths[0].split("/")[-1][:5])]
    decoded = np.asarray(Image.open(train.paths[0]))
    assert np.abs(decoded.astype(int) - original.astype(int)).mean() < 12  # JPEG of noise at quality 95
    again = CliRunner().invoke(main, [str(out), "--source", str(idx_source)])
    assert "already prepared" in again.output


def test_missing_source_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "out"), "--source", str(tmp_path)])
    assert result.exit_code != 0 and "apt-get install dataset-fashion-mnist" in result.output
