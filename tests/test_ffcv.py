import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_loader as loader  # 16 px, batches of 8
from PIL import Image

from pipeline import convert
from pipeline.backends import load_splits
from pipeline.data import scan_split

pytestmark = pytest.mark.ffcv  # every test here needs FFCV: skipped (with the reason) where it cannot be imported

SIZE, BATCH = 16, 8
# FFCV resizes with OpenCV's INTER_AREA, the reference with PIL's antialiased bilinear filter: on these noisy
# test images the same window differs by about 2 levels on average (max ~30 on single pixels), while a window
# moved by 2 pixels differs by 17.5 on average (4.9 at least). Real photos are smoother and differ less.
# Stored as JPEG (quality 90) instead of raw pixels, the noise re-encodes with about 4.5 levels of mean error.
MEAN_TOLERANCE, MAX_TOLERANCE, JPEG_MEAN_TOLERANCE = 3.0, 48, 8.0


def read_beton(*args, **kwargs):
    """pipeline.backends.ffcv.read_beton, imported when a test runs: collecting this file needs no FFCV."""
    from pipeline.backends.ffcv import read_beton

    return read_beton(*args, **kwargs)


@pytest.fixture(scope="module")
def folder(tiny_data):
    return scan_split(tiny_data / "train")


@pytest.fixture(scope="module")
def beton(tiny_beton):
    return read_beton(tiny_beton / "train.beton")


def test_round_trip_keeps_count_labels_and_sizes(tiny_data, tmp_path, folder):
    result = CliRunner().invoke(convert.main, [str(tiny_data), str(tmp_path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"{len(folder)} images" in result.output
    stored = read_beton(tmp_path / "train.beton")
    assert len(stored) == len(folder) and stored.labels.tolist() == folder.labels.tolist()
    assert np.array_equal(stored.heights, folder.heights) and np.array_equal(stored.widths, folder.widths)
    assert len(read_beton(tmp_path / "val.beton")) == len(scan_split(tiny_data / "val"))
    ffcv, reference = loader("ffcv", stored), loader("torchvision", folder)  # the JPEG decode path
    for a, b in zip(ffcv.epoch(0), reference.epoch(0), strict=True):
        for view_a, view_b in zip(a[:3], b[:3]):
            assert (view_a.int() - view_b.int()).abs().float().mean() < JPEG_MEAN_TOLERANCE


def test_max_resolution_bounds_the_stored_longest_side(tiny_data, tmp_path, folder):
    out = tmp_path / "small.beton"
    result = CliRunner().invoke(convert.main, [str(tiny_data / "train"), str(out), "--max-resolution", "24"])
    assert result.exit_code == 0, result.output
    stored = read_beton(out)
    longest = np.maximum(folder.heights, folder.widths)
    assert np.maximum(stored.heights, stored.widths).max() <= 24
    small = longest <= 24  # never upscaled
    assert np.array_equal(stored.heights[small], folder.heights[small])
    assert np.all(np.abs(stored.heights * longest - folder.heights * np.minimum(longest, 24)) <= longest)


def test_a_limit_picks_the_same_images_as_from_the_folder(tiny_data, tiny_beton):
    from_folder = scan_split(tiny_data / "train", limit=10, seed=4)
    from_beton = read_beton(tiny_beton / "train.beton", limit=10, seed=4)
    assert from_beton.labels.tolist() == from_folder.labels.tolist()
    assert np.array_equal(from_beton.heights, from_folder.heights)


def test_views_are_the_planned_windows_of_one_decode(folder, beton):
    data = loader("ffcv", beton, seed=5)
    for epoch in (0, 1):  # the second epoch checks that new windows reach the compiled decoder
        order, windows, _ = data.schedule(epoch)
        for k, batch in enumerate(data.epoch(epoch)):
            for j in range(len(batch.indices)):
                p = k * BATCH + j
                with Image.open(folder.paths[order[p]]) as f:
                    image = np.asarray(f.convert("RGB"))
                expected = [image] + [image[t : t + h, x : x + w] for t, x, h, w in windows[p]]
                for view, source in zip(batch[:3], expected, strict=True):
                    want = cv2.resize(source, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                    assert np.array_equal(view[j].permute(1, 2, 0).numpy(), want)
    data.close()


def test_views_match_the_torchvision_reference(folder, beton):
    ffcv, reference = loader("ffcv", beton, seed=3), loader("torchvision", folder, seed=3)
    for epoch in (0, 1):
        for a, b in zip(ffcv.epoch(epoch), reference.epoch(epoch), strict=True):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            for view_a, view_b in zip(a[:3], b[:3]):
                diff = (view_a.int() - view_b.int()).abs()
                assert diff.float().mean() < MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE
    ffcv.close()


def test_an_undecodable_file_is_named_and_nothing_is_written(tiny_data, tmp_path):
    split = tmp_path / "split"
    for source in (tiny_data / "train").rglob("*.jpg"):
        (split / source.parent.name).mkdir(parents=True, exist_ok=True)
        (split / source.parent.name / source.name).write_bytes(source.read_bytes())
    broken = split / "class1" / "003.jpg"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) * 6 // 10])  # header intact, data cut
    out = tmp_path / "out.beton"
    result = CliRunner().invoke(convert.main, [str(split), str(out), "--workers", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "1 of 24 images" in result.output and "cannot be decoded" in result.output and str(broken) in result.output
    assert not out.exists()


def test_clear_errors_for_wrong_inputs(tiny_data, tiny_beton, tmp_path):
    result = CliRunner().invoke(convert.main, [str(tiny_data), str(tmp_path / "x.beton")])
    assert result.exit_code == 2 and "give a folder" in result.output
    with pytest.raises(FileNotFoundError, match="python -m pipeline.convert"):
        load_splits(tiny_data, "ffcv")
    with pytest.raises(ValueError, match="only --loader ffcv"):
        load_splits(tiny_beton / "train.beton", "dali")
    with pytest.raises(ValueError, match="only the ffcv loader"):
        loader("torchvision", read_beton(tiny_beton / "train.beton"))
    not_beton = tmp_path / "notes.beton"
    not_beton.write_text("hello")
    with pytest.raises(ValueError, match="cannot read .* as an FFCV .beton"):
        read_beton(not_beton)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_ffcv_thread_raises_instead_of_hanging(beton, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    def fail(*args):
        raise OSError("simulated read error")

    monkeypatch.setattr(EpochIterator, "run_pipeline", fail)
    with pytest.raises(RuntimeError, match="stopped after 0 of"):
        list(loader("ffcv", beton).epoch(0))


def test_ffcv_leaves_torch_thread_count_alone(beton):
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # FFCV would set it to its worker count, 1 here
    try:
        list(loader("ffcv", beton).epoch(0))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
