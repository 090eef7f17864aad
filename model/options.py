"""Option types of the command lines (train.py, eval.py, the tools and benchmarks) and of the --config files read
through them, and how a setting declares its option (`setting`, built into a click option by `option_of`).

click's INT turns 1.7 into 1 and True into 1, and its FLOAT lets NaN and infinity through every range check
(NaN compares False with any bound). These refuse them in one line naming the option: `Integer` takes whole
numbers only ("3", 3, 3.0), `Real` finite numbers only, neither a bool (YAML's `epochs: true`). Light on
purpose: click only, so that --help and the one-line refusals need no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, Field, field
from pathlib import Path
from typing import Any

import click

# The names the command lines choose from, here (not beside the code they name, which imports torch) so that --help
# needs no torch: model.backbone, model.methods and model.precision import them (tests check METHODS agrees).
ARCHS = ("resnet18", "resnet50")
METHOD_NAMES = ("leoclr", "leoclr-e2e", "mocov2", "sepp", "simclr")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


class Integer(click.IntRange):
    """A whole number in [min, max] (either bound optional): refuses 1.7, "1.7", True/False and NaN."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value} is not a whole number", param, ctx)
        if isinstance(value, float):
            if not value.is_integer():  # NaN and infinity are not integers either
                self.fail(f"{value} is not a whole number", param, ctx)
            value = int(value)
        elif isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        return super().convert(value, param, ctx)

    def _describe_range(self) -> str:
        """click's range in --help ("x>=1"); none for an unbounded whole number (click says "x<=None")."""
        return "" if self.min is None and self.max is None else super()._describe_range()


def Count(max: int | None = None) -> Integer:  # noqa: N802 (a type, as click.IntRange)
    """A whole number >= 1: epochs, a batch, a queue, k."""
    return Integer(min=1, max=max)


class Real(click.FloatRange):
    """A finite real number in the range (open or closed bounds, either optional): refuses NaN, infinity and
    True/False, which click's FLOAT takes (NaN passes every range check)."""

    name = "real"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value} is not a number", param, ctx)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        if isinstance(value, int | float) and not math.isfinite(value):
            self.fail(f"must be a finite number, not {value}", param, ctx)
        return super().convert(value, param, ctx)


class OneLineErrors:
    """click prints a usage error in four lines (the usage, a hint, a blank line, the error); a command or group
    with this mixin prints the error's line alone (on stderr, exit code 2 as before): --help is a flag away."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            error.ctx = None  # no context: `show` prints no usage
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # raised by the command, or by a group's subcommand
            error.ctx = None
            raise


class Command(OneLineErrors, click.Command):
    """A click command whose usage errors are one line."""


class Group(OneLineErrors, click.Group):
    """A click group whose (and whose subcommands') usage errors are one line."""


def setting(default: Any, help: str | None = None, *, switch: bool = False, **option: Any) -> Any:
    """A field of the run's settings (model/config.py) with its command-line option declared beside it: the
    `default`, the `help` and click's option arguments (`type`, `is_flag`, ...); `switch`: a --name/--no-name
    pair. `option_of` builds the option, named as the field (`train_limit` -> --train-limit)."""
    return field(default=default, metadata={"option": {"help": help, "switch": switch, **option}})


def option_of(setting: Field, **changes: Any) -> Callable:
    """The click option declared by a `setting` field, as train.py takes it; `changes` (default, help, type, ...)
    for a script whose meaning of it differs (eval.py's defaults are the checkpoint's); `aliases` ("--alpha", ...)
    for a script's older names of it."""
    declared = {"default": setting.default, **setting.metadata["option"], **changes}
    aliases = declared.pop("aliases", ())
    flag = "--" + setting.name.replace("_", "-")
    if declared.pop("switch"):
        flag = f"{flag}/--no-{flag[2:]}"
    if declared["default"] is MISSING:
        del declared["default"]
    return click.option(flag, *aliases, setting.name, **declared)


def apply(decorators: list[Callable]) -> Callable:
    """One decorator applying `decorators` in their order: the first is the first option in --help."""

    def decorate(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def checkpoint_option(help: str = "A train.py checkpoint (RUN_DIR/checkpoint.pt).") -> Callable:
    """--checkpoint, required: the train.py checkpoint eval.py's protocols and model.pairs read."""
    return click.option(
        "--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help=help
    )
