"""Rules about option values that more than one command (or a command and the library) apply,
each defined once: fraction ranges, split-file lists, "exactly one of these options", and how a
library error that names a setting is shown with its flag.

The library checks its own inputs and says what is wrong in its own terms — a setting is named
as its keyword argument in backquotes (``"`val_fraction` 1.5 must be in (0, 1)"``, or
``"`holdout=0`"`` for a value to try).  A command decorated with :func:`names_flags` shows such a
name as the command's flag (``--val-fraction 1.5 ...``, ``--holdout 0``), so a CLI user reads
the flag and a Python user the keyword.  Option types (:class:`Fraction`, :class:`SplitFiles`)
apply the same rules before any work; click's own message then names the flag.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import click

from keyshard.errors import KeyshardError

SPLIT_FILE_NAMES = ("train", "val")  # train=FILE lists train (+ holdout) ids, val=FILE the test ids


@dataclass(frozen=True)
class FractionRange:
    """A fraction's range: (0, 1), or (0, 1] with ``include_one``.  0 is never a fraction here:
    every fraction draws a split or subset, and an empty one is a mistake."""

    setting: str            # the keyword argument it is given as
    include_one: bool = False

    @property
    def interval(self) -> str:
        return "(0, 1]" if self.include_one else "(0, 1)"

    def contains(self, value: float) -> bool:
        return math.isfinite(value) and 0 < value and (value <= 1 if self.include_one else value < 1)

    def check(self, value: float) -> float:
        """``value``, or a KeyshardError naming the setting when it is out of range."""
        if not self.contains(value):
            raise KeyshardError(f"`{self.setting}` {value} must be in {self.interval}")
        return value


VAL_FRACTION = FractionRange("val_fraction")  # the test split drawn from the ids (encrypt)
SUBSET_FRACTION = FractionRange("fraction", include_one=True)  # a train subset (train, attack finetune)


class Fraction(click.ParamType):
    """A click type for one fraction: a float within ``rule``'s range (nan and inf refused)."""

    name = "fraction"

    def __init__(self, rule: FractionRange):
        self.rule = rule

    def get_metavar(self, param, ctx=None):
        return "F"

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not self.rule.contains(rv):
            self.fail(f"{rv} is not in {self.rule.interval}.", param, ctx)
        return rv


def parse_split_files(text: str) -> dict[str, str]:
    """``train=FILE,val=FILE`` → ``{"train": FILE, "val": FILE}``: names from SPLIT_FILE_NAMES,
    each at most once, at least one, no empty path.  A source that needs a list the text does not
    give says so when it needs it (``--splits test`` needs only val=FILE)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, path = (x.strip() for x in part.partition("="))
        if not sep or name not in SPLIT_FILE_NAMES or not path or name in out:
            raise ValueError(f"{text!r}: expected train=FILE,val=FILE (each split at most once)")
        out[name] = path
    return out


def check_split_files(split_files: dict | None) -> None:
    """The library's check of a ``splits_from`` dict (the CLI's comes from :func:`parse_split_files`)."""
    if split_files is not None and (not split_files or not set(split_files) <= set(SPLIT_FILE_NAMES)):
        raise KeyshardError(f"`splits_from` names {sorted(split_files)}; expected train and/or val")


class SplitFiles(click.ParamType):
    """A click type for ``--splits-from``: :func:`parse_split_files`'s dict."""

    name = "split-files"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            return parse_split_files(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def exactly_one(given: dict[str, object], what: str = "", required: bool = True) -> str | None:
    """The one entry of ``given`` ({how the option is written: its value}) that was given, or
    None when none was and ``required`` is false; more than one (or none when ``required``) is
    a KeyshardError listing the choices."""
    named = [text for text, value in given.items() if value not in (None, False, "", ())]
    if len(named) == 1 or (not named and not required):
        return named[0] if named else None
    choices = list(given)
    listed = ", ".join(choices[:-1]) + " or " + choices[-1]
    got = f" (got {' and '.join(t.split()[0] for t in named)})" if named else ""
    amount = "exactly one" if required else "at most one"
    raise KeyshardError(f"give {amount} {what + ': ' if what else 'of '}{listed}{got}")


def check_split_rule(splits_from, val_fraction, required: bool) -> None:
    """A folder dataset's split rule: split files or a val fraction, not both (``required``: one
    of them must be given), each valid."""
    exactly_one({"`splits_from`": splits_from, "`val_fraction`": val_fraction}, "split rule", required=required)
    if val_fraction is not None:
        VAL_FRACTION.check(val_fraction)
    check_split_files(splits_from)


_SETTING = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")


def option_of(command: click.Command, setting: str) -> click.Option | None:
    """``command``'s (visible) option whose parameter is ``setting``, or None."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name == setting and not param.hidden:
            return param
    return None


def with_flags(message: str, command: click.Command) -> str:
    """``message`` with each backquoted setting (`name` or `name=value`) of ``command`` shown
    as its long flag (``--name`` / ``--name value``; a flag option's `name=True` is just
    ``--name``); other backquoted text is left as it is."""
    def flag(m: re.Match) -> str:
        option = option_of(command, m[1])
        if option is None:
            return m[0]
        name = max(option.opts, key=len)
        return name if m[2] is None or (option.is_flag and m[2] == "True") else f"{name} {m[2]}"

    return _SETTING.sub(flag, message)


def names_flags(callback):
    """Decorator for a command's callback: library errors name this command's flags (see the
    module docstring).  Goes between ``@click.command``'s options and the function."""
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyshardError as exc:
            shown = with_flags(str(exc), click.get_current_context().command)
            if shown == str(exc):
                raise
            raise KeyshardError(shown) from None

    return wrapper
