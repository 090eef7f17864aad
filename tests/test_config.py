"""The run's settings as one typed object: defaults as train.py's options, config.json and checkpoints read back,
sectioned or flat or by CLI option name, unknown keys named, and old checkpoints' flat configs still resume."""

import json
import os
from dataclasses import fields
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN, cli_defaults

import train
from model.config import LEGACY, SECTIONS, Config, from_checkpoint, read_file, resolve

ROOT = Path(__file__).resolve().parents[1]


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
    assert (
        cfg.optimisation.lr == 0.5 and cfg.method.method == "mocov2" and cfg.data.data == os.path.abspath("somewhere")
    )
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(cfg.to_dict(nested=True)) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # what config.json holds
    assert cfg.replace(compile=True).model.compile and not cfg.model.compile


def test_cli_option_names_and_partial_settings():
    cfg = Config.from_dict({"--train-limit": 5, "image-size": 16, "knn_bank": 3, "model": {"queue-size": 64}})
    assert (cfg.data.train_limit, cfg.data.image_size, cfg.run.knn_bank, cfg.model.queue_size) == (5, 16, 3, 64)
    assert cfg.optimisation.lr == Config().optimisation.lr  # not given: the default
    # Names are unique across sections: a setting under another section than its own is still that setting.
    assert Config.from_dict({"data": {"lr": 0.1}, "model": {"epochs": 3}}).optimisation.lr == 0.1


