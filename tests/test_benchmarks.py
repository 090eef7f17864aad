"""The benchmark scripts run end to end on tiny data and write what they promise. No timing is checked."""

import json

import pytest
from click.testing import CliRunner

from benchmarks import loaders, train_step


@pytest.mark.ffcv
def test_loaders_benchmark_writes_every_requested_row(tiny_data, tiny_beton, tmp_path):
    out, picture = tmp_path / "loaders.json", tmp_path / "loaders.png"
    args = [
        "--data",
        tiny_data,
        "--ffcv-data",
        tiny_beton,
        "--image-size",
        16,
        "--batch-size",
        8,
        "--passes",
        2,
        "--loader",
        "decode-only-ffcv",
        "--loader",
        "official-torchvision",
        "--loader",
        "dali",
        "--views",
        1,
        "--views",
        3,
        "--crop",
        "random",
        "--crop",
        "ccrop",
        "--json",
        out,
        "--plot",
        picture,
    ]
    result = CliRunner().invoke(loaders.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["loader"], r.get("views"), r["crop"]) for r in rows] == [
        ("decode-only-ffcv", None, "random"),
        ("official-torchvision", 1, "random"),
        ("official-torchvision", 3, "random"),
        ("dali", 1, "random"),
        ("dali", 1, "ccrop"),
        ("dali", 3, "random"),
        ("dali", 3, "ccrop"),
    ]
    assert "views" not in rows[0]  # decode only
    for r in rows:
        assert r["images_per_sec"] > 0 and r["peak_rss_mb"] > 0 and len(r["images_per_sec_passes"]) == 2
        assert len(r["rss_after_pass_mb"]) == 3  # the warm-up pass and two timed ones
        assert r["images"] == 24  # the tiny train split, whole batches of 8
    assert picture.stat().st_size > 0
    assert "official-torchvision" in result.output


def test_loaders_benchmark_reports_a_failed_configuration_and_goes_on(tiny_data, tmp_path):
    out = tmp_path / "loaders.json"
    args = [
        "--data",
        tiny_data,
        "--ffcv-data",
        tmp_path,
        "--image-size",
        16,
        "--batch-size",
        8,
        "--passes",
        1,
        "--loader",
        "ffcv",
        "--loader",
        "decode-only-pil",
        "--views",
        1,
        "--crop",
        "random",
        "--json",
        out,
    ]
    result = CliRunner().invoke(loaders.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert "error" in rows[0] and "train.beton" in rows[0]["error"] and "FAILED" in result.output
    assert rows[1]["loader"] == "decode-only-pil" and rows[1]["images_per_sec"] > 0


def test_train_step_benchmark_writes_both_methods_ratios_and_the_yardstick(tiny_data, tmp_path):
    out = tmp_path / "train_step.json"
    args = [
        "--loader",
        "torchvision",
        "--data",
        tiny_data,
        "--image-size",
        16,
        "--batch-size",
        8,
        "--steps",
        1,
        "--warmup",
        0,
        "--rounds",
        1,
        "--workers",
        1,
        "--yardstick",
        "--no-color-jitter",
        "--json",
        out,
    ]
    result = CliRunner().invoke(train_step.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # The steps' augmentation is train.py's (augment_config): without jitter, with grayscale.
    assert (report["config"]["color_jitter"], report["config"]["grayscale"]) == (False, True)
    for key in (
        "mocov2_images_per_sec",
        "leoclr_images_per_sec",
        "mocov2_compute_only_images_per_sec",
        "leoclr_compute_only_images_per_sec",
        "ratio",
        "compute_only_ratio",
    ):
        assert report[key] > 0
    assert report["paper_ratio"] == 81 / 68 and report["device"]
    assert report["ratio"] == report["mocov2_images_per_sec"] / report["leoclr_images_per_sec"]
    # Units counted by torch's FLOP counter: LeOCLR's step is 5 forward passes' worth, MoCo-v2's 4 (the heads
    # and the loss add little at this size).
    assert report["yardstick_images_per_sec"] > 0 and report["unit_gflop_per_image"] > 0
    assert abs(report["leoclr_units"] - 5) < 0.25 and abs(report["mocov2_units"] - 4) < 0.25
    for name in ("leoclr", "mocov2"):
        bound = report["yardstick_images_per_sec"] * 3 / report[f"{name}_units"]
        assert report[f"{name}_bound_images_per_sec"] == pytest.approx(bound)
        fraction = report[f"{name}_compute_only_images_per_sec"] / bound
        assert report[f"{name}_fraction_of_bound"] == pytest.approx(fraction)
        assert f"{name}: {report[f'{name}_units']:.2f} units" in result.output


def test_loaders_report_names_a_decode_only_row_whose_memory_grew():
    # Decode-only rows carry no "views" key (see _child): the report's RSS line names them all the same.
    row = dict(loader="decode-only-dali", crop="random", images_per_sec=100.0, rss_after_pass_mb=[800, 891, 1005])
    lines = loaders.report([row, {**row, "loader": "dali", "views": 3, "rss_after_pass_mb": [900, 900, 901]}])
    assert lines == ["RSS grew 891 -> 1005 MiB over the timed passes: decode-only-dali - random"]
