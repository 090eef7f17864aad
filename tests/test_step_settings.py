"""train.py's step settings: batch norm by topology, --compile's wiring, the CUDA switches."""

import json

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN, cli_defaults

import train
from benchmarks import train_step
from model.backbone import SplitBatchNorm
from model.config import resolve
from model.methods import method_for
from run import parts as run_parts
from run import step as run_step


def defaults(**overrides) -> dict:
    return resolve({**cli_defaults(), **overrides})


def test_bn_splits_default_follows_the_number_of_processes(monkeypatch):
    assert defaults().model.bn_splits == 8  # one process: split BN stands in for shuffle BN
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert defaults().model.bn_splits == 1  # torchrun: plain BN, keys shuffled across the ranks
    assert defaults(bn_splits=4).model.bn_splits == 4  # given: kept
    help_text = CliRunner().invoke(train.main, ["--help"]).output
    assert "8 with one process" in help_text and "1 under torchrun" in help_text


@pytest.mark.parametrize(
    "method, flags",
    [
        ("mocov2", {}),
        ("leoclr", {}),
        ("sepp", {"pairs": "pairs.npy"}),
        ("mocov2", {"symmetric": True}),
        ("leoclr", {"attract_all": True}),
    ],
)
def test_one_process_refuses_plain_bn_for_a_momentum_encoder_method(monkeypatch, method, flags):
    """One BN group in one process: the key shuffle changes nothing and query and key share statistics."""
    with pytest.raises(click.BadParameter, match="needs split batch norm") as refused:
        defaults(method=method, bn_splits=1, **flags)
    assert refused.value.param_hint == "--bn-splits"
    assert defaults(method=method, bn_splits=2, **flags).model.bn_splits == 2
    # A benchmark timing plain BN as a reference says so explicitly; training cannot.
    timed = resolve({**cli_defaults(), "method": method, "bn_splits": 1, **flags}, timing_only=True)
    assert timed.model.bn_splits == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: keys shuffled across them, plain BN is MoCo's
    assert defaults(method=method, bn_splits=1, **flags).model.bn_splits == 1


@pytest.mark.parametrize("method", ["simclr", "leoclr-e2e"])
def test_end_to_end_methods_may_use_plain_bn_in_one_process(method):
    # One group for every view of every image: positives share it no more than negatives (SimCLR's global BN).
    assert defaults(method=method, bn_splits=1).model.bn_splits == 1


def test_train_refuses_and_the_step_benchmark_times_plain_bn_in_one_process(tiny_data, tmp_path):
    refused = CliRunner().invoke(train.main, [*TINY_TRAIN, "--bn-splits", "1", "--data", str(tiny_data)])
    assert refused.exit_code == 2 and "needs split batch norm" in refused.output and "Traceback" not in refused.output
    out = tmp_path / "step.json"
    args = ["--loader", "torchvision", "--data", tiny_data, "--image-size", 16, "--batch-size", 8, "--bn-splits", 1]
    args += ["--steps", 1, "--warmup", 0, "--rounds", 1, "--workers", 1, "--amp", "off", "--json", out]
    timed = CliRunner().invoke(train_step.main, [str(a) for a in args])
    assert timed.exit_code == 0, timed.output
    assert json.loads(out.read_text())["config"]["bn_splits"] == 1


def test_compile_wraps_both_encoders_in_place():
    cfg = defaults(arch="resnet18", image_size=16, queue_size=64, batch_size=8)
    plain, _, _ = run_parts.build(cfg, torch.device("cpu"))
    compiled, _, _ = run_parts.build(cfg.replace(compile=True), torch.device("cpu"))
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


@pytest.mark.parametrize(("method", "terms"), [("leoclr", 2), ("mocov2", 1), ("leoclr --attract-all", 3)])
def test_loss_terms_mean_divides_the_loss_and_its_gradient_by_the_methods_terms(method, terms):
    name, _, flag = method.partition(" --")
    results = {}
    for mode in ("sum", "mean"):
        cfg = defaults(
            method=name, attract_all=flag == "attract-all", loss_terms=mode, batch_size=8, bn_splits=2, queue_size=16
        )
        cfg.optimisation.amp = "off"
        torch.manual_seed(0)
        model, optimizer, scaler = run_parts.build(cfg, torch.device("cpu"))
        views = {view: torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i, view in
                 enumerate(("original", "crop1", "crop2"))}  # fmt: skip
        chosen = method_for(name, attract_all=flag == "attract-all")
        loss = run_step.training_step(model, chosen, optimizer, scaler, views, cfg, torch.Generator().manual_seed(0))
        results[mode] = loss, [p.grad.clone() for p in model.query_encoder.parameters()]
    assert results["mean"][0] == pytest.approx(results["sum"][0].item() / terms, rel=1e-6)
    for mean, total in zip(results["mean"][1], results["sum"][1], strict=True):
        torch.testing.assert_close(mean, total / terms, rtol=1e-4, atol=1e-7)
