"""The doctor (benchmarks/doctor.py) and the GPU script (benchmarks/gpu_check.sh) on the CPU, at tiny sizes: the
verdict follows from the measured numbers, and the script's phases write what they promise. No timing is checked."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from benchmarks import doctor
from pipeline.backends import BACKENDS
from pipeline.loader import machine_workers

ROOT = Path(__file__).resolve().parents[1]


def ffcv_imports() -> bool:
    try:
        import ffcv  # noqa: F401
    except Exception:  # missing, or hidden by a package that raises ImportError
        return False
    return True


def slow_verdict(compute, end_to_end, alone, rows, keep_up) -> dict:
    """decide() spelled out: a loop over the rows instead of min/max."""
    loader_bound = end_to_end / compute < keep_up
    needed = compute * alone / end_to_end if alone > end_to_end else compute
    fix, best = None, None
    for row in rows:
        if best is None or row["images_per_sec"] > best["images_per_sec"]:
            best = row
        if not loader_bound or row["images_per_sec"] < needed:
            continue
        fewer = fix is None or row["workers"] < fix["workers"]
        if fewer or row["workers"] == fix["workers"] and row["images_per_sec"] > fix["images_per_sec"]:
            fix = row
    cause = None if not loader_bound else "loader too slow" if alone < compute else "loader and step compete"
    return {
        "bound": "loader" if loader_bound else "compute",
        "cause": cause,
        "fix": fix,
        "best": best,
        "needed": needed,
    }


def test_verdict_matches_a_slow_reference_on_random_rates():
    rng = np.random.default_rng(0)
    bounds = set()
    for _ in range(500):
        compute, keep_up = float(rng.uniform(10, 1000)), float(rng.choice([0.5, 0.9, 0.99]))
        end_to_end, alone = compute * float(rng.uniform(0.2, 1.1)), compute * float(rng.uniform(0.3, 3.0))
        rows = [
            {
                "loader": str(rng.choice(BACKENDS)),
                "workers": int(rng.choice([1, 2, 4, 8, 16])),
                "images_per_sec": compute * float(rng.uniform(0.2, 4.0)),
            }
            for _ in range(rng.integers(1, 7))
        ]
        got, want = (
            doctor.decide(compute, end_to_end, alone, rows, keep_up),
            slow_verdict(compute, end_to_end, alone, rows, keep_up),
        )
        keys = ("bound", "cause", "fix", "best")
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
        assert np.isclose(got["needed_loader_images_per_sec"], want["needed"])
        assert got["loader_bound_percent"] == round(max(0.0, 100 * (1 - end_to_end / compute)), 1)
        bounds.add((got["bound"], got["cause"], got["fix"] is None))
    assert len(bounds) == 5  # compute-bound; each cause with and without a fix


def test_verdict_names_the_fewest_workers_that_feed_the_step():
    rows = [{"loader": "dali", "workers": w, "images_per_sec": r} for w, r in ((1, 400.0), (2, 700.0), (4, 1300.0))]
    rows.append({"loader": "ffcv", "workers": 2, "images_per_sec": 1250.0})
    # The training loader (dali, 2 workers) delivers 700 alone and 600 while training: 1000 x 700 / 600 needed.
    verdict = doctor.decide(1000.0, 600.0, 700.0, rows, 0.9)
    assert verdict["bound"] == "loader" and verdict["cause"] == "loader too slow"
    assert verdict["loader_bound_percent"] == 40.0 and verdict["fix"] == rows[3]  # 1250 >= 1166.7 with 2 workers
    assert doctor.decide(1000.0, 950.0, 700.0, rows, 0.9)["fix"] is None  # compute-bound: nothing to fix
    competing = doctor.decide(1000.0, 600.0, 1300.0, rows, 0.9)  # enough alone (1300), not while training
    assert competing["cause"] == "loader and step compete" and competing["fix"] is None
    assert competing["best"] == rows[2]


def test_tiny_doctor_measures_every_backend_and_its_verdict_follows_from_its_numbers(tmp_path):
    out, work = tmp_path / "doctor.json", tmp_path / "work"
    args = ["--tiny", "--sweep", "--budget-s", "300", "--work-dir", work, "--json", out]
    result = CliRunner().invoke(doctor.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["data"]["images"] == 24 and report["data"]["source"] in ("synthetic", "mate-backgrounds")
    assert len(list(work.glob("jpeg-24-seed0-tiny/train/*/*.jpg"))) == 24
    assert report["config"]["arch"] == "resnet18" and report["config"]["image_size"] == 32 and report["views"] == 3
    rows = report["backends"]
    assert set(rows) == set(BACKENDS)
    for name, row in rows.items():
        runs = name != "ffcv" or ffcv_imports()
        assert ("images_per_sec" in row) == runs and ("error" in row) != runs, row
        if runs:
            assert row["images_per_sec"] > 0 and row["steps"] >= 3 and row["workers"] == machine_workers()
    compute, e2e = report["compute_only_images_per_sec"], report["end_to_end"]
    assert compute > 0 and e2e["images_per_sec"] > 0 and e2e["loader"] == "dali" and e2e["workers"] == machine_workers()
    running = {name: row for name, row in rows.items() if "images_per_sec" in row}
    fastest = max(running, key=lambda name: running[name]["images_per_sec"])
    swept = [(fastest, w) for w in (1, 2) if w != machine_workers()]  # tiny mode: 1 and 2 workers, less the one run
    assert [(r["loader"], r["workers"]) for r in report["sweep"]] == swept and report["sweep_stopped"] is None
    measured = [
        {k: r[k] for k in ("loader", "workers", "images_per_sec")} for r in [*running.values(), *report["sweep"]]
    ]
    verdict = report["verdict"]
    again = doctor.decide(compute, e2e["images_per_sec"], rows["dali"]["images_per_sec"], measured, 0.9)
    assert {k: verdict[k] for k in again} == again
    if verdict["bound"] == "compute":
        assert verdict["lines"][0].startswith("compute-bound") and report["confirmed"] is None
    else:
        assert verdict["lines"][0].startswith(f"loader-bound by {verdict['loader_bound_percent']:.0f}%")
        if verdict["fix"] is None:
            assert report["confirmed"] is None
        else:
            assert {k: report["confirmed"][k] for k in ("loader", "workers")} == {
                k: verdict["fix"][k] for k in ("loader", "workers")
            }
    assert "loader only" in result.output and result.output.startswith("[")


def test_doctor_names_a_backend_that_does_not_run_and_trains_with_one_that_does(tiny_data, tmp_path):
    out, empty = tmp_path / "doctor.json", tmp_path / "no-beton"
    empty.mkdir()
    args = [
        "--tiny",
        "--image-size",
        "16",
        "--data",
        tiny_data,
        "--images",
        "16",
        "--method",
        "mocov2",
        "--backends",
        "torchvision",
        "--backends",
        "ffcv",
        "--ffcv-data",
        empty,
        "--loader",
        "ffcv",
        "--no-sweep",
        "--json",
        out,
    ]
    result = CliRunner().invoke(doctor.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["backends"]["ffcv"]["error"] and "ffcv" in result.output and "does not run" in result.output
    assert report["end_to_end"]["loader"] == "torchvision" and "--loader ffcv does not run here" in result.output
    assert report["views"] == 2 and report["data"]["images"] == 16 and report["data"]["source"].startswith("given")
    assert report["sweep"] == [] and report["verdict"]["bound"] in ("compute", "loader")


def run_phase(phase: str, out: Path, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", phase, "--small"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_gpu_script_phases_run_on_the_cpu_at_tiny_sizes(tmp_path):
    work, ffcv = tmp_path / "work", ffcv_imports()
    torch_out, dali_out = tmp_path / "torch", tmp_path / "dali"
    done = run_phase("torch", torch_out, work)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    log = (torch_out / "gpu-check-torch.log").read_text()
    assert log.startswith("gpu_check.sh torch --small") and "\nGPU: " in log and "NO CUDA here" in log
    summary = json.loads((torch_out / "summary-torch.json").read_text())
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    expected = ["kit", "versions", "photos", *(["convert"] if ffcv else []), "pytest", "doctor", "train_step"]
    assert list(statuses) == expected and statuses["kit"].startswith("skipped")
    assert all(statuses[s] in ("ok", "no tests") for s in expected[1:]), statuses
    report = json.loads((torch_out / "doctor-torch.json").read_text())
    assert set(report["backends"]) == ({"torchvision", "ffcv"} if ffcv else {"torchvision"})
    assert report["end_to_end"]["loader"] == ("ffcv" if ffcv else "torchvision") and report["verdict"]["lines"]
    step = json.loads((torch_out / "train_step.json").read_text())
    assert step["leoclr_compute_only_images_per_sec"] > 0 and step["loader"] == report["end_to_end"]["loader"]
    assert (torch_out / "pytest-torch.xml").is_file() and len(list(torch_out.iterdir())) <= 8

    done = run_phase("dali", dali_out, work)  # the next call on the same host: the data is still there
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    log = (dali_out / "gpu-check-dali.log").read_text()
    assert "data: reusing" in log
    summary = json.loads((dali_out / "summary-dali.json").read_text())
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(statuses) == ["kit", "versions", "pytest", "doctor"] and statuses["pytest"] == "ok", statuses
    report = json.loads((dali_out / "doctor-dali.json").read_text())
    assert set(report["backends"]) == {"dali"}  # FFCV beside it only at full size
    decode = "mixed decode" if torch.cuda.is_available() else "cpu decode"
    assert report["end_to_end"]["loader"] == "dali" and report["backends"]["dali"]["note"] == decode
    # The gpu-marked DALI tests ran: skipped here with their reason, passed on a GPU.
    dali_tests = len(re.findall(r"^def test_dali\w*\(", (ROOT / "tests" / "test_gpu.py").read_text(), re.M))
    counts = re.findall(r"(\d+) (?:passed|skipped)", log)
    assert dali_tests >= 3 and sum(map(int, counts)) >= dali_tests, log
