"""A run's settings as one typed object, `Config`, in sections: data, model, method, optimisation, run.

Every setting is declared once, here: its field carries its option's type, choices, default and help
(`model.options.setting`), and train.py's options are built from the fields (`options`), named as them
(`--train-limit` -> `cfg.data.train_limit`); eval.py, model.pairs and the benchmarks take the flags they share
with train.py from here too (`option`, `inherited`). No torch at import: --help needs none.

config.json and a checkpoint's "config" hold `to_dict()`, flat; `Config.from_dict` reads that back, a sectioned
dict, or CLI option names ("--train-limit", "train-limit"), and stops at an unknown key, naming it. `resolve`
fills the automatic defaults and checks the combinations of a run's options. `read_file` reads a YAML settings
file or a run's config.json (train.py --config).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import click

from model.options import AMP_CHOICES, ARCHS, METHOD_NAMES, Count, Integer, Real, apply, option_of, setting
from pipeline.backends import BACKENDS
from pipeline.data import LABELS


@dataclass
class DataConfig:
    """What is read, by which loader backend, at which resolution S."""

    data: str = setting(
        "data/fashion-mnist",
        "A folder of JPEG, PNG or WebP images: DATA/train/ (+ optional DATA/val/, the kNN monitor's queries) "
        "when DATA has a train/ folder, else all of DATA, at any depth; ImageNet's DATA/train/<class>/*.JPEG or "
        "any unlabelled collection (see --labels). For --loader ffcv a folder with train.beton (+ optional "
        "val.beton) or one .beton file, made by python -m pipeline.convert.",
        type=click.Path(path_type=Path),
    )
    labels: str = setting(
        "auto",
        "Labels of --data's folders (training needs none; the kNN monitor on DATA/val does): folders = the first "
        "folder under a split is the class; none = no labels (subfolders mean nothing); auto = folders when "
        "every image sits exactly one folder down (SPLIT/<class>/<image>), none for flat folders and mixed "
        "depths.",
        type=click.Choice(LABELS),
    )
    val_data: str | None = setting(
        None,
        "A labelled folder for the kNN monitor instead of --data's val split (for unlabelled --data): the bank "
        "from VAL_DATA/train/<class>/ (--knn-bank), the queries VAL_DATA/val/<class>/ (--val-limit); for "
        "--loader ffcv a folder with train.beton and val.beton. Without it and a labelled DATA/val the monitor "
        "is off (the run says so).",
        type=click.Path(exists=True, path_type=Path),
    )
    loader: str = setting(
        "dali",
        "Data loading backend: dali (JPEG folder; GPU decode on CUDA), ffcv (.beton files) or torchvision (the "
        "PIL reference).",
        type=click.Choice(BACKENDS),
    )
    train_limit: int = setting(
        2000,
        "Use a seeded random subset of this many train images (0 = all).",
        type=Integer(min=0),
    )
    val_limit: int = setting(2000, "Same for the val split used by the kNN monitor (0 = all).", type=Integer(min=0))
    skip_bad: bool = setting(
        False,
        "Leave out images no loader can decode (listed) instead of stopping before training with their list.",
        is_flag=True,
    )
    verify: bool = setting(
        False,
        "Decode every image fully before training (in parallel; cached by path, size and mtime in $LEOCLR_CACHE, "
        "default ~/.cache/leoclr) and stop on those that fail, or leave them out with --skip-bad.",
        is_flag=True,
    )
    workers: int | None = setting(
        None,
        "Loader threads (DALI, FFCV) or processes (torchvision). [default: this process's share of the CPU "
        "cores, less one for the trainer]",
        type=Integer(min=0),
    )
    image_size: int = setting(
        16,
        "Training resolution S; S <= 64 uses the small-image stem. The defaults (16 px, 2,000 images, 8 epochs) "
        "size a run for minutes on a 2-core CPU; docs/training.md: the full recipe.",
        type=Integer(min=8),
    )


@dataclass
class ModelConfig:
    """The encoders, the momentum and the queue."""

    arch: str = setting("resnet18", type=click.Choice(ARCHS))
    bn_splits: int | None = setting(
        None,
        "Split batch norm groups (1 = plain BN); each process's batch must divide into them. [default: 8 with "
        "one process, where split BN stands in for shuffle BN (fewer where 8 do not divide the batch, or leave a "
        "group under 2 images); 1 under torchrun, where keys are shuffled across the ranks as in MoCo] One "
        "process refuses 1 for the momentum-encoder methods: each query and its key would share batch statistics.",
        type=Count(),
    )
    queue_size: int = setting(
        1024,
        "Number of negative keys K: a multiple of --batch-size (MoCo's queue turns over in whole batches). Not "
        "given, the multiple of the batch nearest 1024 and at most the training images (older keys of the same "
        "images would be negatives).",
        type=Count(),
    )
    moco_momentum: float = setting(0.99, "Key-encoder momentum m.", type=Real(0, 1))
    compile: bool = setting(
        False,
        "torch.compile the query and key encoders (minutes of compiling first). Off by default: measured faster "
        "only where benchmarks/train_step.py --compile says so (docs/architecture.md).",
        is_flag=True,
    )


@dataclass
class MethodConfig:
    """The objective and its variants, the crops and the augmentation."""

    method: str = setting(
        "leoclr",
        "Training objective: leoclr, mocov2, sepp (MoCo-v2 on the images plus SePP-ID's semantic pairs, "
        "--pairs), simclr (end to end, in-batch negatives) or leoclr-e2e (LeOCLR end to end, Table 5).",
        type=click.Choice(sorted(METHOD_NAMES)),
    )
    symmetric: bool = setting(
        False,
        "mocov2/sepp: both directions, l(q1, k2) + l(q2, k1), both keys enqueued.",
        is_flag=True,
    )
    attract_all: bool = setting(
        False,
        "leoclr, Table 8 ablation: also pull crop 1 toward crop 2 (every pair of the three views attracted).",
        is_flag=True,
    )
    original: str = setting(
        "whole",
        "The original view: the whole image resized, or (Table 8 ablation) a RandomResizedCrop of its own.",
        type=click.Choice(["whole", "random-crop"]),
    )
    pairs: str | None = setting(
        None,
        "Semantic positive pairs for --method sepp, from python -m model.pairs (same data, --train-limit, --seed).",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )
    temperature: float = setting(0.1, "InfoNCE temperature T.", type=Real(min=0, min_open=True))
    loss_terms: str = setting(
        "mean",
        "How a method with several InfoNCE terms (leoclr: l(u, v1) + l(u, v2); --attract-all: 3; --symmetric, "
        "leoclr-e2e: 2) combines them: mean = their average (the default), so a step at a given --lr moves as "
        "far as a one-term method's (MoCo-v2's) and one lr suits every method; sum = the papers' equations "
        "(configs/imagenet.yaml), the mean at twice the lr, weight decay aside. Measured at the default run's "
        "size, LeOCLR at lr 0.03: kNN 62.9 summed, 66.8 averaged (seed 0; docs/RESULTS.md).",
        type=click.Choice(["sum", "mean"]),
    )
    crop: str = setting(
        "random",
        "Crops of the two augmented views: RandomResizedCrop, or ContrastiveCrop (centres sampled around a box "
        "per image found from the model's own heatmap; the LeOCLR original is never cropped).",
        type=click.Choice(["random", "ccrop"]),
    )
    ccrop_k: float = setting(0.1, "ContrastiveCrop heatmap threshold k.", type=Real(0, 1))
    ccrop_alpha: float | None = setting(
        None,
        "ContrastiveCrop Beta(alpha, alpha) for crop centres. [default: by --image-size, as the reference "
        "configs: 0.1 up to 96 px (CIFAR, Tiny ImageNet, STL-10), 0.6 above (ImageNet)]",
        type=Real(min=0, min_open=True),
    )
    ccrop_warmup: int | None = setting(
        None,
        "Epochs of RandomResizedCrop before crops are sampled around boxes. As in the reference code, the boxes "
        "are recomputed once e epochs are done where e >= this, e is a multiple of --ccrop-interval and epochs "
        "remain, and are whole images until then: a warm-up of 0 never boxes with random weights. [default: 20% "
        "of --epochs]",
        type=Integer(min=0),
    )
    ccrop_interval: int | None = setting(None, "Epochs between box updates. [default: 20% of --epochs]", type=Count())
    ccrop_boxes: str = setting(
        "pass",
        "Where ContrastiveCrop's boxes come from: pass = the reference's localisation pass over every training "
        "image at each update; forward = LeOCLR's training forward (--method leoclr: f_q's map of each sample's "
        "whole original refreshes its box at every step, no extra pass). docs/contrastive-crop.md: how the two "
        "compare.",
        type=click.Choice(["pass", "forward"]),
    )
    blur: bool | None = setting(None, "Gaussian blur p=0.5. [default: on when S > 64]", switch=True)
    color_jitter: bool = setting(True, "Colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8.", switch=True)
    grayscale: bool = setting(
        True,
        "Random grayscale p=0.2. Without jitter, grayscale and blur: only random crop (+ flip), Figure 4.",
        switch=True,
    )


@dataclass
class OptimisationConfig:
    """Epochs, batch, SGD and precision."""

    epochs: int = setting(8, type=Count())
    batch_size: int = setting(
        64,
        "Global batch (split over torchrun's processes): a multiple of the processes, each one's part a multiple "
        "of --bn-splits, at most the training images. Not given, a folder of fewer images gets the largest batch "
        "that fits it (and the run says so).",
        type=Count(),
    )
    lr: float = setting(
        0.015,
        "Base learning rate (cosine decay per epoch). 0.015 with --loss-terms mean: the best LeOCLR kNN measured "
        "at the default run's size (6 epochs, 16 px, 2,000 images, 3 seeds; docs/RESULTS.md), the only setting "
        "there whose features end above raw pixels; the papers' 0.03 for batch 256 (and --loss-terms sum) is "
        "configs/imagenet.yaml.",
        type=Real(min=0, min_open=True),
    )
    warmup_epochs: float = setting(0.0, "Linear learning-rate warm-up, in epochs.", type=Real(min=0))
    weight_decay: float = setting(5e-4, type=Real(min=0))
    amp: str = setting(
        "auto",
        "Precision: auto = bf16 on a GPU that supports it (else fp16 with a gradient scaler); on a CPU bf16 only "
        "where a short probe of the model finds it faster than fp32 (CPUs without native bf16 emulate it, ~7x "
        "slower), else fp32. bf16/fp16 force autocast (fp16 only on CUDA), off = fp32. The choice and reason go "
        "to config.json.",
        type=click.Choice(AMP_CHOICES),
    )
    amp_auto: str | None = None  # why "auto" chose it; None when --amp forced it


@dataclass
class RunConfig:
    """Where the run writes, on which device, its seed and processes, and the kNN monitor."""

    out: str | None = setting(
        None,
        "Run directory (config.json, metrics.jsonl, checkpoint.pt). [default: runs/<method>-<loader>]",
        type=click.Path(path_type=Path),
    )
    device: str = setting(
        "auto",
        "auto = cuda where torch can use a GPU, else cpu (stops, saying what to install, where an NVIDIA GPU is "
        "here that torch cannot use); cpu, cuda or cuda:N.",
    )
    seed: int = setting(0, type=Integer())
    world_size: int = 1  # torchrun's processes, set by `resolve`
    knn_k: int = setting(200, type=Count())
    knn_temperature: float = setting(0.1, type=Real(min=0, min_open=True))
    knn_every: int = setting(
        1,
        "Epochs between kNN monitor evaluations (before training, every N epochs, and always after the last).",
        type=Count(),
    )
    knn_bank: int | None = setting(
        None,
        "kNN monitor bank: a seeded subset of this many images of the bank's source, --data's training images or "
        "--val-data's train split (0 = all). [default: as many as the run trains on, at least 2,000 (a bank for "
        "a small folder's --val-data monitor) and at most 131,072 (ImageNet's bank pass near a tenth of an "
        "epoch; 1.28M x 2048 in float16, 5 GB on rank 0, would fit a 40 GB GPU too)]",
        type=Integer(min=0),
    )
    tensorboard: bool | None = setting(
        None,
        "TensorBoard event files in the run directory: per-step loss, lr and img/s, per-epoch metrics, pictures "
        "of the views (metrics.jsonl stays the record). [default: on when the tensorboard package is installed]",
        switch=True,
    )


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
# The settings given as options (all but the results `RESULTS` lists), in their sections' order.
OPTIONS = {f.name: f for kind in SECTIONS.values() for f in fields(kind) if "option" in f.metadata}


def option(name: str, **changes: Any) -> Callable:
    """The click option of setting `name` as train.py declares it (type, choices, default, help), or with
    `changes` where a script's meaning differs: `option("loader", default=None, help="[default: the
    checkpoint's]")` keeps the name and choices."""
    return option_of(OPTIONS[name], **changes)


