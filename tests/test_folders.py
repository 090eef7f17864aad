"""Any folder of images: flat or nested at mixed depths, without labels, in JPEG (any suffix spelling), PNG and WebP,
through every loader (FFCV through the converter); labels from class folders when there are some; the kNN monitor
on a labelled --val-data folder, or off and saying so."""

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LOADERS, TINY_TRAIN, tiny_loader
from PIL import Image

import train
from pipeline import convert
from pipeline.backends import load_splits
from pipeline.data import BadImage, check_image, list_images, scan_split, to_rgb

# (name, writer): one file of every kind the loaders take. The extended WebPs (VP8X: alpha with lossy data, an
# animation) are beyond the "simple" WebP DALI's documentation promises; its decoder reads them (first frame).
KINDS = (
    ("rgb.png", dict(format="PNG")),
    ("rgba.png", dict(format="PNG", mode="RGBA")),
    ("palette.png", dict(format="PNG", mode="P")),
    ("gray.png", dict(format="PNG", mode="L")),
    ("gray16.png", dict(format="PNG", mode="I;16")),
    ("lossy.webp", dict(format="WEBP", quality=90)),
    ("lossless.webp", dict(format="WEBP", lossless=True)),
    ("alpha.webp", dict(format="WEBP", quality=90, mode="RGBA")),
    ("animated.webp", dict(format="WEBP", quality=90, frames=2)),
    ("spelled.jpeg", dict(format="JPEG", quality=95)),
    ("upper.JPG", dict(format="JPEG", quality=95)),
    ("upper.JPEG", dict(format="JPEG", quality=95)),
    ("upper.PNG", dict(format="PNG")),
    ("upper.WEBP", dict(format="WEBP", quality=90)),
)


def picture(rng: np.random.Generator, colour: int) -> np.ndarray:
    """A colour blob on noise, 20-47 px a side, uint8 (H, W, 3)."""
    h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
    image = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, colour] = 230
    return image


def write_image(path: Path, pixels: np.ndarray, format: str, mode: str = "RGB", frames: int = 1, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":  # 16-bit grayscale: the red channel scaled to 16 bits
        cv2.imwrite(str(path.with_suffix(".png")), pixels[..., 0].astype(np.uint16) * 257)
        if path.suffix != ".png":
            path.with_suffix(".png").rename(path)
        return
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(pixels[..., 1]))
    elif mode != "RGB":
        image = image.convert(mode)
    if frames > 1:
        options.update(save_all=True, append_images=[Image.fromarray(255 - pixels)])
    image.save(path, format=format, **options)


def write_folder(root: Path, layout: str, count: int = 24, seed: int = 0) -> Path:
    """`count` images of every kind in KINDS (cycled): all in `root` ("flat"), or at depths 0-3 ("nested")."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, kind = KINDS[i % len(KINDS)]
        folder = root if layout == "flat" else root.joinpath(*["deep", "er", "still"][: i % 4])
        write_image(folder / f"{i:02d}-{name}", picture(rng, i % 3), **kind)
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("flat"), "flat")


@pytest.fixture(scope="module")
def nested(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("nested"), "nested", seed=1)


def to_beton(folder: Path, out: Path, *options: str) -> Path:
    result = CliRunner().invoke(convert.main, [str(folder), str(out), "--workers", "1", *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def beton_of(request, tmp_path_factory):
    """folder -> its one-split .beton (raw pixels: FFCV sees the converter's decode exactly); skips without FFCV."""
    request.getfixturevalue("tiny_beton")  # skips (with the reason) where FFCV cannot be imported
    made = {}

    def make(folder: Path) -> Path:
        if folder not in made:
            made[folder] = to_beton(folder, tmp_path_factory.mktemp("beton") / "images.beton", "--write-mode", "raw")
        return made[folder]

    return make


def test_flat_and_mixed_depth_folders_are_unlabelled_in_path_order(flat, nested):
    for root in (flat, nested):
        images = scan_split(root)
        assert len(images) == 24 and not images.labelled and images.classes == []
        assert images.labels.tolist() == [-1] * 24
        parts = [Path(p).relative_to(root).parts for p in images.paths]
        assert parts == sorted(parts)
    depths = {len(Path(p).relative_to(nested).parts) for p in scan_split(nested).paths}
    assert depths == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="--labels folders: 6 images sit directly in"):
        scan_split(nested, labels="folders")


