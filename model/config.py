"""A run's settings as one typed object, `Config`, in sections: data, model, method, optimisation, run.

Every field is named as train.py's option (`--train-limit` -> `cfg.data.train_limit`) and defaults to that
option's default (tests/test_config.py checks they agree). config.json and a checkpoint's "config" hold
`to_dict()`, flat; `Config.from_dict` reads that back, a sectioned dict, or CLI option names ("--train-limit",
"train-limit"), and stops at an unknown key, naming it. `resolve` fills the automatic defaults and checks the
combinations of a run's options. `read_file` reads a YAML settings file or a run's config.json (train.py --config).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from model.methods import method_for
from pipeline.ccrop import alpha_for
from pipeline.device import resolve_device


@dataclass
class DataConfig:
    """What is read, by which loader backend, at which resolution S."""

    data: str = "data/fashion-mnist"
    labels: str = "auto"  # class folders, none, or auto (class folders when every image is one folder down)
    val_data: str | None = None  # a labelled folder for the kNN monitor: VAL_DATA/train the bank, VAL_DATA/val queries
    loader: str = "dali"
    train_limit: int = 2000
    val_limit: int = 2000
    skip_bad: bool = False
    verify: bool = False  # a full decode of every image before training (cached)
    workers: int | None = None  # None: this process's share of the cores, less one
    image_size: int = 16


@dataclass
class ModelConfig:
    """The encoders, the momentum and the queue."""

    arch: str = "resnet18"
    bn_splits: int | None = None  # None: by topology, set by `resolve`
    queue_size: int = 1024
    moco_momentum: float = 0.99
    compile: bool = False


@dataclass
class MethodConfig:
    """The objective and its variants, the crops and the augmentation."""

    method: str = "leoclr"
    symmetric: bool = False
    attract_all: bool = False
    original: str = "whole"
    pairs: str | None = None
    temperature: float = 0.1
    loss_terms: str = "sum"  # sum: the paper's Eq. 3; mean: the method's InfoNCE terms averaged
    crop: str = "random"
    ccrop_k: float = 0.1
    ccrop_alpha: float | None = None  # None: by image size (pipeline/ccrop.py alpha_for), set by `resolve`
    ccrop_warmup: int | None = None  # None: 20% of the epochs, set by `resolve`
    ccrop_interval: int | None = None
    ccrop_boxes: str = "pass"  # pass: the reference's localisation pass; forward: from LeOCLR's training forward
    blur: bool | None = None  # None: on when S > 64, set by `resolve`
    color_jitter: bool = True
    grayscale: bool = True


@dataclass
class OptimisationConfig:
    """Epochs, batch, SGD and precision."""

    epochs: int = 6
    batch_size: int = 64  # global: split over torchrun's processes
    lr: float = 0.03
    warmup_epochs: float = 0.0
    weight_decay: float = 5e-4
    amp: str = "auto"  # the precision chosen (training settles "auto")
    amp_auto: str | None = None  # why "auto" chose it; None when --amp forced it


@dataclass
class RunConfig:
    """Where the run writes, on which device, its seed and processes, and the kNN monitor."""

    out: str | None = None  # None: runs/<method>-<loader>, set by `resolve`
    device: str = "auto"
    seed: int = 0
    world_size: int = 1  # torchrun's processes, set by `resolve`
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_every: int = 1
    knn_bank: int = 131_072
    tensorboard: bool | None = None  # None: on when the tensorboard package imports


@dataclass
class Config:
    """A run's settings. Sections as attributes (`cfg.optimisation.lr`); option names are unique across them."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """The settings in `values`: flat ({"train_limit": 0}), sectioned ({"data": {"train_limit": 0}}), or by
        CLI option name ("--train-limit", "train-limit"), mixed as they come; settings not given keep their
        defaults. ValueError naming a key that is no setting, or a setting given twice."""
        given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}

        def put(key: str, value: Any, section: str | None = None) -> None:
            name = key.lstrip("-").replace("-", "_")
            where = f"{section}.{key}" if section else key
            if name not in SECTION_OF:
                raise ValueError(f"unknown setting {where!r}")
            if section is not None and SECTION_OF[name] != section:
                raise ValueError(f"unknown setting {where!r}: {name} is in section {SECTION_OF[name]}")
            if name in given[SECTION_OF[name]]:
                raise ValueError(f"setting {where!r} given twice")
            given[SECTION_OF[name]][name] = value

        for key, value in values.items():
            if key in SECTIONS and isinstance(value, Mapping):  # "data" and "method" are settings too: a str there
                for inner, setting in value.items():
                    put(inner, setting, key)
            else:
                put(key, value)
        return cls(**{name: SECTIONS[name](**settings) for name, settings in given.items()})

    def to_dict(self, nested: bool = False) -> dict[str, Any]:
        """Flat {option name: value} (what config.json and checkpoints hold), or {section: {name: value}}."""
        sections = {name: vars(getattr(self, name)).copy() for name in SECTIONS}
        return sections if nested else {k: v for settings in sections.values() for k, v in settings.items()}

    def replace(self, **changes: Any) -> Config:
        """A copy with the settings `changes` (flat names) changed."""
        return Config.from_dict({**self.to_dict(), **changes})


SECTIONS = {f.name: f.default_factory for f in fields(Config)}
SECTION_OF = {setting.name: name for name, kind in SECTIONS.items() for setting in fields(kind)}
# Settings added after the first checkpoints were written, with the value those runs trained with.
LEGACY = {
    "pairs": None,
    "symmetric": False,
    "attract_all": False,
    "original": "whole",
    "color_jitter": True,
    "grayscale": True,
    "skip_bad": False,
    "verify": False,
    "knn_every": 1,
    "knn_bank": 0,
    "compile": False,
    "ccrop_boxes": "pass",
    "loss_terms": "sum",
}


# What a run's config.json records that are results of the run, not settings: ignored when it is read as
# settings (`read_file`); amp_auto says that amp was chosen by "auto", which chooses again.
RESULTS = ("amp_auto", "world_size")


def read_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML file (keys: train.py's options, with dashes or underscores, flat or in the sections
    of `Config`) or in a run's config.json, flat by setting name. The run's results (`RESULTS`) are dropped, amp
    going back to "auto" when "auto" chose it. ValueError naming the file and what is wrong: unreadable, not a
    mapping, or a key that is no setting (with the closest setting names)."""
    import yaml

    path = Path(path)
    try:  # JSON by its own parser: PyYAML (YAML 1.1) reads JSON's 1e-05 as a string
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"cannot read {path} as {kind}: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path} must hold a mapping of option names to values, not a {type(values).__name__}")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        section = key if key in SECTIONS and isinstance(value, Mapping) else None
        for name, setting in value.items() if section else [(key, value)]:
            setting_name = str(name).lstrip("-").replace("-", "_")
            where = f"{section}.{name}" if section else name
            if setting_name not in SECTION_OF:
                close = difflib.get_close_matches(setting_name, list(SECTION_OF), n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(f"{path}: unknown setting {where!r}{hint}")
            if section and SECTION_OF[setting_name] != section:
                raise ValueError(f"{path}: unknown setting {where!r}: {name} is in section {SECTION_OF[setting_name]}")
            if setting_name in flat:
                raise ValueError(f"{path}: setting {where!r} given twice")
            flat[setting_name] = setting
    if flat.pop("amp_auto", None):
        flat["amp"] = "auto"
    for name in RESULTS:
        flat.pop(name, None)
    return flat


def from_checkpoint(state: Mapping[str, Any]) -> Config:
    """The settings a train.py checkpoint was trained with (its flat "config"; older ones lack `LEGACY`'s)."""
    return Config.from_dict({**LEGACY, **state["config"]})


def resolve(options: Mapping[str, Any], timing_only: bool = False) -> Config:
    """A run's settings from its options (as `Config.from_dict` takes them): the automatic defaults filled and
    the combinations checked, with click errors naming the option; the result is what config.json records.
    `timing_only` (benchmarks/train_step.py, which times steps and trains nothing worth keeping) lets one
    process use plain batch norm with a momentum-encoder method, as a reference point; training refuses it."""
    cfg = Config.from_dict({k: v for k, v in options.items() if k != "amp_auto"})  # settled again by training
    data, model, method, opt, run = cfg.data, cfg.model, cfg.method, cfg.optimisation, cfg.run
    run.device = resolve_device(run.device)
    if method.blur is None:
        method.blur = data.image_size > 64
    if method.ccrop_warmup is None:  # the paper: 20 of 100 epochs each
        method.ccrop_warmup = max(1, round(0.2 * opt.epochs))
    if method.ccrop_interval is None:
        method.ccrop_interval = max(1, round(0.2 * opt.epochs))
    if method.ccrop_alpha is None:
        method.ccrop_alpha = alpha_for(data.image_size)
    if run.out is None:
        run.out = f"runs/{method.method}-{data.loader}"
    data.data, run.out = str(data.data), str(run.out)
    if data.val_data is not None:
        data.val_data = str(data.val_data)
    if opt.amp == "fp16" and run.device == "cpu":
        raise click.BadParameter("fp16 autocast needs CUDA; on a CPU use --amp auto, bf16 or off", param_hint="--amp")
    try:
        chosen = method_for(method.method, method.symmetric, method.attract_all)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--symmetric/--attract-all") from error
    if method.original == "random-crop" and "original" not in chosen.views:
        raise click.BadParameter(f"--method {method.method} has no original view", param_hint="--original")
    if method.ccrop_boxes == "forward":  # boxes from f_q's map of the whole original: only where f_q sees it
        why = ""
        if method.crop != "ccrop":
            why = "needs --crop ccrop"
        elif not chosen.original_map:
            why = f"needs --method leoclr (f_q's forward of each whole original), not --method {method.method}"
        elif method.original != "whole":
            why = "needs the whole original view, not --original random-crop"
        if why:
            raise click.BadParameter(why, param_hint="--ccrop-boxes forward")
    if chosen.pairs != (method.pairs is not None):
        raise click.BadParameter("--method sepp needs --pairs, and only it takes them", param_hint="--pairs")
    if method.pairs is not None:
        method.pairs = str(method.pairs)
    if model.queue_size % opt.batch_size:  # MoCo's rule: the queue turns over in whole batches
        raise click.BadParameter(f"must be a multiple of --batch-size ({opt.batch_size})", param_hint="--queue-size")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; --batch-size is the global batch
    run.world_size = world
    if model.bn_splits is None:  # MoCo's choice by topology: shuffle BN across ranks, else split BN
        model.bn_splits = 1 if world > 1 else 8
    if world == 1 and model.bn_splits == 1 and not chosen.end_to_end and not timing_only:
        raise click.BadParameter(
            f"--method {method.method} in one process needs split batch norm (> 1; the default is 8): with plain "
            "BN the key shuffle changes nothing, so each query and its key share batch statistics (the leak "
            "MoCo's shuffle BN exists to stop). Plain BN is for several processes (torchrun), whose keys are "
            "shuffled across them",
            param_hint="--bn-splits",
        )
    if opt.batch_size % world:
        raise click.BadParameter(f"must be a multiple of the {world} processes", param_hint="--batch-size")
    if opt.batch_size // world % model.bn_splits:
        per_rank = f" per process ({world})" if world > 1 else ""
        raise click.BadParameter(
            f"must be a multiple of --bn-splits ({model.bn_splits}){per_rank}", param_hint="--batch-size"
        )
    return cfg
