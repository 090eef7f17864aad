import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import LOADERS, TINY_TRAIN

import train
from model.pairs import main, sampler_encoder
from pipeline.data import scan_split
from pipeline.semantic_pairs import band_pairs, pair_accuracy, read_pairs, sample_fraction


def brute_force(embeddings: torch.Tensor, low: float, high: float) -> list[tuple[int, int]]:
    sim = embeddings.double() @ embeddings.double().t()
    n = len(embeddings)
    return [(i, j) for i in range(n) for j in range(n) if i != j and low <= sim[i, j] <= high]


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_band_pairs_match_brute_force(block):
    embeddings = F.normalize(torch.randn(60, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    # Band edges halfway between neighbouring similarities: no rounding can move a pair across them.
    values = np.unique((embeddings.double() @ embeddings.double().t()).numpy().round(6))
    low, high = (values[100] + values[101]) / 2, (values[-40] + values[-39]) / 2
    got = band_pairs(embeddings, low, high, block)
    assert got.dtype == torch.int64 and [tuple(p) for p in got.tolist()] == brute_force(embeddings, low, high)


def test_band_edges_are_inclusive_and_the_diagonal_is_skipped():
    # Exact similarities: e0.e1 = 1, e0.e3 = e1.e3 = 0.5, e2.e3 = 0.75, e3.e3 = 0.8125 (the diagonal).
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.75]])
    got = [tuple(p) for p in band_pairs(embeddings, 0.5, 0.8125, block=3).tolist()]
    assert got == [(0, 3), (1, 3), (2, 3), (3, 0), (3, 1), (3, 2)]
    assert band_pairs(embeddings, 0.9, 0.95).shape == (0, 2)


def test_pair_accuracy_and_fraction():
    labels = np.array([0, 0, 1, 1, 2])
    assert pair_accuracy(np.array([[0, 1], [1, 2], [2, 3], [4, 0]]), labels) == 0.5
    assert pair_accuracy(np.zeros((0, 2), dtype=np.int64), labels) is None
    chosen = sample_fraction(1000, 0.1, seed=1)
    assert len(chosen) == 100 and np.array_equal(chosen, np.unique(chosen))
    assert np.array_equal(chosen, sample_fraction(1000, 0.1, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        sample_fraction(10, 1.5, 0)


def test_read_pairs_checks_what_it_reads(tmp_path):
    path = tmp_path / "pairs.npy"
    np.save(path, np.array([[0, 4], [4, 0]]))
    assert read_pairs(path, 5).tolist() == [[0, 4], [4, 0]]
    with pytest.raises(ValueError, match="outside"):
        read_pairs(path, 4)
    path.with_suffix(".json").write_text(json.dumps({"train_images": 6}))
    with pytest.raises(ValueError, match="same --data"):
        read_pairs(path, 5)
    np.save(tmp_path / "flat.npy", np.arange(4))
    with pytest.raises(ValueError, match="not \\(P, 2\\)"):
        read_pairs(tmp_path / "flat.npy", 5)


@pytest.mark.parametrize("loader", LOADERS)
def test_mining_cli_writes_pairs_and_report(tiny_checkpoint, tiny_data, data_for, tmp_path, loader):
    out = tmp_path / "pairs.npy"
    args = [
        "--checkpoint",
        tiny_checkpoint,
        "--data",
        data_for(loader),
        "--loader",
        loader,
        "--out",
        out,
        "--fraction",
        1,
        "--low",
        -2,
        "--high",
        2,
        "--block",
        5,
        "--workers",
        1,
        "--device",
        "cpu",
        "--amp",
        "off",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    pairs, report = np.load(out), json.loads(out.with_suffix(".json").read_text())
    n = 24  # every ordered pair of the 24 training images is in the band
    assert pairs.shape == (n * (n - 1), 2) and report["pairs"] == len(pairs) and report["images_embedded"] == n
    assert report["anchors_with_pairs"] == n and report["train_images"] == n
    labels = scan_split(tiny_data / "train").labels
    assert report["pair_accuracy"] == pytest.approx(np.mean(labels[pairs[:, 0]] == labels[pairs[:, 1]]))


@pytest.mark.parametrize("loader", LOADERS)
def test_sepp_trains_one_epoch_on_the_combined_set(data_for, tmp_path, loader):
    pairs = tmp_path / "pairs.npy"
    np.save(pairs, np.array([[0, 9], [9, 0], [3, 20], [12, 13], [1, 2], [5, 6], [7, 8], [10, 11]]))
    data = data_for(loader)
    args = [
        *TINY_TRAIN,
        "--loader",
        loader,
        "--method",
        "sepp",
        "--pairs",
        pairs,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--workers",
        1,
    ]
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "8 semantic pairs" in result.output and "final kNN top-1" in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == "sepp" and config["pairs"] == str(pairs)
    # 24 images + 8 pairs = 32 samples = 4 batches of 8 (the instances alone would be 3)
    assert "4/4" in result.output


def test_sepp_and_pairs_go_together(tiny_data, tmp_path):
    pairs = tmp_path / "pairs.npy"
    np.save(pairs, np.array([[0, 1]]))
    for args in (["--method", "sepp"], ["--method", "mocov2", "--pairs", pairs]):
        result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--data", tiny_data, *map(str, args)])
        assert result.exit_code != 0 and "--method sepp needs --pairs" in result.output
    np.save(pairs, np.array([[0, 99]]))
    result = CliRunner().invoke(train.main, [*TINY_TRAIN, "--data", tiny_data, "--method", "sepp", "--pairs", pairs])
    assert result.exit_code != 0 and "outside the 24 training images" in result.output


def test_random_init_embeds_with_untrained_weights(tiny_checkpoint, tiny_data, tmp_path):
    reports = []
    for flags in ([], ["--random-init"]):
        out = tmp_path / f"pairs{len(flags)}.npy"
        args = [
            "--checkpoint",
            tiny_checkpoint,
            "--data",
            tiny_data,
            "--loader",
            "torchvision",
            "--out",
            out,
            "--fraction",
            1,
            "--low",
            0.5,
            "--high",
            2,
            "--workers",
            0,
            "--device",
            "cpu",
            *flags,
        ]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(out.with_suffix(".json").read_text()))
    assert reports[0]["random_init"] is False and reports[0]["pretrain_epochs"] == 1
    assert reports[1]["random_init"] is True and reports[1]["pretrain_epochs"] == 0
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)  # the encoders below are on the CPU
    trained, fresh = sampler_encoder(state), sampler_encoder(state, random_init=True, seed=3)
    weight = "backbone.conv1.weight"
    assert torch.equal(trained.state_dict()[weight], state["model"][f"query_encoder.{weight}"])
    assert not torch.equal(fresh.state_dict()[weight], trained.state_dict()[weight])
    assert torch.equal(
        fresh.state_dict()[weight], sampler_encoder(state, random_init=True, seed=3).state_dict()[weight]
    )
