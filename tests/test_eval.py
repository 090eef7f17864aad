import json

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import LOADERS, tiny_loader
from torch import nn

import eval as evaluation
import pipeline.backends
from model.backbone import resnet
from model.evaluation import LinearProbe, fit_linear, topk_accuracy
from model.moco import MomentumContrast
from pipeline.backends import make_loader
from pipeline.crop_plan import center_crop, crop_plan, random_crop_test
from pipeline.data import balanced_fraction, scan_split, select

FAST = ["--batch-size", "8", "--workers", "0", "--amp", "off", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def run_eval(*args, ok: bool = True):
    result = CliRunner().invoke(evaluation.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize(
    "protocol, options, fields",
    [
        ("knn", ["--k", 5], {"k", "temperature"}),
        ("linear", ["--epochs", 2, "--cached-features"], {"epochs", "lr", "cached_features"}),
        ("linear", ["--epochs", 2, "--augmented"], {"epochs", "lr", "cached_features"}),
        ("finetune", ["--epochs", 2, "--fraction", 0.5], {"fraction", "labelled_images"}),
        ("crop-test", ["--epochs", 2, "--cached-features"], {"center_top1", "random_top1", "drop"}),
    ],
)
def test_each_protocol_runs_and_writes_its_json(checkpoint, tmp_path, protocol, options, fields):
    out = tmp_path / "result.json"
    output = run_eval(protocol, "--checkpoint", checkpoint, *FAST, *options, "--json", out).output
    result = json.loads(out.read_text())
    assert result["protocol"] == protocol and f"{protocol}: top-1" in output
    assert set(result) >= {"top1", "top5", "checkpoint", "method", "train_images", "val_images"} | fields
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert result["train_images"] == 24 and result["val_images"] == 12  # the checkpoint's data and limits
    if protocol == "crop-test":
        assert result["top1"] == result["center_top1"]
        assert result["drop"] == pytest.approx(result["center_top1"] - result["random_top1"])
    if protocol == "finetune":
        assert result["labelled_images"] == 12  # half of each of the 3 classes of 8


@pytest.mark.parametrize("loader", LOADERS[:2])  # torchvision: the tests above
def test_evaluation_runs_through_every_loader(checkpoint, data_for, tmp_path, loader):
    data = ["--data", data_for(loader)] if loader == "ffcv" else []
    common = ["--checkpoint", checkpoint, "--loader", loader, *data, "--batch-size", 8, "--workers", 1, "--amp", "off"]
    out = tmp_path / "result.json"
    # The crop test resizes bicubically, which FFCV's decoder cannot: the augmented probe runs there instead.
    protocol = "linear" if loader == "ffcv" else "crop-test"
    run_eval(protocol, *common, "--epochs", 1, "--augmented", "--json", out)
    result = json.loads(out.read_text())
    assert result["loader"] == loader and result["val_images"] == 12 and 0 <= result["top1"] <= 100
    if loader == "ffcv":
        refused = run_eval("crop-test", *common, "--epochs", 1, "--cached-features", ok=False)
        assert refused.exit_code == 1 and "crop-test resizes bicubically" in refused.output
        assert "use --loader dali or torchvision" in refused.output and "Traceback" not in refused.output


@pytest.mark.parametrize("protocol", ["linear", "finetune", "crop-test"])
def test_protocols_train_on_crops_of_scale_008_to_1_and_the_crop_test_scores_bicubic(
    checkpoint, tmp_path, monkeypatch, protocol
):
    """MoCo's main_lincls: RandomResizedCrop(scale=(0.08, 1)) for the supervised protocols' training images, not
    the pre-training crops' (0.2, 1); LeOCLR Table 7: the crop test's center and random crops resized bicubically.
    Every loader eval.py makes is recorded, and the windows of the training loader are checked."""
    made = []

    def recording(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        made.append(loader)
        return loader

    monkeypatch.setattr(pipeline.backends, "make_loader", recording)  # eval.py imports it where it is used
    options = ["--fraction", 0.5] if protocol == "finetune" else ["--augmented"]
    run_eval(protocol, "--checkpoint", checkpoint, *FAST, "--epochs", 1, *options)
    training = [loader for loader in made if loader.train]
    assert len(training) == 1 and training[0].crop_scale == (0.08, 1.0)
    scored = {loader.interpolation for loader in made if not loader.train}
    assert scored == {"bicubic" if protocol == "crop-test" else "bilinear"}
    loader = training[0]
    heights, widths = loader.images.heights, loader.images.widths
    windows = crop_plan(heights, widths, loader.seed, 0, views=1, scale=(0.08, 1.0))
    assert np.array_equal(loader.schedule(0).windows, windows[loader.schedule(0).order])
    # The plan's crops reach below the pre-training minimum: scale 0.08-1 is what the plan was asked for.
    many = crop_plan(np.full(4000, 400), np.full(4000, 400), 0, 0, views=1, scale=(0.08, 1.0))[:, 0]
    area = many[:, 2] * many[:, 3] / 400**2
    assert 0.075 < area.min() < 0.09 and (area < 0.2).mean() > 0.1


def test_bicubic_views_agree_between_backends_and_ffcv_refuses_them(tiny_data):
    """The crop test's views through DALI and torchvision: bicubic in both (each near the other's bicubic and
    far from its bilinear), and FFCV, which has only OpenCV's area filter, refuses to pretend."""
    images = scan_split(tiny_data / "train")
    views = {}
    for backend in ("dali", "torchvision"):
        for interpolation in ("bilinear", "bicubic"):
            loader = tiny_loader(
                backend, images, train=False, size=16, batch=24, eval_view="random", interpolation=interpolation
            )
            views[backend, interpolation] = next(iter(loader.epoch(0))).crop1.numpy().astype(int)
            loader.close()
    same = np.abs(views["dali", "bicubic"] - views["torchvision", "bicubic"]).mean()
    other = np.abs(views["dali", "bicubic"] - views["torchvision", "bilinear"]).mean()
    assert same < 0.5 and other > 1.0, (same, other)
    assert np.abs(views["torchvision", "bicubic"] - views["torchvision", "bilinear"]).mean() > 1.0
    with pytest.raises(ValueError, match="interpolation must be one of"):
        tiny_loader("torchvision", images, train=False, interpolation="lanczos")


@pytest.mark.ffcv
def test_ffcv_refuses_bicubic(data_for):
    from pipeline.backends import load_splits

    images = load_splits(data_for("ffcv"), "ffcv")[1]
    with pytest.raises(ValueError, match="cannot resize bicubic"):
        tiny_loader("ffcv", images, train=False, eval_view="center", interpolation="bicubic")


def test_knn_matches_the_training_monitor(checkpoint, tmp_path):
    """The standalone kNN is the monitor's protocol: same data, k and T give the logged top-1."""
    logged = json.loads((checkpoint.parent / "metrics.jsonl").read_text().splitlines()[-1])["knn_top1"]
    out = tmp_path / "knn.json"
    run_eval("knn", "--checkpoint", checkpoint, *FAST, "--k", 5, "--json", out)
    assert json.loads(out.read_text())["top1"] == pytest.approx(100 * logged, abs=1e-4)


def separable(n: int, classes: int = 4, dim: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(n) % classes
    return means[labels] + torch.randn(n, dim, generator=generator), labels


def test_linear_probe_learns_separable_features():
    features, labels = separable(800)
    probe = fit_linear(features[:600], labels[:600], 4, epochs=20, lr=0.1, batch_size=64)
    top1, _ = topk_accuracy(probe(features[600:]), labels[600:])
    assert top1 > 95


def test_linear_probe_stays_near_chance_on_shuffled_labels():
    features, labels = separable(800)
    shuffled = labels[:600][torch.randperm(600, generator=torch.Generator().manual_seed(1))]
    probe = fit_linear(features[:600], shuffled, 4, epochs=20, lr=0.1, batch_size=64)
    top1, _ = topk_accuracy(probe(features[600:]), labels[600:])
    assert 10 < top1 < 45  # chance is 25


def test_probe_is_linear_at_evaluation():
    probe = fit_linear(*separable(200), 4, epochs=2, lr=0.1, batch_size=50)
    x = torch.randn(5, 32)
    assert torch.allclose(probe(2 * x) - probe(x), probe(x) - probe(torch.zeros(1, 32)), atol=1e-4)
    assert isinstance(probe, LinearProbe) and not probe.training


def test_topk_accuracy_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(50, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
    expected = [
        100 * np.mean([int(labels[i]) in scores[i].argsort(descending=True)[:k].tolist() for i in range(50)])
        for k in (1, 5)
    ]
    assert topk_accuracy(scores, labels) == pytest.approx(expected)
    assert topk_accuracy(scores[:, :3], labels % 3)[1] == 100  # fewer classes than k


def test_balanced_fraction_takes_the_same_share_of_every_class():
    labels = np.repeat(np.arange(5), [100, 50, 200, 10, 40])
    keep = balanced_fraction(labels, 0.1, seed=3)
    assert np.bincount(labels[keep]).tolist() == [10, 5, 20, 1, 4]
    assert np.array_equal(keep, balanced_fraction(labels, 0.1, seed=3))
    assert not np.array_equal(keep, balanced_fraction(labels, 0.1, seed=4))
    assert np.array_equal(keep, np.unique(keep))
    with pytest.raises(ValueError, match="fraction"):
        balanced_fraction(labels, 0)


def test_select_keeps_images_and_labels_together(tiny_data):
    images = scan_split(tiny_data / "train")
    part = select(images, [0, 5, 20])
    assert part.paths == [images.paths[i] for i in (0, 5, 20)]
    assert part.labels.tolist() == images.labels[[0, 5, 20]].tolist() and part.classes == images.classes


def test_crop_windows_stay_inside_the_image():
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(10, 500, 300), rng.integers(10, 500, 300)
    for windows in (center_crop(heights, widths), random_crop_test(heights, widths, rng)):
        top, left, h, w = windows.T
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= heights).all() and (left + w <= widths).all()
    top, left, h, w = center_crop([100], [200], 0.5)[0]
    assert (top, left, h, w) == (25, 75, 50, 50)
    # Squashed-square crops: the area fraction of the image is RandomResizedCrop's, 0.08-1, mean ~0.54.
    area = (lambda t: t[:, 2] * t[:, 3] / (heights * widths))(random_crop_test(heights, widths, rng))
    assert 0.06 < area.min() and area.max() <= 1 and 0.45 < area.mean() < 0.62


@pytest.mark.parametrize("image_size", [16, 96])
def test_export_round_trips_into_torchvision(tmp_path, image_size):
    model = MomentumContrast("resnet18", image_size, queue_size=16, bn_splits=2)
    with torch.no_grad():  # non-trivial statistics, so a missed buffer would show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
    ckpt, out = tmp_path / "checkpoint.pt", tmp_path / "resnet.pth"
    torch.save({"model": model.state_dict(), "config": {"arch": "resnet18", "image_size": image_size}}, ckpt)
    output = run_eval("export", "--checkpoint", ckpt, "--out", out).output
    net = torchvision.models.resnet18()
    if image_size <= 64:
        assert "small-image stem" in output
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    missing, unexpected = net.load_state_dict(torch.load(out), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = nn.Identity()
    ours, _ = resnet("resnet18", image_size)
    ours.load_state_dict(torch.load(out))
    x = torch.randn(2, 3, image_size, image_size)
    assert torch.allclose(net.eval()(x), model.query_encoder.backbone.eval()(x), atol=1e-5)


def test_clear_errors(checkpoint, tiny_data, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    result = run_eval("knn", "--checkpoint", tmp_path / "notes.txt", ok=False)
    assert result.exit_code != 0 and "cannot read" in result.output
    no_val = tmp_path / "no-val"
    no_val.mkdir()
    (no_val / "train").symlink_to(tiny_data / "train")
    result = run_eval("knn", "--checkpoint", checkpoint, "--data", no_val, *FAST, ok=False)
    assert result.exit_code != 0 and "no val split" in result.output
    result = run_eval("finetune", "--checkpoint", checkpoint, "--fraction", 2, *FAST, ok=False)
    assert result.exit_code != 0 and "fraction" in result.output
    result = run_eval("--help")
    for protocol in ("knn", "linear", "finetune", "crop-test", "export"):
        assert protocol in result.output
