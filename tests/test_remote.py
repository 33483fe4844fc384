"""Shards over HTTP (Python's http.server) and S3 (moto's standalone server): same numbers as local.

Each server runs on a free localhost port and is stopped by this test process.
"""

import json
import shutil

import pytest
import torch

from keyshard import keys
from keyshard.pipeline import encrypt_job
from keyshard.pipeline.toy_voc import make_toy_voc
from keyshard.train import checkpoint
from keyshard.train.data import open_shards

from conftest import assert_user_error, invoke
from servers import free_port, http_server, s3_server, upload_dir

SIZE = 32
SETS = ("plain", "np4", "big")


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """plain (all splits) and NP M=4 (train, holdout) shards at 32², plus `big`: plain test shards
    at 256² in one shard larger than 5 MB."""
    root = tmp_path_factory.mktemp("remote")
    voc = make_toy_voc(root / "voc", images=40, seed=5, min_side=40, max_side=56, progress=False)
    key = keys.Key("np", 4, bytes(range(32)))
    keys.save(key, root / "key.json")
    encrypt_job.run(str(voc), str(root / "plain"), None, encrypt_job.EncryptOptions(size=SIZE, shard_size=6),
                    jobs=1, progress=False)
    encrypt_job.run(str(voc), str(root / "np4"), key,
                    encrypt_job.EncryptOptions(size=SIZE, shard_size=6, splits=("train", "holdout")),
                    jobs=1, progress=False)
    big = make_toy_voc(root / "bigvoc", images=60, seed=6, min_side=40, max_side=56, progress=False)
    encrypt_job.run(str(big), str(root / "big"), None,
                    encrypt_job.EncryptOptions(size=256, shard_size=64, splits=("test",)), jobs=1, progress=False)
    assert max(s["bytes"] for s in json.loads((root / "big" / "manifest.json").read_text())["shards"]) > 5 << 20
    return root


@pytest.fixture(scope="module")
def bases(shard_root):
    """{"local": dir, "http": URL base, "s3": URL base} for the shard sets, servers running."""
    with pytest.MonkeyPatch.context() as mp, http_server(shard_root) as http, s3_server(mp):
        s3 = {name: upload_dir(shard_root / name, "keyshard-test", name) for name in SETS}
        yield {"local": {n: str(shard_root / n) for n in SETS},
               "http": {n: f"{http}{n}/" for n in SETS},
               "s3": s3}


def train_and_audit(shard_root, where: str, base: dict, tmp_path):
    run = tmp_path / f"run-{where}"
    res = invoke("train", "--shards", base["np4"], "--output", run, "--epochs", 1, "--batch-size", 4,
                 "--workers", 2, "--shuffle-buffer", 8, "-q")
    assert res.exit_code == 0, res.output
    audit_dir = tmp_path / f"audit-{where}"
    res = invoke("evaluate", "--checkpoint", shard_root / "run-local-ref" / "best.pt", "--key", shard_root / "key.json",
                 "--test", base["plain"], "--wrong-keys", 2, "--workers", 2, "--output", audit_dir, "-q")
    assert res.exit_code == 0, res.output
    return checkpoint.load(run / "last.pt"), json.loads((audit_dir / "audit.json").read_text())


def test_train_and_evaluate_give_the_same_numbers_over_http_and_s3(shard_root, bases, tmp_path):
    ref_run = shard_root / "run-local-ref"
    if not ref_run.exists():
        assert invoke("train", "--shards", shard_root / "np4", "--output", ref_run, "--epochs", 1, "--batch-size", 4,
                      "--workers", 0, "-q").exit_code == 0
    results = {where: train_and_audit(shard_root, where, bases[where], tmp_path) for where in ("local", "http", "s3")}
    ref_state, ref_audit = results["local"]
    for where in ("http", "s3"):
        state, audit = results[where]
        for k in ("train_loss", "holdout_loss", "train_samples"):
            assert state["metrics"][0][k] == ref_state["metrics"][0][k], (where, k)
        for name, tensor in ref_state["model"].items():
            assert torch.equal(state["model"][name], tensor), (where, name)
        assert audit["results"]["correct"] == ref_audit["results"]["correct"]
        assert audit["results"]["plain"] == ref_audit["results"]["plain"]
        assert audit["results"]["wrong"] == ref_audit["results"]["wrong"]
        assert audit["test"]["path"] == bases[where]["plain"]


@pytest.mark.parametrize("where", ["http", "s3"])
def test_big_shard_streams_and_verifies(bases, where):
    res = invoke("verify", bases[where]["big"], "-q")
    assert res.exit_code == 0 and "OK: 1 shards, 30 samples" in res.output, res.output
    local = [(k, p) for px, _, ks, _ in open_shards(bases["local"]["big"], "test", batch_size=8, shuffle=False)
             for k, p in zip(ks, px)]
    remote = [(k, p) for px, _, ks, _ in open_shards(bases[where]["big"], "test", batch_size=8, shuffle=False,
                                                      workers=2) for k, p in zip(ks, px)]
    assert [k for k, _ in remote] == [k for k, _ in local] and len(local) == 30
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(local, remote))


def test_remote_errors_are_one_line(bases, shard_root, tmp_path):
    http = bases["http"]["plain"]
    missing = http.replace("plain/", "nothing-here/")
    assert_user_error(invoke("verify", missing, "-q"), missing + "manifest.json", "missing")
    assert_user_error(invoke("verify", "s3://keyshard-test/nothing-here/", "-q"),
                      "s3://keyshard-test/nothing-here/manifest.json", "missing")
    assert_user_error(invoke("verify", "s3://no-such-bucket/x/", "-q"), "s3://no-such-bucket/x/manifest.json")
    refused = f"http://127.0.0.1:{free_port()}/plain/"
    assert_user_error(invoke("verify", refused, "-q"), refused + "manifest.json", "cannot connect")
    # a shard the manifest lists but the server no longer has: the trainer names its URL
    served = shard_root / "gone"
    shutil.copytree(shard_root / "np4", served)
    first = sorted(served.glob("train-*.tar"))[0]
    first.unlink()
    res = invoke("train", "--shards", bases["http"]["plain"].replace("plain/", "gone/"), "--output", tmp_path / "r",
                 "--epochs", 1, "--batch-size", 4, "--workers", 2, "-q")
    assert_user_error(res, "gone/" + first.name, "missing")
    assert not (tmp_path / "r" / "last.pt").exists()