def test_class_folders_keep_their_labels_and_order_and_none_drops_the_labels(tiny_data, tmp_path):
    split = tiny_data / "train"
    (split / "empty-class").mkdir()  # an empty class folder still numbers the classes after it
    try:
        images = scan_split(split)
    finally:
        (split / "empty-class").rmdir()
    # The order and labels before any folder could be unlabelled: class by class, each folder's files sorted.
    expected = [
        (str(f), c) for c, name in enumerate(["class0", "class1", "class2"]) for f in sorted((split / name).iterdir())
    ]
    assert images.classes == ["class0", "class1", "class2", "empty-class"]
    assert list(zip(images.paths, images.labels.tolist())) == expected
    unlabelled = scan_split(split, labels="none")
    assert unlabelled.paths == images.paths and not unlabelled.labelled and set(unlabelled.labels.tolist()) == {-1}
    # Deeper files under class folders: auto sees mixed depths; folders takes the first folder as the class.
    deep = tmp_path / "deep"
    for name in ("a", "b"):
        write_image(deep / name / "x.png", np.zeros((8, 8, 3), np.uint8), "PNG")
        write_image(deep / name / "sub" / "y.png", np.zeros((8, 8, 3), np.uint8), "PNG")
    assert not scan_split(deep).labelled
    assert scan_split(deep, labels="folders").labels.tolist() == [0, 0, 1, 1]


def test_listing_skips_hidden_files_follows_links_once_and_index_names_other_formats(tmp_path):
    root = tmp_path / "photos"
    write_image(root / "a.jpg", np.zeros((8, 8, 3), np.uint8), "JPEG")
    write_image(root / ".hidden.jpg", np.zeros((8, 8, 3), np.uint8), "JPEG")
    write_image(root / ".cache" / "b.jpg", np.zeros((8, 8, 3), np.uint8), "JPEG")
    write_image(tmp_path / "elsewhere" / "c.webp", np.zeros((8, 8, 3), np.uint8), "WEBP")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "linked" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: listed once
    (root / "notes.txt").write_text("not an image")
    write_image(root / "anim.gif", np.zeros((8, 8, 3), np.uint8), "GIF")
    names = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert names == ["a.jpg", "anim.gif", "linked/c.webp"]
    with pytest.raises(ValueError, match="anim.gif: GIF data: the loaders decode JPEG, PNG, WEBP"):
        scan_split(root)
    kept = scan_split(root, skip_bad=True)
    assert [Path(p).name for p in kept.paths] == ["a.jpg", "c.webp"] and len(kept.skipped) == 1


def test_index_pass_accepts_png_and_webp_and_rejects_them_cut_short(flat, tmp_path):
    for path in scan_split(flat).paths:
        with Image.open(path) as image:
            assert check_image(path) == image.size
    for name, kind in (("cut.png", "PNG"), ("cut.webp", "WEBP")):
        whole = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(whole, format=kind)
        (tmp_path / name).write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
        with pytest.raises(BadImage, match=f"truncated {kind}"):
            check_image(str(tmp_path / name))
        (tmp_path / f"{kind}-data.jpg").write_bytes(whole.getvalue())  # the right data under another name passes
        assert check_image(str(tmp_path / f"{kind}-data.jpg")) == (40, 40)