def inherited(name: str, help: str = "", source: str = "the checkpoint's") -> Callable:
    """Setting `name`'s option for a script whose default is a run's value (None until it reads the run: eval.py's
    the checkpoint's, a benchmark's train.py's): train.py's type and choices, `help` + "[default: `source`]"."""
    return option(name, default=None, help=f"{help} [default: {source}]".lstrip())


def options(*names: str) -> Callable:
    """One decorator adding the options of the settings `names` (every setting when none), in that order."""
    return apply([option(name) for name in names or OPTIONS])


def flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """{setting name: value} from keys as they come: setting names, CLI option names ("--train-limit",
    "train-limit"), flat or inside their sections ({"data": {"train_limit": 0}}). ValueError naming a key that is
    no setting (with the closest setting names) or a setting given twice."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        section = key if key in SECTIONS and isinstance(value, Mapping) else None  # "data" is a setting too
        for name, given in value.items() if section else [(key, value)]:
            setting_name = str(name).lstrip("-").replace("-", "_")
            where = f"{section}.{name}" if section else name
            if setting_name not in SECTION_OF:
                close = difflib.get_close_matches(setting_name, list(SECTION_OF), n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(f"unknown setting {where!r}{hint}; {sections_listed()}")
            if setting_name in flat:  # names are unique: a key in another section than its own is still it
                raise ValueError(f"setting {where!r} given twice")
            flat[setting_name] = given
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
    # Imported here: the settings and their options (train.py --help) need no torch.
    from model.methods import method_for
    from model.precision import amp_refusal
    from pipeline.ccrop import alpha_for
    from pipeline.device import resolve_device

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
