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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import click

from model.methods import method_for
from model.precision import amp_refusal
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
    loss_terms: str = "mean"  # the method's InfoNCE terms averaged; sum: the paper's Eq. 3
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
    lr: float = 0.015
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
    knn_bank: int | None = None  # None: fitted to the run's training images, set by `fit_to_images`
    tensorboard: bool | None = None  # None: on when the tensorboard package imports


@dataclass
class Config:
    """A run's settings. Sections as attributes (`cfg.optimisation.lr`); option names are unique across them."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Options `resolve` and `fit_to_images` chose for the user, as "--option value" (not a setting: said once)
    fitted: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """The settings in `values`: flat ({"train_limit": 0}), sectioned ({"data": {"train_limit": 0}}), or by
        CLI option name ("--train-limit", "train-limit"), mixed as they come; settings not given keep their
        defaults. ValueError naming a key that is no setting, or a setting given twice."""
        given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in flat_settings(values).items():
            given[SECTION_OF[name]][name] = value
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


def flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """{setting name: value} from keys as they come: setting names, CLI option names ("--train-limit",
    "train-limit"), flat or inside their sections ({"data": {"train_limit": 0}}). ValueError naming a key that is
    no setting (with the closest setting names) or a setting given twice."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        section = key if key in SECTIONS and isinstance(value, Mapping) else None  # "data" is a setting too
        for name, setting in value.items() if section else [(key, value)]:
            setting_name = str(name).lstrip("-").replace("-", "_")
            where = f"{section}.{name}" if section else name
            if setting_name not in SECTION_OF:
                close = difflib.get_close_matches(setting_name, list(SECTION_OF), n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(f"unknown setting {where!r}{hint}; {sections_listed()}")
            if setting_name in flat:  # names are unique: a key in another section than its own is still it
                raise ValueError(f"setting {where!r} given twice")
            flat[setting_name] = setting
    return flat


def sections_listed() -> str:
    """Every setting by section, for an error about a key: "settings by section: data: data, labels, ...; model:
    ...". A file may put a setting in any section (names are unique across them) or in none."""
    names = {name: [f.name for f in fields(kind) if f.name not in RESULTS] for name, kind in SECTIONS.items()}
    listed = "; ".join(f"{name}: {', '.join(settings)}" for name, settings in names.items())
    return f"settings by section (any section, or none, is fine): {listed}"


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
    if values is None or values == {}:  # an empty file: most likely not the file meant (it would run the defaults)
        raise ValueError(f"{path} holds no settings (it is empty): give a file of option names and values")
    if not isinstance(values, Mapping):
        raise ValueError(f"{path} must hold a mapping of option names to values, not a {type(values).__name__}")
    try:
        flat = flat_settings(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if flat.pop("amp_auto", None):
        flat["amp"] = "auto"
    for name in RESULTS:
        flat.pop(name, None)
    return flat


PATHS = ("data", "val_data", "pairs", "out")  # the settings that are paths, stored absolute


def absolute(path: str | Path | None) -> str | None:
    """`path` as an absolute path string (~ expanded, links kept as given); None stays None."""
    return None if path is None else os.path.abspath(os.path.expanduser(str(path)))


def rebased(config: Mapping[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's flat config with relative paths (written before they were stored absolute: relative to the
    directory that run started in) made absolute. That directory is where the checkpoint lies less the run's
    relative --out (RUN_DIR/checkpoint.pt); a checkpoint moved out of its --out keeps its paths as they are."""
    out = config.get("out")
    if not isinstance(out, str) or os.path.isabs(out):
        return dict(config)
    parts = Path(os.path.normpath(out)).parts
    run_dir = Path(os.path.abspath(checkpoint)).parent
    if ".." in parts or run_dir.parts[-len(parts) :] != parts:
        return dict(config)
    base = Path(*run_dir.parts[: -len(parts)])
    relative = {k: v for k in PATHS if isinstance(v := config.get(k), str) and not os.path.isabs(v)}
    return {**config, **{k: str(base / v) for k, v in relative.items()}}


def from_checkpoint(state: Mapping[str, Any]) -> Config:
    """The settings a train.py checkpoint was trained with (its flat "config"; older ones lack `LEGACY`'s)."""
    return Config.from_dict({**LEGACY, **state["config"]})


class BadSettings(click.BadParameter):
    """Every broken constraint of a run's settings at once, one line: `problems` are (option, what is wrong and
    what would satisfy it). One problem reads as click's "Invalid value for OPTION: ...", with its param_hint."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(why for _, why in problems), param_hint=", ".join(h for h, _ in problems))

    def format_message(self) -> str:
        if len(self.problems) == 1:
            return f"Invalid value for {self.problems[0][0]}: {self.problems[0][1]}"
        listed = "; ".join(f"{hint}: {why}" for hint, why in self.problems)
        return f"{len(self.problems)} settings do not fit together: {listed}"


def multiples_near(value: int, step: int) -> str:
    """The multiples of `step` on either side of `value` (the smaller one only when >= step): "32 or 40"."""
    lower, upper = value // step * step, -(-value // step) * step
    return str(upper) if lower < step or lower == upper else f"{lower} or {upper}"


def split_count(per_rank: int, limit: int = 8) -> int:
    """The most batch-norm groups, 2 to `limit`, that divide a batch of `per_rank` with 2 images or more each
    (1 when there are none: the caller refuses it where split BN is needed)."""
    return max((s for s in range(2, limit + 1) if per_rank % s == 0 and per_rank // s >= 2), default=1)


def resolve(options: Mapping[str, Any], timing_only: bool = False, given: Collection[str] | None = None) -> Config:
    """A run's settings from its options (as `Config.from_dict` takes them): the automatic defaults filled and
    the combinations checked, every broken one in one `BadSettings` (a click error naming the options and what
    would satisfy each); the result is what config.json records. `given` names the settings the user chose
    (command line, --config, checkpoint); --queue-size and --bn-splits not among them are fitted to the batch
    (`Config.fitted` says how). None: all given, nothing fitted.
    `timing_only` (benchmarks/train_step.py, which times steps and trains nothing worth keeping) lets one
    process use plain batch norm with a momentum-encoder method, as a reference point; training refuses it."""
    cfg = Config.from_dict({k: v for k, v in options.items() if k != "amp_auto"})  # settled again by training
    data, method, opt, run = cfg.data, cfg.method, cfg.optimisation, cfg.run
    given = set(SECTION_OF) if given is None else set(given)
    problems: list[tuple[str, str]] = []
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
    # Absolute: config.json and the checkpoint find the data and the run again from any directory.
    data.data, run.out, data.val_data = absolute(data.data), absolute(run.out), absolute(data.val_data)
    if (refusal := amp_refusal(opt.amp, run.device)) is not None:
        problems.append(("--amp", refusal))
    try:
        chosen = method_for(method.method, method.symmetric, method.attract_all)
    except ValueError as error:
        raise BadSettings([("--symmetric/--attract-all", str(error))]) from error
    if method.original == "random-crop" and "original" not in chosen.views:
        problems.append(("--original", f"--method {method.method} has no original view"))
    if method.ccrop_boxes == "forward":  # boxes from f_q's map of the whole original: only where f_q sees it
        why = ""
        if method.crop != "ccrop":
            why = "needs --crop ccrop"
        elif not chosen.original_map:
            why = f"needs --method leoclr (f_q's forward of each whole original), not --method {method.method}"
        elif method.original != "whole":
            why = "needs the whole original view, not --original random-crop"
        if why:
            problems.append(("--ccrop-boxes forward", why))
    if chosen.pairs != (method.pairs is not None):
        problems.append(("--pairs", "--method sepp needs --pairs, and only it takes them"))
    method.pairs = absolute(method.pairs)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; --batch-size is the global batch
    run.world_size = world
    cfg.fitted = fit_to_batch(cfg, chosen.end_to_end or timing_only, given)
    problems += batch_problems(cfg, chosen.end_to_end, timing_only, method.method)
    if problems:
        raise BadSettings(problems)
    return cfg


def fit_to_batch(cfg: Config, plain_bn_ok: bool, given: set[str]) -> list[str]:
    """--bn-splits (when None: by topology) and --queue-size (when not in `given`) fitted to the batch: split BN
    in as many groups as divide a process's batch (8 at most, 2 images or more each; 1 under torchrun, as MoCo),
    the queue the nearest multiple of the batch. Returns what was changed from the defaults, as options."""
    model, batch, world, fitted = cfg.model, cfg.optimisation.batch_size, cfg.run.world_size, []
    if model.bn_splits is None:  # MoCo's choice by topology: shuffle BN across ranks, else split BN
        model.bn_splits = 1 if world > 1 else 8
        per_rank = batch // world
        if world == 1 and per_rank % 8 and (split_count(per_rank) > 1 or plain_bn_ok):
            model.bn_splits = split_count(per_rank)
            fitted.append(f"--bn-splits {model.bn_splits}")
    if "queue_size" not in given and model.queue_size % batch:
        model.queue_size = max(batch, round(model.queue_size / batch) * batch)
        fitted.append(f"--queue-size {model.queue_size}")
    return tuple(fitted)


# The kNN monitor's default bank: as many images as the run trains on (every image of the CPU-sized default run),
# at least a bank a small folder's --val-data monitor can vote with, at most 10% of ImageNet.
KNN_BANK_LEAST, KNN_BANK_MOST = 2_000, 131_072


def fit_to_images(cfg: Config, count: int, given: Collection[str] | None = None) -> None:
    """A run's batch fitted to its `count` training images (a folder smaller than the default batch trains as it
    stands): what the user did not choose (`given`, as `resolve`; None = all) is fitted and added to
    `cfg.fitted`: the batch at most the images (a multiple of the processes and of the BN groups, refitted
    with 2 images or more each when --bn-splits was not given), the queue a multiple of it and at most the
    images (older keys of the same images would be its negatives). What the user chose and does not fit is a
    `BadSettings` saying what to pass. --knn-bank not given: as many as the images, `KNN_BANK_LEAST` to
    `KNN_BANK_MOST`."""
    model, opt, world = cfg.model, cfg.optimisation, cfg.run.world_size
    given = set(SECTION_OF) if given is None else set(given)
    plural = "image" if count == 1 else "images"
    if count < 2 * world:
        raise BadSettings(
            [
                (
                    "--data",
                    f"{count} training {plural} for {world} process(es): contrastive training needs 2 or more "
                    "per process (the other images are the negatives)",
                )
            ]
        )
    fitted, problems = list(cfg.fitted), []
    if opt.batch_size > count:
        per_rank, splits = count // world, model.bn_splits
        if "batch_size" not in given:
            if "bn_splits" not in given and world == 1:
                splits = min(splits, max(2, per_rank // 2))  # 2 images or more in each BN group
            if per_rank >= splits:
                opt.batch_size = per_rank // splits * splits * world
                fitted.append(f"--batch-size {opt.batch_size}")
                if splits != model.bn_splits:
                    model.bn_splits = splits
                    fitted.append(f"--bn-splits {splits}")
        if opt.batch_size > count:  # chosen, or no batch of whole BN groups fits
            most = per_rank // splits * splits * world
            fix = (
                f"--batch-size {most} or less"
                if most
                else f"--bn-splits {max(2, per_rank // 2)} with a batch of {count} or less"
            )
            problems.append(
                ("--batch-size", f"{opt.batch_size} is more than the {count} training {plural}: pass {fix}")
            )
    if not problems and "queue_size" not in given and model.queue_size > count:
        model.queue_size = max(opt.batch_size, count // opt.batch_size * opt.batch_size)
        fitted = [f for f in fitted if not f.startswith("--queue-size")] + [f"--queue-size {model.queue_size}"]
    if not problems and model.queue_size % opt.batch_size:
        problems.append(
            (
                "--queue-size",
                f"{model.queue_size} must be a multiple of the batch fitted to the images "
                f"({opt.batch_size}): pass --queue-size {multiples_near(model.queue_size, opt.batch_size)}, or "
                "--batch-size",
            )
        )
    if problems:
        raise BadSettings(problems)
    cfg.run.knn_bank = knn_bank(cfg, count)
    cfg.fitted = tuple(fitted)


def knn_bank(cfg: Config, count: int) -> int:
    """The kNN monitor's bank size for a run on `count` training images: --knn-bank, or when not given (None)
    as many as the images, `KNN_BANK_LEAST` to `KNN_BANK_MOST`."""
    if cfg.run.knn_bank is not None:
        return cfg.run.knn_bank
    return min(KNN_BANK_MOST, max(KNN_BANK_LEAST, count))


def batch_problems(cfg: Config, end_to_end: bool, timing_only: bool, method: str) -> list[tuple[str, str]]:
    """What is wrong with the batch, the queue and the batch-norm groups, each with what would satisfy it."""
    model, batch, world, problems = cfg.model, cfg.optimisation.batch_size, cfg.run.world_size, []
    if world == 1 and model.bn_splits == 1 and not end_to_end and not timing_only:
        problems.append(
            (
                "--bn-splits",
                f"--method {method} in one process needs split batch norm (> 1; the default is 8): with plain "
                "BN the key shuffle changes nothing, so each query and its key share batch statistics (the leak "
                "MoCo's shuffle BN exists to stop). Plain BN is for several processes (torchrun), whose keys are "
                "shuffled across them",
            )
        )
    if end_to_end and batch < 2:
        problems.append(("--batch-size", f"--method {method} needs 2 or more: its negatives are the batch's others"))
    if batch % world:
        problems.append(
            (
                "--batch-size",
                f"{batch} must be a multiple of the {world} processes: e.g. {multiples_near(batch, world)}",
            )
        )
    elif batch // world % model.bn_splits:
        per_rank, splits = batch // world, model.bn_splits
        where = f" per process ({world})" if world > 1 else ""
        fits = split_count(per_rank, splits)
        other = f", or --bn-splits {fits}" if fits > 1 else ""
        near = multiples_near(per_rank, splits)
        if world > 1:
            near = " or ".join(str(int(n) * world) for n in near.split(" or "))
        problems.append(
            (
                "--batch-size",
                f"{batch} must be a multiple of --bn-splits ({splits}){where}: e.g. --batch-size {near}{other}",
            )
        )
    if model.queue_size % batch:  # MoCo's rule: the queue turns over in whole batches
        problems.append(
            (
                "--queue-size",
                f"{model.queue_size} must be a multiple of --batch-size ({batch}): e.g. "
                f"--queue-size {multiples_near(model.queue_size, batch)}",
            )
        )
    return problems
