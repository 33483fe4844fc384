"""Fault injection for tests: named points where a test can make this process die on purpose.

Resumable work (a training run, an encryption job) is only trustworthy if a crash at an awkward
moment is tested, and a test that kills "after a sleep" is flaky.  So production code marks the
few moments worth crashing at with ``faults.point(name)``, and a test arms one of them.  Nothing
happens unless it is armed, and this is the only module that reads the setting.

The setting is one environment variable, ``KEYSHARD_FAULT``, because the processes to kill are
subprocesses the test starts (the CLI, torchrun ranks, pool workers), which inherit it::

    KEYSHARD_FAULT=<point>=<when>[:INT]

* ``<when>`` is compared with the label the point is called with, or, for a point called without
  one, with how many times this process has reached it: ``train.step=10`` fires at the 10th
  optimiser step, ``encrypt.worker=test-000003.tar`` in the worker writing that shard;
* the process SIGKILLs itself (as the OOM killer would); with ``:INT`` it sends SIGINT to its
  process group instead (Ctrl-C in a terminal).

Points: ``train.step`` (after each optimiser step, ``train/loop.py``), ``encrypt.commit`` (after
each committed shard) and ``encrypt.worker`` (a pool worker starting a shard, labelled with the
shard's name; ``pipeline/encrypt_job.py``).  Tests build the variable with ``arm``.
"""

from __future__ import annotations

import os
import signal

ENV = "KEYSHARD_FAULT"

_reached: dict[str, int] = {}  # point -> times this process reached it


def point(name: str, label: str | None = None) -> None:
    """Die here if a test armed ``name`` for this call (see the module docstring); else nothing."""
    point_name, _, when = os.environ.get(ENV, "").partition("=")
    if point_name != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    when, _, how = when.partition(":")
    if (str(_reached[name]) if label is None else label) != when:
        return
    if how == "INT":
        os.killpg(os.getpgid(0), signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(name: str, when, how: str = "") -> dict[str, str]:
    """The environment entry that arms point ``name``, for a test's subprocess:
    ``env={**os.environ, **faults.arm("train.step", 10)}`` (``how="INT"``: SIGINT to the group)."""
    return {ENV: f"{name}={when}" + (f":{how}" if how else "")}