@pytest.mark.parametrize(
    "values, named",
    [
        ({"--no-such-option": 1}, "'--no-such-option'"),
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


def run_cli(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def test_a_yaml_file_sets_options_and_the_command_line_overrides_it(tiny_data, tmp_path):
    """Keys with dashes or underscores, flat or in sections, typed by their options (YAML 1.1 reads 1e-4 as a
    string); an option on the command line wins over the file, the file over the defaults."""
    settings = tmp_path / "run.yaml"
    settings.write_text(
        "method: mocov2\nweight-decay: 1e-4\n--knn-temperature: 0.2\noptimisation:\n  lr: 0.05\n  epochs: 3\n"
        f"data: {tiny_data}\nrun:\n  out: {tmp_path / 'from-file'}\n"
    )
    result = run_cli(*TINY_TRAIN, "--config", settings, "--lr", 0.02)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "from-file" / "config.json").read_text())
    assert config["method"] == "mocov2" and config["weight_decay"] == 1e-4 and config["knn_temperature"] == 0.2
    assert config["lr"] == 0.02 and config["epochs"] == 1  # given on the command line (TINY_TRAIN's --epochs 1)
    assert config["data"] == str(tiny_data)


def test_a_runs_config_json_trains_that_run_again(tiny_data, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    result = run_cli(*TINY_TRAIN, "--method", "mocov2", "--data", tiny_data, "--out", first)
    assert result.exit_code == 0, result.output
    result = run_cli("--config", first / "config.json", "--out", again)
    assert result.exit_code == 0, result.output
    before, after = (json.loads((run / "config.json").read_text()) for run in (first, again))
    assert {**before, "out": str(again)} == after
    weights = [torch.load(run / "checkpoint.pt", weights_only=False)["model"] for run in (first, again)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_runs_results_are_not_read_as_settings(tmp_path):
    recorded = {**Config().to_dict(), "amp": "bf16", "amp_auto": "bf16: faster here", "world_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    values = read_file(tmp_path / "config.json")
    assert values["amp"] == "auto" and "amp_auto" not in values and "world_size" not in values  # chosen again
    (tmp_path / "forced.json").write_text(json.dumps({"amp": "off", "amp_auto": None, "lr": 1e-05}))
    assert read_file(tmp_path / "forced.json") == {"amp": "off", "lr": 1e-05}


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning-rate: 0.1\n", "unknown setting 'learning-rate'"),
        ("data:\n  lrr: 0.1\n", "unknown setting 'data.lrr' (did you mean lr?); settings by section"),
        ("", "holds no settings (it is empty)"),
        ("{}\n", "holds no settings"),
        ("epochs: 1.7\n", "epochs: 1.7 is not a whole number"),
        ("epochs: true\n", "epochs: True is not a whole number"),
        ("lr: .nan\n", "lr: must be a finite number, not nan"),
        ("loader: nvjpeg\n", "loader: 'nvjpeg' is not one of"),
        ("epochs: -1\n", "epochs: -1 is not in the range x>=1"),
        ("resume: runs/x/checkpoint.pt\n", "unknown setting 'resume'"),
        ("- lr\n- 0.1\n", "must hold a mapping of option names to values"),
        ("lr: [0.1\n", "cannot read"),
    ],
)
def test_bad_config_files_are_one_line_errors_naming_the_file_and_key(tmp_path, text, message):
    settings = tmp_path / "bad.yaml"
    settings.write_text(text)
    result = run_cli("--config", settings, "--data", tmp_path / "none")  # were the file read, no run would start
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert str(settings) in result.output and message in result.output, result.output


def test_the_shipped_imagenet_config_is_the_papers_recipe():
    values = train.read_options(click.Context(train.main), ROOT / "configs" / "imagenet.yaml")
    cfg = resolve({**cli_defaults(), **values, "device": "cpu"})
    recipe = dict(arch="resnet50", image_size=224, batch_size=256, lr=0.03, moco_momentum=0.999, queue_size=65536)
    recipe.update(temperature=0.2, weight_decay=1e-4, epochs=200, train_limit=0, val_limit=0, blur=True)
    recipe.update(loss_terms="sum")  # Eq. 3, at the paper's lr
    assert {k: cfg.to_dict()[k] for k in recipe} == recipe
    assert cfg.data.loader == "dali" and cfg.method.method == "leoclr"
    assert "--config configs/imagenet.yaml" in (ROOT / "README.md").read_text()


def test_the_training_page_lists_each_sections_settings():
    from model.config import RESULTS

    text = (ROOT / "docs" / "training.md").read_text()
    for name, kind in SECTIONS.items():
        settings = ", ".join(f.name for f in fields(kind) if f.name not in RESULTS)
        assert f"| `{name}` | {settings} |" in text, name


# Flags named as a setting whose meaning in that script differs from train.py's (their own type or choices).
OWN_MEANING = {
    ("eval export", "out"),  # a file each
    ("pairs", "out"),
    ("quality", "out"),
    ("loaders", "device"),  # auto, cpu or cuda
    ("doctor", "data"),  # an ImageNet-layout folder to sample
    ("doctor", "method"),  # the two it diagnoses
    ("doctor", "workers"),
    ("loaders", "data"),
    ("loaders", "workers"),
    ("train_step", "data"),  # must exist
    ("train_step", "workers"),
    ("queue_staleness", "amp"),  # the precisions it compares
    ("forward_boxes", "amp"),
    ("forward_boxes", "knn_every"),  # 0: only after the last epoch
    ("convert", "workers"),  # writer processes
    ("convert", "out"),  # the .beton file or folder (an argument)
    ("views", "out"),  # the PNG
    ("fashion_mnist", "out"),  # the data the scripts below write: folders, and the seed of their images
    ("scattered", "out"),
    ("scattered", "seed"),
    ("photos", "out"),
    ("photos", "seed"),
    ("photos", "workers"),  # processes writing images
}


def test_the_scripts_take_the_flags_they_share_with_train_py_from_its_settings():
    """A flag of eval.py, model.pairs, pipeline's CLIs or a benchmark named as one of train.py's settings has that
    setting's flags (and maybe an older alias), type and choices (model/config.py builds both), unless its
    meaning there differs (listed)."""
    import eval
    from benchmarks import (
        doctor,
        forward_boxes,
        loaders,
        photos,
        quality,
        queue_staleness,
        same_results,
        scattered,
        train_step,
    )
    from model import pairs
    from pipeline import convert, fashion_mnist, views

    commands = {f"eval {name}": command for name, command in eval.main.commands.items()}
    scripts = (pairs, convert, views, fashion_mnist, doctor, forward_boxes, loaders, photos, quality)
    for module in (*scripts, queue_staleness, same_results, scattered, train_step):
        commands[module.__name__.rpartition(".")[2]] = module.main
    trains = {param.name: param for param in train.main.params if param.name not in train.NOT_SETTINGS}
    shared = 0
    for label, command in commands.items():
        for param in command.params:
            if param.name in trains and (label, param.name) not in OWN_MEANING:
                declared = trains[param.name]
                assert param.opts[0] == declared.opts[0] and set(declared.opts) <= set(param.opts), label
                assert param.secondary_opts == declared.secondary_opts, label
                assert type(param.type) is type(declared.type), (label, param.name)
                assert vars(param.type) == vars(declared.type), (label, param.name)
                shared += 1
    assert shared >= 50  # eval's eleven in each of four protocols, model.pairs' and the benchmarks'
    flags = {(label, param.name) for label, command in commands.items() for param in command.params}
    assert OWN_MEANING <= flags  # every exception still names a flag of a script


def test_help_gives_each_range_and_none_for_an_unbounded_whole_number():
    text = CliRunner().invoke(train.main, ["--help"], terminal_width=200).output
    assert "[default: 8; x>=1]" in text and "[default: 0]" in text  # --epochs, --seed
    assert "None" not in text  # click's "x<=None" for --seed
