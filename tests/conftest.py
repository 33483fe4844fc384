"""Shared fixtures: a tiny synthetic VOC layout and keys, made fresh for the test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from keyshard import keys
from keyshard.cli import cli
from keyshard.pipeline.toy_voc import make_toy_voc


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """24 images (12 train.txt, 12 val.txt) of 40..64 px, plus the official-layout tar."""
    out = tmp_path_factory.mktemp("toy")
    make_toy_voc(out / "voc", images=24, seed=1, make_tar=True, min_side=40, max_side=64, progress=False)
    return out / "voc"


@pytest.fixture(scope="session")
def key_files(tmp_path_factory) -> dict:
    """One key file per method at M=4 (image size 32 in these tests)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for method in keys.METHODS:
        path = d / f"{method}.json"
        keys.save(keys.generate(method, 4), path)
        out[method] = path
    return out


def invoke(*args):
    """Run the CLI in-process; return the click Result."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def run_subprocess(*args, **kw):
    """Run the real `keyshard` entry point in a child process (used where a process must die)."""
    return subprocess.run([sys.executable, "-c", "from keyshard.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, **kw)


def assert_user_error(result, *fragments):
    """Exit 1, one `keyshard: error:` line naming what is wrong, and no traceback."""
    text = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 1, text
    assert "Traceback" not in text
    if hasattr(result, "exception") and result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in text.splitlines() if line.startswith("keyshard: error:")]
    assert len(lines) == 1, text
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]
