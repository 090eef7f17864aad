"""The run's settings as one typed object: defaults as train.py's options, config.json and checkpoints read back,
sectioned or flat or by CLI option name, unknown keys named, and old checkpoints' flat configs still resume."""

import json
from dataclasses import fields

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN

import train
from model.config import LEGACY, SECTIONS, Config, from_checkpoint, resolve


def cli_defaults() -> dict:
    return {p.name: p.default for p in train.main.params if p.name not in ("resume", "config_file", "help")}


def test_defaults_are_train_pys_options_and_every_option_is_a_setting():
    defaults = Config().to_dict()
    resolved_later = {"amp_auto", "world_size"}  # not options: set while resolving and training
    assert set(defaults) - resolved_later == set(cli_defaults())
    for name, default in cli_defaults().items():
        assert defaults[name] == (str(default) if name == "data" else default), name


def test_names_are_unique_across_sections_and_flat_and_nested_round_trip():
    names = [f.name for section in SECTIONS.values() for f in fields(section)]
    assert len(names) == len(set(names))
    cfg = resolve({**cli_defaults(), "device": "cpu", "lr": 0.5, "method": "mocov2", "data": "somewhere"})
    assert cfg.optimisation.lr == 0.5 and cfg.method.method == "mocov2" and cfg.data.data == "somewhere"
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(cfg.to_dict(nested=True)) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what config.json holds
    assert cfg.replace(compile=True).model.compile and not cfg.model.compile


def test_cli_option_names_and_partial_settings():
    cfg = Config.from_dict({"--train-limit": 5, "image-size": 16, "knn_bank": 3, "model": {"queue-size": 64}})
    assert (cfg.data.train_limit, cfg.data.image_size, cfg.run.knn_bank, cfg.model.queue_size) == (5, 16, 3, 64)
    assert cfg.optimisation.lr == Config().optimisation.lr  # not given: the default


@pytest.mark.parametrize(
    "values, named",
    [
        ({"--no-such-option": 1}, "'--no-such-option'"),
        ({"data": {"lr": 0.1}}, "'data.lr'"),
        ({"model": {"bogus": 1}}, "'model.bogus'"),
        ({"lr": 0.1, "optimisation": {"lr": 0.2}}, "'optimisation.lr' given twice"),
    ],
)
def test_unknown_or_repeated_keys_are_named(values, named):
    with pytest.raises(ValueError, match=named):
        Config.from_dict(values)


def test_an_old_checkpoints_flat_config_resumes(tiny_data, tmp_path):
    """A checkpoint from before the LEGACY options (and world_size, amp_auto) existed: a flat dict without them."""
    out = tmp_path / "run"
    args = [*TINY_TRAIN, "--method", "mocov2", "--data", tiny_data, "--out", out]
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    old = {k: v for k, v in state["config"].items() if k not in {*LEGACY, "world_size", "amp_auto"}}
    assert from_checkpoint({"config": old}).run.knn_bank == 0  # what those runs' monitor used: every image
    torch.save({**state, "config": old}, out / "checkpoint.pt")
    result = CliRunner().invoke(train.main, ["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["knn_bank"] == 0 and config["compile"] is False
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2
    torch.save({**state, "config": {**old, "bogus": 1}}, out / "checkpoint.pt")
    result = CliRunner().invoke(train.main, ["--resume", str(out / "checkpoint.pt")])
    assert result.exit_code == 1 and "unknown setting 'bogus'" in result.output
    assert isinstance(result.exception, SystemExit)  # one line, no traceback
