"""train.py's step settings: batch norm by topology, --compile's wiring, the CUDA switches."""

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train
from model import training
from model.backbone import SplitBatchNorm


def defaults(**overrides) -> dict:
    options = {p.name: p.default for p in train.main.params if p.name not in ("resume", "help")}
    return train.resolve({**options, **overrides})


def test_bn_splits_default_follows_the_number_of_processes(monkeypatch):
    assert defaults().model.bn_splits == 8  # one process: split BN stands in for shuffle BN
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert defaults().model.bn_splits == 1  # torchrun: plain BN, keys shuffled across the ranks
    assert defaults(bn_splits=4).model.bn_splits == 4  # given: kept
    help_text = CliRunner().invoke(train.main, ["--help"]).output
    assert "8 with one process" in help_text and "1 under torchrun" in help_text


def test_compile_wraps_both_encoders_in_place():
    cfg = defaults(arch="resnet18", image_size=16, queue_size=64, batch_size=8)
    plain, _, _ = training.build(cfg, torch.device("cpu"))
    compiled, _, _ = training.build(cfg.replace(compile=True), torch.device("cpu"))
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    for encoder in (compiled.query_encoder, compiled.key_encoder):
        assert encoder._compiled_call_impl is not None
    assert plain.query_encoder._compiled_call_impl is None


@pytest.mark.gpu
def test_split_batch_norm_on_cuda_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    x = (2 + torch.randn(32, 16, 14, 14)).contiguous(memory_format=torch.channels_last)
    cpu = SplitBatchNorm(16, num_splits=8)
    gpu = SplitBatchNorm(16, num_splits=8).cuda()
    want = cpu(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(x.cuda().bfloat16())
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float().cpu(), want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gpu.running_mean.cpu(), cpu.running_mean, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_single_process_cuda_n_becomes_the_current_device(tiny_data, tmp_path):
    last = torch.cuda.device_count() - 1
    args = [*TINY_TRAIN, "--device", f"cuda:{last}", "--data", tiny_data, "--out", tmp_path / "run"]
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert torch.cuda.current_device() == last and torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "high"
