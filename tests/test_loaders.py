import numpy as np
import pytest
import torch
from conftest import LOADERS
from conftest import tiny_loader as loader  # 16 px, batches of 8
from PIL import Image

from pipeline.backends import load_splits, make_loader
from pipeline.data import scan_split
from pipeline.loader import LoaderSpec

SIZE, BATCH = 16, 8
# DALI and PIL both resize with antialiased linear filters but round and place taps slightly differently:
# the same window gives pixels within 2 levels (mean ~0.2) on these images; the bounds leave headroom.
MEAN_TOLERANCE, MAX_TOLERANCE = 1.0, 8


@pytest.fixture(scope="module")
def images(tiny_data):
    return scan_split(tiny_data / "train")


@pytest.fixture
def split(data_for):
    """The tiny train split as each backend reads it (FFCV: the same images converted to a .beton)."""
    return lambda backend: load_splits(data_for(backend), backend)[0]


@pytest.mark.parametrize("backend", LOADERS)
def test_training_batches_follow_the_contract(backend, split):
    images = split(backend)
    data = loader(backend, images, train=True)
    order, _, _ = data.schedule(epoch=1)
    batches = list(data.epoch(1))
    assert len(batches) == len(data) == len(images) // BATCH
    seen = torch.cat([b.indices for b in batches])
    assert seen.tolist() == order.tolist()
    for b in batches:
        for view in (b.original, b.crop1, b.crop2):
            assert view.shape == (BATCH, 3, SIZE, SIZE) and view.dtype == torch.uint8
            assert view.is_contiguous(memory_format=torch.channels_last) and view.device.type == "cpu"
        assert b.labels.dtype == torch.int64 and b.indices.dtype == torch.int64
        assert b.labels.tolist() == images.labels[b.indices.numpy()].tolist()
        assert not torch.equal(b.crop1, b.crop2)
    data.close()


@pytest.mark.parametrize("backend", LOADERS)
def test_fewer_views_give_the_same_crops_and_decode_only_gives_none(backend, split):
    images = split(backend)
    full = next(iter(loader(backend, images, seed=2).epoch(0)))
    for views in (2, 1, 0):
        batch = next(iter(loader(backend, images, seed=2, view_count=views).epoch(0)))
        assert batch.original is None and torch.equal(batch.indices, full.indices)
        assert torch.equal(batch.labels, full.labels)
        for name in ("crop1", "crop2")[:views]:
            assert torch.equal(getattr(batch, name), getattr(full, name))
            assert getattr(batch, name).is_contiguous(memory_format=torch.channels_last)
        for name in ("crop1", "crop2")[views:]:
            assert getattr(batch, name) is None


@pytest.mark.parametrize("backend", LOADERS)
def test_evaluation_pass_yields_every_image_once_in_order(backend, split):
    images = split(backend)
    data = loader(backend, images, train=False)
    batches = list(data.epoch(0))
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(len(images)))
    assert batches[-1].original.shape[0] == len(images) - (len(batches) - 1) * BATCH
    assert all(b.crop1 is None and b.crop2 is None for b in batches)
    data.close()


@pytest.mark.parametrize("backend", LOADERS)
def test_center_and_random_crop_evaluation_passes(backend, split, images):
    ours = split(backend)
    # FFCV resizes with OpenCV's area filter: the bounds of tests/test_ffcv.py for the same windows.
    mean_tolerance, max_tolerance = (3.0, 48) if backend == "ffcv" else (MEAN_TOLERANCE, MAX_TOLERANCE)
    for view in ("center", "random"):
        data, reference = (
            loader(backend, ours, train=False, eval_view=view),
            loader("torchvision", images, train=False, eval_view=view),
        )
        order, windows, _ = data.schedule(0)
        assert order.tolist() == list(range(len(ours))) and windows.shape == (len(ours), 1, 4)
        assert np.array_equal(windows, reference.schedule(0)[1])
        top, left, h, w = windows[:, 0].T
        assert (
            (top >= 0).all()
            and (left >= 0).all()
            and (top + h <= ours.heights).all()
            and (left + w <= ours.widths).all()
        )
        batches = list(data.epoch(0))
        assert torch.cat([b.indices for b in batches]).tolist() == list(range(len(ours)))
        for a, b in zip(batches, reference.epoch(0), strict=True):
            assert a.original is None and a.crop2 is None and a.crop1.shape[1:] == (3, SIZE, SIZE)
            diff = (a.crop1.int() - b.crop1.int()).abs()
            assert diff.float().mean() < mean_tolerance and diff.max() <= max_tolerance
        data.close()
    center = loader(backend, ours, train=False, eval_view="center").schedule(0)[1]
    sides = np.round(np.minimum(ours.heights, ours.widths) * 0.875)
    assert np.array_equal(center[:, 0, 2], sides) and np.array_equal(center[:, 0, 3], sides)
    random = loader(backend, ours, train=False, eval_view="random")
    assert not np.array_equal(random.schedule(0)[1], random.schedule(1)[1])  # a new draw per pass


