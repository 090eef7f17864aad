import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import LOADERS, TINY_BASE, tiny_loader
from PIL import Image

import train
from model.config import resolve
from model.localize import localize
from pipeline import views
from pipeline.backends import load_splits
from pipeline.ccrop import box_areas, heatmap_boxes, mean_box_area, update_epochs
from pipeline.crop_plan import crop_plan, random_resized_crop


def slow_box(heat: np.ndarray, k: float) -> list[float]:
    """One upsampled heatmap (H, W) -> [top, left, bottom, right] fractions, by scanning pixels."""
    height, width = heat.shape
    hits = [(y, x) for y in range(height) for x in range(width) if heat[y, x] > k]
    if not hits:
        return [0.0, 0.0, 1.0, 1.0]
    ys, xs = [y for y, _ in hits], [x for _, x in hits]
    return [min(ys) / height, min(xs) / width, (max(ys) + 1) / height, (max(xs) + 1) / width]


def slow_heat(feature_map: torch.Tensor, size) -> np.ndarray:
    heat = feature_map.sum(0)
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else torch.full_like(heat, float("nan"))
    return F.interpolate(heat[None, None], size=size, mode="bilinear")[0, 0].numpy()


def test_boxes_match_a_slow_reference_on_random_maps():
    maps = torch.randn(6, 4, 4, 5).relu()
    size, k = (16, 20), 0.3
    got = heatmap_boxes(maps, size, k).numpy()
    for i in range(6):
        assert np.allclose(got[i], slow_box(slow_heat(maps[i], size), k)), i


def test_constant_map_gives_the_whole_image_and_one_pixel_a_one_pixel_box():
    constant = torch.ones(1, 3, 8, 8)
    assert heatmap_boxes(constant, (8, 8), 0.1).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    single = torch.zeros(1, 3, 8, 8)
    single[0, :, 2, 5] = 1.0  # at full size: no upsampling spreads it
    assert heatmap_boxes(single, (8, 8), 0.1).tolist() == [[2 / 8, 5 / 8, 3 / 8, 6 / 8]]
    assert heatmap_boxes(single, (8, 8), 1.0).tolist() == [[0.0, 0.0, 1.0, 1.0]]  # nothing above k


def random_boxes(rng, n):
    corners = np.sort(rng.random((n, 2, 2)), axis=1)  # (n, [low, high], [y, x])
    return np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], axis=1)


