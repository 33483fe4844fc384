"""Ranges of the CLI's numeric options, defined once and used by every command.

Every numeric option has a range (``click.IntRange`` / :class:`FiniteFloat`), so an absurd value
is a usage error (exit 2, one ``Error: Invalid value for ...`` line) before any work starts,
instead of a traceback or a job that runs out of memory.  The bounds are generous sanity limits,
not tuning advice.
"""

from __future__ import annotations

import math

import click

from keyshard.keys import MAX_BLOCK_SIZE

MAX_IMAGE_SIZE = 4096      # --size, --image-size: a 4096² SHF plan is already ~400 MB
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


JOBS = Jobs()
POSITIVE = FiniteFloat(min=0, min_open=True)   # learning rates
NON_NEGATIVE = FiniteFloat(min=0)              # weight decay, minimum lr, loss weights
