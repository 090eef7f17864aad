"""Files that pass the index pass but do not decode (header and end marker intact, entropy data broken): every
loader serves their batch again without them, the run names them and keeps them out; the converter names them
or leaves them out; --verify finds them before training and caches what it decoded."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN, break_entropy_data, cut_entropy_data, tiny_loader, write_tiny_dataset
from PIL import Image

import train
from pipeline import convert, verify
from pipeline.data import check_image, scan_split

BATCH = 8  # tiny_loader's: 24 training images are 3 batches


def test_a_broken_huffman_table_passes_the_header_pass_and_fails_a_decode(tmp_path):
    path = tmp_path / "broken.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    break_entropy_data(str(path))
    assert check_image(str(path)) == (40, 30)  # PIL opens it and reads its size
    with Image.open(path) as image, pytest.raises(OSError, match="broken data stream"):
        image.load()
    assert "broken data stream" in verify.decode_error(str(path))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("clean"))


def broken_copy(clean: Path, folder: Path, positions) -> tuple[Path, list[str]]:
    """A copy of `clean` whose training images at `positions` (of the sorted file list) are broken."""
    shutil.copytree(clean, folder)
    paths = scan_split(folder / "train").paths
    for i in positions:
        break_entropy_data(paths[i])
    return folder, [paths[i] for i in positions]


# Which samples of epoch 0's schedule are broken: the first, the last, a whole batch.
POSITIONS = {"first": [0], "last": [3 * BATCH - 1], "batch": list(range(BATCH, 2 * BATCH))}


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_loader_serves_the_batch_again_without_undecodable_files(clean, tmp_path, capsys, backend, where):
    reference = tiny_loader(backend, scan_split(clean / "train"))
    order = reference.schedule(0).order
    data, bad_paths = broken_copy(clean, tmp_path / "broken", order[POSITIONS[where]])
    images = scan_split(data / "train")
    assert not images.skipped  # the index pass lets them through
    loader = tiny_loader(backend, images)
    bad = {images.paths.index(p) for p in bad_paths}
    for epoch in (0, 1):
        clean_views = {}  # image -> its views in the clean run's epoch (each image once: 24 = 3 batches)
        for batch in reference.epoch(epoch):
            for j, i in enumerate(batch.indices.tolist()):
                clean_views[i] = [view[j] for view in (batch.original, batch.crop1, batch.crop2)]
        schedule = reference.schedule(epoch).order.reshape(-1, BATCH)
        served = list(loader.epoch(epoch))
        assert len(served) == len(schedule)
        for batch, planned in zip(served, schedule):
            indices = batch.indices.tolist()
            assert len(indices) == BATCH and len(set(indices)) == BATCH  # full, no image twice
            for i, j in zip(indices, planned.tolist()):
                assert i == j if j not in bad else i not in bad  # the others keep their places
            for j, i in enumerate(indices):  # every sample as the clean run decodes and crops that image
                for got, expected in zip((batch.original, batch.crop1, batch.crop2), clean_views[i]):
                    assert torch.equal(got[j], expected)
    assert set(loader.bad_files.reasons) == set(bad_paths)
    err = capsys.readouterr().err
    assert all(err.count(f"undecodable {path}: ") == 1 for path in bad_paths), err  # found once, kept out
    evaluation = tiny_loader(backend, images, train=False, bad_files=loader.bad_files)
    seen = torch.cat([batch.indices for batch in evaluation.epoch(0)]).tolist()
    assert seen == sorted(set(range(len(images))) - bad)  # evaluation leaves them out, in file order


@pytest.mark.ffcv
@pytest.mark.parametrize("where", POSITIONS)
def test_the_converter_names_undecodable_files_and_skip_bad_leaves_them_out(clean, tmp_path, where):
    from pipeline.backends.ffcv import read_beton

    data, bad_paths = broken_copy(clean, tmp_path / "broken", POSITIONS[where])  # the first, last, 8 files
    out = tmp_path / "beton"
    args = [str(data), str(out), "--workers", "1", "--write-mode", "raw", "--max-resolution", "0"]
    result = CliRunner().invoke(convert.main, args)
    assert result.exit_code == 1 and all(path in result.output for path in bad_paths), result.output
    assert "--skip-bad" in result.output and not list(out.glob("*.beton"))
    result = CliRunner().invoke(convert.main, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert all(f"skipped {path}: does not decode" in result.output for path in bad_paths)
    good = [p for p in scan_split(data / "train").paths if p not in bad_paths]
    beton = read_beton(out / "train.beton")
    sizes = [Image.open(p).size for p in good]
    assert beton.widths.tolist() == [w for w, _ in sizes] and beton.heights.tolist() == [h for _, h in sizes]
    loader = tiny_loader("ffcv", beton, train=False)
    first = next(iter(loader.epoch(0)))
    with Image.open(good[0]) as image:  # raw pixels, resized: the first stored image is the first good file
        expected = np.asarray(image.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=int)
    assert np.abs(first.original[0].permute(1, 2, 0).numpy().astype(int) - expected).mean() < 3
    trained = list(tiny_loader("ffcv", beton).epoch(0))
    assert len(trained) == len(good) // BATCH and all(len(b.labels) == BATCH for b in trained)


@pytest.fixture
def no_val(clean, tmp_path) -> Path:
    """`clean` without its val split (the kNN monitor off): only the training loader reads the images."""
    shutil.copytree(clean / "train", tmp_path / "data" / "train")
    return tmp_path / "data"


def test_training_goes_on_names_the_file_and_keeps_it_out_on_resume(no_val, tmp_path, one_torch_thread):
    """The reported case: DALI with --skip-bad died mid-epoch ("Failed to decode sample #k"); the loader-level
    test above covers torchvision too."""
    paths = scan_split(no_val / "train").paths
    bad = paths[5]
    break_entropy_data(bad)
    out = tmp_path / "run"
    args = [*TINY_TRAIN, "--loader", "dali", "--workers", "1", "--method", "mocov2", "--skip-bad"]
    result = CliRunner().invoke(train.main, [*map(str, args), "--data", str(no_val), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count(f"undecodable {bad}: does not decode") == 1
    assert (out / "bad_files.txt").read_text().splitlines() == [f"{bad}\t{verify.decode_error(bad)}"]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert [path for path, _ in state["bad_files"]] == [bad]
    assert int(state["model"]["queue_ptr"]) == 24 % 32  # 3 whole batches of 8 were trained on
    resumed = CliRunner().invoke(train.main, ["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "undecodable /" not in resumed.output and "1 file(s) found undecodable earlier stay out" in resumed.output
    assert len((out / "bad_files.txt").read_text().splitlines()) == 1


def test_verify_decodes_once_and_again_after_a_change(clean, tmp_path, monkeypatch):
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    data, bad_paths = broken_copy(clean, tmp_path / "broken", [3])
    paths = scan_split(data / "train").paths
    decoded = []
    decode = verify.decode_error
    monkeypatch.setattr(verify, "decode_error", lambda path: decoded.append(path) or decode(path))
    bad, count = verify.verify(paths, workers=2)
    assert list(bad) == bad_paths and "broken data stream" in bad[bad_paths[0]] and count == len(decoded) == 24
    cache = verify.cache_file(paths)
    assert cache.parent == tmp_path / "cache" and not list(data.rglob("*.json"))  # not in the dataset's folder
    assert verify.verify(paths, workers=2) == (bad, 0) and len(decoded) == 24  # the second run decodes nothing
    stat = os.stat(paths[7])
    os.utime(paths[7], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    break_entropy_data(paths[9])  # rewritten: another size or mtime
    bad, count = verify.verify(paths, workers=2)
    assert count == 2 and sorted(decoded[24:]) == sorted([paths[7], paths[9]])
    assert set(bad) == {bad_paths[0], paths[9]}
    assert set(json.loads(cache.read_text())["files"]) == {os.path.relpath(p, data / "train") for p in paths}


def test_train_verify_stops_naming_the_files_or_leaves_them_out(clean, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    data, bad_paths = broken_copy(clean, tmp_path / "broken", [0, 23])
    args = [*map(str, TINY_TRAIN), "--data", str(data), "--verify"]
    result = CliRunner().invoke(train.main, [*args, "--out", str(tmp_path / "stopped")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert all(f"  {path}: does not decode" in result.output for path in bad_paths) and "--skip-bad" in result.output
    assert "verify train: 24 of 24 images decoded" in result.output
    assert not (tmp_path / "stopped" / "checkpoint.pt").exists()
    result = CliRunner().invoke(train.main, [*args, "--skip-bad", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "verify train: 0 of 24 images decoded" in result.output  # the first run's results, from the cache
    assert all(f"skipped {path}: does not decode" in result.output for path in bad_paths)
    assert "22 train images" in result.output and "undecodable" not in result.output


def test_a_jpeg_cut_short_inside_its_data_decodes_garbled_and_counts_as_undecodable(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    cut_entropy_data(str(path))
    with Image.open(path) as image:
        image.load()  # PIL: no error, the lower part grey
    assert verify.strict_jpeg_available()  # libturbojpeg: setup.sh installs it (FFCV builds against it)
    assert verify.decode_error(str(path)) == (
        "does not decode (libjpeg-turbo: Corrupt JPEG data: premature end of data segment)"
    )


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_verify_leaves_a_garbled_jpeg_out_of_every_backend(clean, tmp_path, monkeypatch, one_torch_thread, backend):
    """DALI and PIL (torchvision) both decode it as garbled pixels and would train on it; --verify leaves it out."""
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    bad = scan_split(data / "train").paths[4]
    cut_entropy_data(bad)
    batch = next(iter(tiny_loader(backend, scan_split(data / "train"), train=False, batch=24).epoch(0)))
    assert len(batch.indices) == 24  # without --verify the loader decodes it
    args = [*map(str, TINY_TRAIN), "--loader", backend, "--workers", "1", "--data", str(data), "--verify"]
    result = CliRunner().invoke(train.main, [*args, "--skip-bad", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"skipped {bad}: does not decode (libjpeg-turbo: Corrupt JPEG data: premature end" in result.output
    assert "23 train images" in result.output


@pytest.mark.ffcv
def test_the_converter_leaves_a_garbled_jpeg_out(clean, tmp_path):
    from pipeline.backends.ffcv import read_beton

    data = tmp_path / "data"
    shutil.copytree(clean / "train", data)
    bad = scan_split(data).paths[4]
    cut_entropy_data(bad)
    out = tmp_path / "train.beton"
    result = CliRunner().invoke(convert.main, [str(data), str(out), "--workers", "1"])
    assert result.exit_code == 1 and f"{bad}: does not decode (libjpeg-turbo" in result.output, result.output
    result = CliRunner().invoke(convert.main, [str(data), str(out), "--workers", "1", "--skip-bad"])
    assert result.exit_code == 0 and f"skipped {bad}: does not decode" in result.output, result.output
    assert len(read_beton(out)) == 23


def test_a_verify_cache_of_another_check_is_decoded_again(clean, tmp_path, monkeypatch):
    """A cache written when --verify checked with PIL alone says a garbled JPEG is fine: it does not count."""
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(clean / "train", data)
    paths = scan_split(data).paths
    cut_entropy_data(paths[2])
    root = verify.images_root(paths)
    entries = {os.path.relpath(p, root): [*verify._stat(p), None] for p in paths}
    cache = verify.cache_file(paths)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"root": root, "files": entries}))  # the earlier format: no "check"
    bad, decoded = verify.verify(paths, workers=1)
    assert decoded == len(paths) and list(bad) == [paths[2]]
