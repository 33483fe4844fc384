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


# Fixed key secrets: a test whose outcome depends on the key (training, attacks) must not
# depend on a fresh random one.  fixed_secret(i) gives distinct, reproducible secrets.
def fixed_secret(i: int = 0) -> bytes:
    return bytes((i + j) % 256 for j in range(32))


@pytest.fixture(scope="session")
def key_files(tmp_path_factory) -> dict:
    """One key file per method at M=4 (image size 32 in these tests), from fixed secrets."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for i, method in enumerate(keys.METHODS):
        path = d / f"{method}.json"
        keys.save(keys.Key(method, 4, fixed_secret(i)), path)
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


def keyed_run(root: Path, method: str, m: int, images: int, seed: int, epochs: int, size: int = 32,
              shard_size: int = 8, enc_splits=("train", "holdout", "test"), secret: bytes = fixed_secret(0),
              **train_overrides) -> Path:
    """Toy VOC → plain shards (all splits) + keyed shards → a demo model trained on them.

    Everything is fixed — the toy data (``seed``), the key (``secret``, never a random one) and
    the training seed (``train_overrides`` may set ``seed``, default 0) — so a test asserting a
    training outcome sees the same run every time.  Lays out root/{voc, key.json, plain, enc,
    run}; returns root.
    """
    from keyshard.pipeline import encrypt_job
    from keyshard.train.loop import TrainConfig, Trainer

    voc = make_toy_voc(root / "voc", images=images, seed=seed, min_side=40, max_side=56, progress=False)
    key = keys.Key(method, m, secret)
    keys.save(key, root / "key.json")
    encrypt_job.run(str(voc), str(root / "plain"), None, encrypt_job.EncryptOptions(size=size, shard_size=shard_size),
                    jobs=1, progress=False)
    encrypt_job.run(str(voc), str(root / "enc"), key,
                    encrypt_job.EncryptOptions(size=size, shard_size=shard_size, splits=tuple(enc_splits)),
                    jobs=1, progress=False)
    train_overrides.setdefault("seed", 0)
    cfg = TrainConfig.from_preset("demo", epochs=epochs, batch_size=8, micro_batch=8, workers=0, **train_overrides)
    Trainer(root / "enc", root / "run", cfg, progress=False, log=lambda msg: None).fit()
    return root


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A patch_vit trained one epoch on SHF-keyed 32×32 toy classes (3 classes): root/{toy,
    key.json, enc, run} — for the tests of what a trained classifier is used for (predict, export)."""
    root = tmp_path_factory.mktemp("classifier")
    assert invoke("toy-classes", root / "toy", "--classes", 3, "--images", 30, "--seed", 3).exit_code == 0
    keys.save(keys.Key("shf", 4, fixed_secret(5)), root / "key.json")
    res = invoke("encrypt", "--image-folder", root / "toy", "--key", root / "key.json", "-o", root / "enc",
                 "--image-size", 32, "--shard-size", 32, "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--shards", root / "enc", "--output", root / "run", "--epochs", 1, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    return root