def test_backends_give_the_same_pixels_for_the_same_windows(images):
    dali, reference = loader("dali", images, train=True, seed=3), loader("torchvision", images, train=True, seed=3)
    for epoch in (0, 1):  # the second epoch checks that a new schedule reaches DALI
        for a, b in zip(dali.epoch(epoch), reference.epoch(epoch), strict=True):
            assert torch.equal(a.indices, b.indices)
            for view_a, view_b in zip(a[:3], b[:3]):
                diff = (view_a.int() - view_b.int()).abs()
                assert diff.float().mean() < MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE
    dali.close()


def test_reference_crop_is_the_planned_window(images):
    data = loader("torchvision", images, train=True)
    order, windows, _ = data.schedule(epoch=0)
    batch = next(iter(data.epoch(0)))
    top, left, h, w = (int(v) for v in windows[0, 0])
    with Image.open(images.paths[order[0]]) as f:
        expected = np.array(f.convert("RGB").crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR))
    got = batch.crop1[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 1.0
    whole = np.array(Image.open(images.paths[order[0]]).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    assert np.array_equal(batch.original[0].permute(1, 2, 0).numpy(), whole)


def test_unknown_backend_and_too_few_images(images):
    with pytest.raises(ValueError, match="unknown loader"):
        make_loader(LoaderSpec("nope", SIZE, BATCH, torch.device("cpu")), images)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_loader(LoaderSpec("torchvision", SIZE, 1000, torch.device("cpu")), images)


PAIRS = np.array([[0, 5], [3, 20], [10, 2], [17, 9]])


@pytest.mark.parametrize("backend", LOADERS)
def test_pair_samples_take_crop_2_from_their_second_image(backend, split, images):
    ours = split(backend)
    data = loader(backend, ours, view_count=2, pairs=PAIRS, seed=4)
    reference = loader("torchvision", images, view_count=2, pairs=PAIRS, seed=4)
    assert len(data) == (len(ours) + len(PAIRS)) // BATCH
    order, windows, second = data.schedule(0)
    paired = second != order
    assert paired.any() and np.array_equal(order, reference.schedule(0).order)
    assert {(int(a), int(b)) for a, b in zip(order[paired], second[paired])} <= {tuple(p) for p in PAIRS.tolist()}
    for view, image in ((0, order), (1, second)):  # each window lies inside the image it is cut from
        top, left, h, w = windows[:, view].T
        assert (top + h <= ours.heights[image]).all() and (left + w <= ours.widths[image]).all()
    mean_tolerance, max_tolerance = (3.0, 48) if backend == "ffcv" else (MEAN_TOLERANCE, MAX_TOLERANCE)
    for a, b in zip(data.epoch(0), reference.epoch(0), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        for view_a, view_b in ((a.crop1, b.crop1), (a.crop2, b.crop2)):
            diff = (view_a.int() - view_b.int()).abs()
            assert diff.float().mean() < mean_tolerance and diff.max() <= max_tolerance
    data.close()


def test_reference_pair_crop_is_the_second_images_window(images):
    data = loader("torchvision", images, view_count=2, pairs=PAIRS, seed=4)
    order, windows, second = data.schedule(0)
    position = int(np.flatnonzero(second != order)[0])
    batch = list(data.epoch(0))[position // BATCH]
    top, left, h, w = (int(v) for v in windows[position, 1])
    with Image.open(images.paths[second[position]]) as f:
        expected = np.array(f.convert("RGB").crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR))
    got = batch.crop2[position % BATCH].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 1.0


def test_no_pairs_is_the_plain_schedule(images):
    plain = loader("torchvision", images, view_count=2, seed=4).schedule(1)
    empty = loader("torchvision", images, view_count=2, seed=4, pairs=np.zeros((0, 2), dtype=np.int64)).schedule(1)
    assert np.array_equal(plain.order, empty.order) and np.array_equal(plain.windows, empty.windows)
    with pytest.raises(ValueError, match="both crops"):
        loader("torchvision", images, view_count=1, pairs=PAIRS)


@pytest.mark.parametrize("backend", LOADERS)
def test_cropped_original_is_a_window_of_its_own(backend, split, images):
    ours = split(backend)
    data = loader(backend, ours, seed=6, original_crop=True)
    plain = loader(backend, ours, seed=6)
    order, windows, _ = data.schedule(0)
    assert windows.shape == (len(order), 3, 4) and np.array_equal(windows[:, 1:], plain.schedule(0).windows)
    assert not np.array_equal(windows[:, 0, 2:], np.stack([ours.heights, ours.widths], 1)[order])
    reference = loader("torchvision", images, seed=6, original_crop=True)
    mean_tolerance, max_tolerance = (3.0, 48) if backend == "ffcv" else (MEAN_TOLERANCE, MAX_TOLERANCE)
    for a, b, c in zip(data.epoch(0), reference.epoch(0), plain.epoch(0), strict=True):
        assert torch.equal(a.crop1, c.crop1) and torch.equal(a.crop2, c.crop2)  # the crops are unchanged
        diff = (a.original.int() - b.original.int()).abs()
        assert diff.float().mean() < mean_tolerance and diff.max() <= max_tolerance
    data.close()


@pytest.mark.parametrize("backend", LOADERS)
def test_ranks_share_each_global_batch_with_the_single_process_windows(backend, split):
    ours = split(backend)
    single = loader(backend, ours, seed=8, batch=8, view_count=2)
    ranks = [loader(backend, ours, seed=8, batch=4, view_count=2, rank=r, world=2) for r in (0, 1)]
    whole, parts = single.schedule(1), [r.schedule(1) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step in range(len(single)):  # global batch k = rank 0's batch k, then rank 1's
        joined = np.concatenate([p.order[4 * step : 4 * step + 4] for p in parts])
        assert np.array_equal(joined, whole.order[8 * step : 8 * step + 8])
        windows = np.concatenate([p.windows[4 * step : 4 * step + 4] for p in parts])
        assert np.array_equal(windows, whole.windows[8 * step : 8 * step + 8])
    seen = [torch.cat([b.indices for b in r.epoch(1)]).numpy() for r in ranks]
    assert not set(seen[0]) & set(seen[1]) and sorted([*seen[0], *seen[1]]) == sorted(whole.order.tolist())
    evaluation = [loader(backend, ours, train=False, rank=r, world=2) for r in (0, 1)]
    files = [torch.cat([b.indices for b in e.epoch(0)]).tolist() for e in evaluation]
    assert files[0] + files[1] == list(range(len(ours)))  # contiguous parts, nothing dropped


@pytest.fixture(scope="module")
def exif_data(tmp_path_factory):
    """A folder of 40 x 24 JPEGs (stored size) carrying EXIF orientations 1-8: 6 and 8 are phone portraits."""
    root = tmp_path_factory.mktemp("exif")
    rng = np.random.default_rng(9)
    ramp = np.linspace(0, 200, 40, dtype=np.float32)
    for c in range(2):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for orientation in range(1, 9):
            pixels = ramp[None, :, None] + rng.integers(0, 50, size=(24, 40, 3))  # left dark, right bright
            pixels[:6, :10, c] = 255  # a mark in the stored top-left corner
            exif = Image.Exif()
            exif[0x0112] = orientation  # the EXIF Orientation tag
            Image.fromarray(pixels.astype(np.uint8)).save(
                root / "train" / f"class{c}" / f"o{orientation}.jpg", quality=95, exif=exif
            )
    return root


@pytest.mark.parametrize("backend", LOADERS)
def test_exif_orientation_is_not_applied_by_any_backend(backend, exif_data, tmp_path):
    """The index pass records the stored size and every backend decodes the stored pixels: the same windows
    give the same pixels (DALI would rotate orientations 5-8 by default, moving the windows out of bounds)."""
    folder = scan_split(exif_data / "train")
    with Image.open(folder.paths[5]) as image:  # o6.jpg of class0: "rotate 90 degrees to display"
        assert image.getexif()[0x0112] == 6 and image.size == (40, 24)
    assert (folder.widths == 40).all() and (folder.heights == 24).all()
    images = folder
    if backend == "ffcv":
        from pipeline.convert import convert_split

        convert_split(exif_data / "train", tmp_path / "exif.beton", write_mode="raw", workers=1)
        images = load_splits(tmp_path / "exif.beton", "ffcv")[0]
        assert (images.widths == 40).all() and (images.heights == 24).all()
    data, reference = loader(backend, images, seed=1), loader("torchvision", folder, seed=1)
    mean_tolerance, max_tolerance = (3.0, 48) if backend == "ffcv" else (MEAN_TOLERANCE, MAX_TOLERANCE)
    for a, b in zip(data.epoch(0), reference.epoch(0), strict=True):
        assert torch.equal(a.indices, b.indices)
        for view_a, view_b in zip(a[:3], b[:3]):
            diff = (view_a.int() - view_b.int()).abs()
            assert diff.float().mean() < mean_tolerance and diff.max() <= max_tolerance
    data.close()


def test_a_loader_spec_checks_its_fields_and_varies_by_but():
    from pipeline.loader import LoaderSpec

    spec = LoaderSpec("torchvision", 16, 8, torch.device("cpu"), train=False, workers=0)
    training = spec.but(train=True, seed=3, view_count=2)
    assert (training.train, training.seed, training.view_count, training.image_size, training.workers) == (
        True,
        3,
        2,
        16,
        0,
    )
    assert spec.train is False  # `but` makes a new spec
    for wrong, message in (
        ({"view_count": 4}, "views must be"),
        ({"eval_view": "side"}, "eval_view must be"),
        ({"interpolation": "nearest"}, "interpolation must be"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale must satisfy"),
        ({"rank": 2, "world": 2}, "rank 2 is not in a world of 2"),
    ):
        with pytest.raises(ValueError, match=message):
            spec.but(**wrong)