def test_sixteen_bit_grayscale_decodes_as_dali_does(tmp_path):
    levels = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    cv2.imwrite(str(tmp_path / "g.png"), levels)
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "I;16"
        rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], (levels // 257).astype(np.uint8))


@pytest.mark.parametrize("backend", LOADERS)
def test_every_format_decodes_in_every_loader_as_pil_does(flat, beton_of, backend):
    """The whole-image view of each file against PIL's decode (`to_rgb`) resized by the loader's own filter: the
    torchvision loader's PIL bilinear and FFCV's OpenCV INTER_AREA (raw storage) exactly, DALI's antialiased linear
    resize within the bounds of tests/test_loaders.py."""
    folder = scan_split(flat)
    images = load_splits(beton_of(flat), "ffcv")[0] if backend == "ffcv" else folder
    ours = tiny_loader(backend, images, train=False)
    for batch in ours.epoch(0):
        for view, index in zip(batch.original, batch.indices.tolist()):
            with Image.open(folder.paths[index]) as file:
                decoded = to_rgb(file)
            got, name = view.permute(1, 2, 0).numpy(), Path(folder.paths[index]).name
            if backend == "ffcv":
                assert np.array_equal(got, cv2.resize(np.asarray(decoded), (16, 16), interpolation=cv2.INTER_AREA))
                continue
            want = np.asarray(decoded.resize((16, 16), Image.BILINEAR))
            diff = np.abs(got.astype(int) - want)
            assert (diff.max() == 0) if backend == "torchvision" else (diff.mean() < 1.0 and diff.max() <= 8), name
    ours.close()


@pytest.mark.ffcv
def test_converter_stores_unlabelled_folders_with_label_minus_one_and_jpeg_storage(nested, tmp_path):
    from pipeline.backends.ffcv import read_beton

    out = to_beton(nested, tmp_path / "nested.beton")  # --write-mode jpg: PNG and WebP re-encoded as JPEG
    stored, folder = read_beton(out), scan_split(nested)
    assert len(stored) == 24 and stored.labels.tolist() == [-1] * 24 and not stored.labelled
    assert np.array_equal(stored.heights, folder.heights) and np.array_equal(stored.widths, folder.widths)
    result = CliRunner().invoke(convert.main, [str(nested), str(tmp_path / "x.beton"), "--labels", "folders"])
    assert result.exit_code == 1 and "--labels folders: 6 images sit directly in" in result.output


def run(*args):
    result = CliRunner().invoke(train.main, [*TINY_TRAIN, *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("backend", LOADERS)
def test_unlabelled_folders_train_in_every_loader(flat, nested, beton_of, tiny_data, request, tmp_path, backend):
    """A flat folder with the monitor off (it says why), a nested one with the monitor on a labelled --val-data."""
    for root, monitored in ((flat, False), (nested, True)):
        data = beton_of(root) if backend == "ffcv" else root
        val_data = request.getfixturevalue("tiny_beton") if backend == "ffcv" else tiny_data
        out = tmp_path / root.name
        extra = ["--val-data", val_data] if monitored else []
        output = run("--loader", backend, "--workers", 1, "--data", data, "--out", out, *extra)
        assert "24 train images, no labels" in output
        if monitored:
            assert f"kNN monitor: a bank of 24 of the 24 {val_data} train images" in output
            assert "12 val images as queries" in output
        else:
            assert "kNN monitor off: the training images have no labels (--val-data" in output
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [0, 1] and records[1]["loss"] > 0
        assert all((r["knn_top1"] is not None) == monitored for r in records)
        config = json.loads((out / "config.json").read_text())
        assert config["val_data"] == (str(val_data) if monitored else None) and config["labels"] == "auto"


def test_val_data_must_hold_labelled_train_and_val_splits(flat, tiny_data, tmp_path):
    for val_data, message in ((flat, "has no val split"), (tiny_data / "train", "has no val split")):
        result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--data", str(flat), "--val-data", str(val_data)])
        assert result.exit_code == 1 and message in result.output and isinstance(result.exception, SystemExit)
    unlabelled = tmp_path / "unlabelled"
    for split in ("train", "val"):
        write_folder(unlabelled / split, "flat", count=3)
    result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--data", str(flat), "--val-data", str(unlabelled)])
    assert result.exit_code == 1 and f"--val-data {unlabelled} has no labels" in result.output


def test_labelled_data_keeps_its_monitor_and_labels_none_turns_it_off(tiny_data, tmp_path):
    output = run("--workers", 0, "--data", tiny_data, "--out", tmp_path / "a", "--labels", "none")
    assert "24 train images, no labels (--labels none)" in output and "kNN monitor off" in output
    output = run("--workers", 0, "--data", tiny_data, "--out", tmp_path / "b", "--val-limit", 4)
    assert "3 classes (--labels auto)" in output and "4 val images as queries" in output


@pytest.mark.gpu
def test_dali_mixed_decodes_png_and_webp_on_the_gpu_device(flat):
    """DALI's `mixed` decoder: JPEG on the GPU, PNG and WebP by nvImageCodec's CPU codecs in the same operator (its
    documented fallback), output on the GPU; the pixels are PIL's, as on the CPU."""
    folder = scan_split(flat)
    from pipeline.backends import make_loader
    from pipeline.loader import LoaderSpec

    gpu = make_loader(LoaderSpec("dali", 16, 8, torch.device("cuda"), train=False, workers=1), folder)
    reference = make_loader(LoaderSpec("torchvision", 16, 8, torch.device("cpu"), train=False, workers=0), folder)
    for a, b in zip(gpu.epoch(0), reference.epoch(0), strict=True):
        assert a.original.device.type == "cuda"
        diff = (a.original.cpu().int() - b.original.int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 8
    gpu.close()
