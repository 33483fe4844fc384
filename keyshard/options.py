"""Ranges of the CLI's numeric options, defined once and used by every command.

Every numeric option has a range (``click.IntRange`` / :class:`FiniteFloat`), so an absurd value
is a usage error (exit 2, one ``Error: Invalid value for ...`` line) before any work starts,
instead of a traceback or a job that runs out of memory.  The bounds are generous sanity limits,
not tuning advice.
"""

from __future__ import annotations

import math

import click
from click.core import ParameterSource

from keyshard import methods
from keyshard.keys import MAX_BLOCK_SIZE

DEFAULT_IMAGE_SIZE = 256  # the paper's images are resized to 256×256 (section 3.1)
MAX_IMAGE_SIZE = 4096      # --image-size: a 4096² SHF plan is already ~400 MB
MAX_JOBS = 1024            # worker processes (encrypt, demo)
MAX_WORKERS = 256          # DataLoader workers
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_SEED = 2**63 - 1       # numpy SeedSequence, torch.manual_seed and the sha256-based seeds all take it
MAX_IMAGES = 1_000_000     # toy-voc / demo image counts, labelled images, shuffle buffers
MAX_EVALUATIONS = 10_000_000  # attack search budgets

SEED = click.IntRange(0, MAX_SEED)
IMAGE_SIZE = click.IntRange(1, MAX_IMAGE_SIZE)
BLOCK_SIZE = click.IntRange(1, MAX_BLOCK_SIZE)  # the keys' own limit (keys.MAX_BLOCK_SIZE)
EPOCHS = click.IntRange(1, MAX_EPOCHS)
BATCH = click.IntRange(1, MAX_BATCH)
WORKERS = click.IntRange(0, MAX_WORKERS)


class FiniteFloat(click.FloatRange):
    """A ``FloatRange`` that also refuses ``nan`` and ``inf`` (which a plain range lets through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


class Jobs(click.ParamType):
    """Worker processes: -1 = all cores, else 1..MAX_JOBS (0 and other negatives are refused)."""

    name = "jobs"

    def get_metavar(self, param, ctx=None):
        return "N"

    def convert(self, value, param, ctx):
        rv = click.INT.convert(value, param, ctx)
        if rv == -1 or 1 <= rv <= MAX_JOBS:
            return rv
        self.fail(f"{rv} is not -1 (all cores) or in the range 1<=x<={MAX_JOBS}.", param, ctx)


class MethodName(click.Choice):
    """An encryption method's name.  The choices are the registry's when a value is checked, so a
    method registered after the CLI was built (a plug-in registered in-process) is accepted too."""

    def __init__(self, case_sensitive: bool = True):
        super().__init__((), case_sensitive=case_sensitive)

    @property
    def choices(self):
        return methods.names()

    @choices.setter
    def choices(self, value):  # click.Choice sets it; the registry is the list
        pass


def method_help() -> str:
    """'shf: pixel shuffling; np: ...' for the methods registered when the CLI is built."""
    return "; ".join(f"{name}: {methods.get(name).summary}" for name in methods.names()) + "."


class CommaList(click.ParamType):
    """A comma-separated list (``--methods np,shf``, ``--block-sizes 2,4,8``): the one rule for
    every list option.  Items are stripped, empty ones skipped, each is converted by ``item`` (a
    click type, so a bad item is refused with that type's message), repeats are dropped (the
    first kept) and ``sort`` sorts the result.  An empty list is refused.  Returns a tuple."""

    name = "list"

    def __init__(self, item: click.ParamType, sort: bool = False):
        self.item, self.sort = item, sort

    def get_metavar(self, param, ctx=None):
        return "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail(f"{value!r}: expected a comma-separated list", param, ctx)
        out = tuple(dict.fromkeys(self.item.convert(v, param, ctx) for v in items))
        return tuple(sorted(out)) if self.sort else out


JOBS = Jobs()
METHOD = MethodName()
METHOD_LIST = CommaList(MethodName(case_sensitive=False))
POSITIVE = FiniteFloat(min=0, min_open=True)   # learning rates
NON_NEGATIVE = FiniteFloat(min=0)              # weight decay, minimum lr, loss weights


# -- renamed options ---------------------------------------------------------------------------
#
# One vocabulary for every command (``-o/--output`` for what a command writes, ``--image-size``
# for the square size images are resized to).  An old name stays as a hidden, deprecated alias:
# it still works, prints one ``keyshard: warning: ...`` line on stderr, and is merged into the
# real parameter before the real one is checked (so a required ``--output`` given as ``--out`` is
# not "missing").  Giving both names with different values is a usage error.


def _flags(decls) -> str:
    """``("--output", "-o", "name")`` → ``"-o/--output"`` (short flags first, as help shows them)."""
    flags = [d for d in decls if d.startswith("-")]
    return "/".join(sorted(flags, key=lambda d: (d.startswith("--"), d)))


def deprecation_line(old: str, new: str) -> str:
    """The one stderr line a deprecated alias prints."""
    return f"keyshard: warning: {old} is deprecated; use {new}"


class RenamedOption(click.Option):
    """An option that also takes the value of its hidden deprecated alias (see :func:`option`)."""

    def __init__(self, *args, alias: str, alias_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.alias, self.alias_name = alias, alias_name

    def consume_value(self, ctx, opts):
        value, source = super().consume_value(ctx, opts)
        if self.alias_name not in opts:  # the parser records only what the command line gave
            return value, source
        old = opts[self.alias_name]
        if source != ParameterSource.COMMANDLINE:
            return old, ParameterSource.COMMANDLINE
        if not self._same(ctx, value, old):
            new = _flags(self.opts)
            raise click.UsageError(f"{self.alias} {old} and {new} {value} disagree; give only {new}", ctx)
        return value, source

    def _same(self, ctx, a, b) -> bool:
        if a == b:
            return True
        try:
            return self.type_cast_value(ctx, a) == self.type_cast_value(ctx, b)
        except click.BadParameter:
            return False


def option(*param_decls, alias: str, **attrs):
    """``click.option(*param_decls, **attrs)`` plus the hidden deprecated flag ``alias``.

    The alias has the option's type (a bad value is refused under the name the user typed); when
    given it prints :func:`deprecation_line` on stderr and its value becomes the option's.
    """
    new = _flags(param_decls)
    alias_name = "deprecated_" + alias.lstrip("-").replace("-", "_")

    def warn(ctx, param, value):
        if not ctx.resilient_parsing and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            click.echo(deprecation_line(alias, new), err=True)

    def decorator(f):
        f = click.option(*param_decls, cls=RenamedOption, alias=alias, alias_name=alias_name, **attrs)(f)
        return click.option(alias, alias_name, type=attrs.get("type"), hidden=True, expose_value=False,
                            callback=warn, help=f"Deprecated: use {new}.")(f)

    return decorator


def output_option(**attrs):
    """``-o/--output``, with ``--out`` as its hidden deprecated alias (train, evaluate, sweep, attack)."""
    return option("--output", "-o", "output", alias="--out", **attrs)


def image_size_option(**attrs):
    """``--image-size``, with ``--size`` as its hidden deprecated alias (encrypt, demo)."""
    return option("--image-size", "image_size", alias="--size", type=IMAGE_SIZE, **attrs)


def max_pixels_option(help: str):
    """``--max-pixels``: the largest image (width × height, read from its header before decoding)
    a command accepts; the default is ``keyshard.images.MAX_PIXELS`` (encrypt, predict)."""
    from keyshard.images import MAX_PIXELS

    return click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True, help=help)
