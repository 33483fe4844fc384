"""The examples the docs include (examples/own_loop.py, examples/lightning_loop.py) run as a user
runs them, on toy keyed shards, and really train."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyshard import keys
from keyshard.pipeline import encrypt_job
from keyshard.manifest import read

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BATCH = 4


@pytest.fixture(scope="module")
def shards(toy, key_files, tmp_path_factory):
    """NP M=4 keyed train/holdout shards of the toy VOC at 32², one augmentation replica."""
    out = tmp_path_factory.mktemp("examples") / "np4"
    encrypt_job.run(str(toy), str(out), keys.load(key_files["np"]),
                    encrypt_job.EncryptOptions(size=32, shard_size=4, augment_copies=1, splits=("train", "holdout")),
                    jobs=1, progress=False)
    return out


def run_example(name, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def train_batches(shards) -> int:
    """Batches per epoch: the train ids (one augmentation replica per epoch) in batches of BATCH."""
    n = sum(s.samples for s in read(shards).shards_of("train", replica=0))
    return math.ceil(n / BATCH)


def epoch_losses(text):
    # not anchored at a line start: Lightning's progress bar shares the line (lower-case "epoch" is ours)
    return [float(v) for v in re.findall(r"\bepoch \d+: train loss ([0-9.naninf]+)", text)]


def test_own_loop_trains_and_lowers_the_loss(shards):
    out = run_example("own_loop.py", shards, "--epochs", 3, "--batch-size", BATCH, "--workers", 1)
    assert out.startswith("np M=4 key "), out
    losses = epoch_losses(out)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), out
    assert losses[-1] < losses[0], losses
    assert f"({train_batches(shards)} batches)" in out
    accuracy = [float(v) for v in re.findall(r"holdout pixel accuracy ([0-9.]+)", out)]
    assert len(accuracy) == 3 and all(0 <= a <= 1 for a in accuracy), out


def test_lightning_loop_runs_every_batch_and_lowers_the_loss(shards):
    out = run_example("lightning_loop.py", shards, "--epochs", 2, "--batch-size", BATCH, "--workers", 1)
    batches = train_batches(shards)
    steps = re.search(r"trained (\d+) steps: 2 epochs of (\d+) batches", out)
    assert steps, out
    assert (int(steps.group(1)), int(steps.group(2))) == (2 * batches, batches)
    losses = epoch_losses(out)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), out
    assert losses[-1] < losses[0], losses