def test_windows_stay_inside_the_image_and_centres_inside_the_box_when_it_allows():
    rng = np.random.default_rng(0)
    heights = rng.integers(20, 400, 4000)
    widths = (heights * rng.uniform(0.8, 1.25, 4000)).astype(int)  # no central-crop fallback at these ratios
    boxes = random_boxes(rng, 4000)
    top, left, h, w = random_resized_crop(heights, widths, rng, boxes=boxes, alpha=0.6).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    low, high = (heights * boxes[:, 0]).astype(int), (heights * boxes[:, 2]).astype(int)
    free = (low - h // 2 >= 0) & (high - h // 2 <= heights - h)  # the clamp to the image does not bite
    assert free.sum() > 300
    centre = top + h // 2
    assert ((centre >= low) & (centre <= high))[free].all()
    low, high = (widths * boxes[:, 1]).astype(int), (widths * boxes[:, 3]).astype(int)
    free = (low - w // 2 >= 0) & (high - w // 2 <= widths - w)
    assert ((left + w // 2 >= low) & (left + w // 2 <= high))[free].all()


def test_small_alpha_pushes_centres_toward_the_box_edges():
    n = 20000
    heights, widths = np.full(n, 300), np.full(n, 300)
    boxes = np.tile([[0.2, 0.2, 0.8, 0.8]], (n, 1))
    share = {}
    for alpha in (0.1, 1.0):
        top, _, h, _ = random_resized_crop(heights, widths, np.random.default_rng(1), boxes=boxes, alpha=alpha).T
        first = np.clip(60 - h // 2, 0, 300 - h)
        last = np.clip(240 - h // 2, 0, 300 - h)
        ok = last > first
        u = (top[ok] - first[ok]) / (last[ok] - first[ok])
        share[alpha] = np.mean((u < 0.25) | (u > 0.75))
    assert share[1.0] == pytest.approx(0.5, abs=0.03) and share[0.1] > 0.8


def test_plan_without_boxes_is_unchanged_and_with_boxes_differs():
    heights, widths = np.full(64, 40), np.full(64, 50)
    plain = crop_plan(heights, widths, seed=2, epoch=0)
    whole = crop_plan(heights, widths, seed=2, epoch=0, boxes=np.tile([[0.0, 0.0, 1.0, 1.0]], (64, 1)))
    assert np.array_equal(plain, crop_plan(heights, widths, seed=2, epoch=0))
    assert np.array_equal(plain[:, 0, 2:], whole[:, 0, 2:])  # same first sizes, Beta-placed positions
    assert not np.array_equal(plain, whole)


def reference_schedule(epochs: int, warmup: int, interval: int) -> list[int]:
    """ContrastiveCrop's training loop, transcribed: epochs counted from 1, boxes updated after epoch e when
    e >= warm-up, e is not the last and e % interval == 0; such an update comes before (0-based) epoch e."""
    return [e for e in range(1, epochs + 1) if e >= warmup and e != epochs and e % interval == 0]


def test_update_schedule_is_the_reference_loops():
    rng = np.random.default_rng(0)
    for epochs, warmup, interval in rng.integers([1, 0, 1], [40, 45, 12], size=(300, 3)):
        assert update_epochs(epochs, warmup, interval) == reference_schedule(epochs, warmup, interval)
    assert update_epochs(10, 2, 2) == [2, 4, 6, 8]
    assert update_epochs(10, 3, 2) == [4, 6, 8]  # not 3: the reference waits for a multiple of the interval
    assert update_epochs(10, 0, 3) == [3, 6, 9]  # warm-up 0: never before the first epoch (random weights)
    assert update_epochs(500, 100, 100) == [100, 200, 300, 400]  # the reference's CIFAR configs
    assert update_epochs(3, 3, 1) == []


@pytest.mark.parametrize("size, alpha", [(16, 0.1), (32, 0.1), (64, 0.1), (96, 0.1), (112, 0.6), (224, 0.6)])
def test_alpha_defaults_by_image_size_as_the_reference_configs(size, alpha):
    assert resolve({"image_size": size, "device": "cpu"}).method.ccrop_alpha == alpha
    assert resolve({"image_size": size, "device": "cpu", "ccrop_alpha": 0.3}).method.ccrop_alpha == 0.3


@pytest.fixture
def split(data_for):
    """The tiny train split as each backend reads it (FFCV: the same images converted to a .beton)."""
    return lambda backend: load_splits(data_for(backend), backend)[0]


@pytest.mark.parametrize("backend", LOADERS)
def test_every_backend_applies_the_same_ccrop_windows(backend, split, tiny_data):
    images = split(backend)
    boxes = random_boxes(np.random.default_rng(3), len(images))
    loader = tiny_loader(backend, images, seed=4)
    loader.boxes, loader.alpha = boxes, 0.3
    order, windows, _ = loader.schedule(0)
    reference = crop_plan(images.heights, images.widths, 4, 0, boxes=boxes, alpha=0.3)[order]
    assert np.array_equal(windows, reference)
    batch = next(iter(loader.epoch(0)))
    folder = split("torchvision")  # the same images, in the same order, as JPEG files
    for j in range(8):
        top, left, h, w = (int(v) for v in windows[j, 0])
        with Image.open(folder.paths[order[j]]) as f:
            crop = f.convert("RGB").crop((left, top, left + w, top + h)).resize((16, 16), Image.BILINEAR)
        diff = np.abs(batch.crop1[j].permute(1, 2, 0).numpy().astype(int) - np.asarray(crop).astype(int))
        assert diff.mean() < 3.0
    loader.close()


def test_localize_gives_one_box_per_image_in_file_order(split):
    images = split("torchvision")
    loader = tiny_loader("torchvision", images, train=False)
    from model.moco import Encoder

    encoder = Encoder("resnet18", 16)
    boxes = localize(encoder, loader, k=0.1)
    assert boxes.shape == (len(images), 4) and encoder.training
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    first = next(iter(loader.epoch(0)))
    encoder.eval()
    with torch.no_grad():
        from pipeline.augment import normalize

        expected = heatmap_boxes(encoder.feature_map(normalize(first.original)), (16, 16), 0.1).numpy()
    assert np.allclose(boxes[:8], expected)


TINY = [*TINY_BASE, *"--workers 0 --loader torchvision --crop ccrop".split()]


def run(*args):
    result = CliRunner().invoke(train.main, [*TINY, *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_boxes_are_saved_and_survive_resume(tiny_data, tmp_path):
    # Warm-up 2, interval 2 of 4 epochs: boxes before epoch 3 only; the resumed epoch 4 must train with the
    # checkpoint's boxes to match a straight run. A learning-rate warm-up over every epoch makes the rate
    # independent of --epochs, so the 3-epoch run trains as the first 3 of the 4.
    schedule = ["--ccrop-warmup", 2, "--ccrop-interval", 2, "--warmup-epochs", 4]
    output = run("--data", tiny_data, "--out", tmp_path / "straight", "--epochs", 4, *schedule)
    assert "boxes updated before epoch 3" in output
    assert all(f"before epoch {e}" not in output for e in (1, 2, 4))
    run("--data", tiny_data, "--out", tmp_path / "split", "--epochs", 3, *schedule)
    saved = np.load(tmp_path / "split" / "boxes.npy")
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert np.array_equal(state["boxes"], saved) and saved.shape == (24, 4)
    run("--resume", tmp_path / "split" / "checkpoint.pt", "--epochs", 4)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert np.array_equal(straight["boxes"], resumed["boxes"])
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["box_area"] for r in records[:3]] == [None] * 3 and 0 < records[3]["box_area"] <= 1


def test_warmup_zero_samples_around_whole_images_until_the_first_boxes(tiny_data, tmp_path):
    """The reference turns ContrastiveCrop's sampling on after the warm-up with whole-image boxes; the first
    localisation waits for an epoch of training (warm-up 0, interval 2: after epoch 2, none in 2 epochs)."""
    output = run(
        "--data", tiny_data, "--out", tmp_path / "run", "--epochs", 2, "--ccrop-warmup", 0, "--ccrop-interval", 2
    )
    assert "boxes updated" not in output
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert np.array_equal(state["boxes"], np.tile([[0.0, 0.0, 1.0, 1.0]], (24, 1)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["box_area"] for r in records] == [None, 1.0, 1.0]


def test_views_picture(tiny_data, tmp_path):
    boxes = tmp_path / "boxes.npy"
    np.save(boxes, random_boxes(np.random.default_rng(0), 24).astype(np.float32))
    out = tmp_path / "views.png"
    args = ["--data", tiny_data, "--boxes", boxes, "--train-limit", "0", "--count", "4", "--size", "32", "--out", out]
    result = CliRunner().invoke(views.main, list(map(str, args)))
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (3 * 32 + 8, 4 * 36)
    np.save(boxes, np.zeros((5, 4), dtype=np.float32))
    result = CliRunner().invoke(views.main, list(map(str, args)))
    assert result.exit_code == 1 and "same --train-limit" in result.output


def test_views_takes_the_runs_images_subset_seed_and_alpha_from_its_config(tiny_data, tmp_path, monkeypatch):
    """--boxes RUN_DIR/boxes.npy alone draws the run's pictures: --data, --train-limit, --seed and --ccrop-alpha
    come from RUN_DIR/config.json; a flag given wins (--alpha is --ccrop-alpha's older name)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.save(run_dir / "boxes.npy", random_boxes(np.random.default_rng(0), 24).astype(np.float32))
    settings = {"data": str(tiny_data), "train_limit": 0, "seed": 3, "ccrop_alpha": 0.25, "epochs": 2}
    (run_dir / "config.json").write_text(json.dumps(settings))
    drawn = []

    def picture(backend, images, seed, epoch, boxes, alpha, count, size):
        drawn.append((backend, len(images), seed, alpha, boxes.shape))
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(views, "picture", picture)
    out = str(tmp_path / "views.png")
    result = CliRunner().invoke(views.main, ["--boxes", str(run_dir / "boxes.npy"), "--out", out])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(views.main, ["--boxes", str(run_dir / "boxes.npy"), "--alpha", "0.5", "--out", out])
    assert result.exit_code == 0, result.output
    assert drawn == [("torchvision", 24, 3, 0.25, (24, 4)), ("torchvision", 24, 3, 0.5, (24, 4))]
    result = CliRunner().invoke(views.main, ["--out", out])
    assert result.exit_code == 2 and "give --data" in result.output


def test_box_areas_against_a_loop():
    rng = np.random.default_rng(3)
    rows, columns = np.sort(rng.uniform(0, 1, (50, 2)), axis=1), np.sort(rng.uniform(0, 1, (50, 2)), axis=1)
    boxes = np.stack([rows[:, 0], columns[:, 0], rows[:, 1], columns[:, 1]], axis=1)  # [top, left, bottom, right]
    slow = [(bottom - top) * (right - left) for top, left, bottom, right in boxes.tolist()]
    assert np.allclose(box_areas(boxes), slow)
    assert mean_box_area(boxes) == pytest.approx(sum(slow) / len(slow), rel=1e-6)
