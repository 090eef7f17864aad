import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train
from model import precision
from model.backbone import resnet


@pytest.mark.parametrize(
    "fp32, bf16, chosen, words",
    [(1.0, 0.5, "bf16", "2.0x as fast"), (1.0, 0.95, "off", "only 1.05x"), (1.0, 8.0, "off", "no native bf16")],
)
def test_cpu_auto_keeps_bf16_only_where_the_probe_finds_it_clearly_faster(monkeypatch, fp32, bf16, chosen, words):
    monkeypatch.setattr(precision, "time_precisions", lambda net, size: (fp32, bf16))
    amp, reason = precision.choose_amp(torch.device("cpu"), "resnet18", 32)
    assert amp == chosen and words in reason and "32 px" in reason


def test_cuda_auto_takes_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.choose_amp(torch.device("cuda"), "resnet50", 224)[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    amp, reason = precision.choose_amp(torch.device("cuda"), "resnet50", 224)
    assert amp == "fp16" and "gradient scaler" in reason


def test_forced_precision_is_kept_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "time_precisions", lambda *args: pytest.fail("probed a forced precision"))
    assert precision.resolve_amp("off", torch.device("cpu"), "resnet18", 32) == ("off", None)
    assert precision.resolve_amp("bf16", torch.device("cpu"), "resnet18", 32) == ("bf16", None)


def test_the_probe_times_a_copy_and_leaves_the_model_alone():
    backbone, _ = resnet("resnet18", 16, bn_splits=2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fp32, bf16 = precision.time_precisions(precision.probe_slice(backbone), 16, budget_s=0.05)
    assert fp32 > 0 and bf16 > 0
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in backbone.parameters())


def test_auto_is_recorded_with_its_reason_and_chosen_again_on_resume(tiny_data, tmp_path):
    args = [a for a in TINY_TRAIN if a not in ("--amp", "off")]
    out = tmp_path / "run"
    result = CliRunner().invoke(train.main, [*args, "--data", str(tiny_data), "--out", str(out), "--method", "mocov2"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["amp"] in ("bf16", "off") and "probe" in config["amp_auto"]
    assert "precision: " in result.output and "--amp auto" in result.output
    resumed = CliRunner().invoke(train.main, ["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "--amp auto" in resumed.output and json.loads((out / "config.json").read_text())["amp_auto"]
    forced = CliRunner().invoke(train.main, ["--resume", str(out / "checkpoint.pt"), "--epochs", "3", "--amp", "off"])
    assert forced.exit_code == 0, forced.output
    config = json.loads((out / "config.json").read_text())
    assert config["amp"] == "off" and config["amp_auto"] is None and "precision: fp32 (--amp)" in forced.output
