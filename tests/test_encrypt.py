"""The encryption job end to end: determinism, read-back, decrypt, replicas, resume, verify."""

import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from keyshard import faults, keys
from keyshard.pipeline import encrypt_job
from keyshard.manifest import read as read_manifest
from keyshard.shardformat import decode_mask, decode_npy, iter_tar_samples
from keyshard.transforms import compile_plan

from conftest import assert_user_error, invoke

SIZE = 32
COMMON = ["--image-size", SIZE, "--shard-size", 4, "-q"]


def _error_lines(err: str) -> list[str]:
    """stderr less the one warning `encrypt --key` prints up front for a key whose (method, M)
    the ciphertext-only benchmark broke (at most one such line, and only that one)."""
    lines = err.strip().splitlines()
    warnings = [ln for ln in lines if ln.startswith("warning: ciphertext-only:")]
    assert len(warnings) <= 1, err
    return [ln for ln in lines if ln not in warnings]

def encrypt(toy, out, *extra, key=None, jobs=1):
    args = ["encrypt", "--voc", toy, "-o", out, "--jobs", jobs, *COMMON, *extra]
    args += ["--key", key] if key else ["--plain"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return read_manifest(out).raw


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def samples(out: Path) -> dict:
    """key -> (pixels, mask, meta) read with plain tarfile."""
    result = {}
    for shard in sorted(out.glob("*.tar")):
        for key, files in iter_tar_samples(shard):
            assert key not in result, f"{key} appears twice"
            result[key] = (decode_npy(files["img.npy"]), decode_mask(files["mask.png"]), json.loads(files["json"]))
    return result


@pytest.fixture(scope="module")
def plain(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    encrypt(toy, out)
    return out


@pytest.fixture(scope="module")
def enc_ffx(toy, key_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ffx") / "out"
    encrypt(toy, out, key=key_files["ffx"])
    return out


@pytest.fixture(scope="module")
def enc_ffx_single(toy, key_files, tmp_path_factory):
    """FFX shards of one sample each (24 shards): the kill tests stop a run part-way through."""
    out = tmp_path_factory.mktemp("ffx1") / "out"
    encrypt(toy, out, "--shard-size", 1, key=key_files["ffx"])
    return out


def test_jobs_1_and_2_give_byte_identical_shards(toy, key_files, enc_ffx, tmp_path):
    out2 = tmp_path / "j2"
    doc2 = encrypt(toy, out2, key=key_files["ffx"], jobs=2)
    assert shard_bytes(out2) == shard_bytes(enc_ffx)
    assert doc2["shards"] == read_manifest(enc_ffx).raw["shards"]
    assert doc2["source"]["content_sha256"] == read_manifest(enc_ffx).raw["source"]["content_sha256"]


def test_tar_source_gives_the_same_shards_as_the_directory(toy, key_files, enc_ffx, tmp_path):
    out = tmp_path / "fromtar"
    doc = encrypt(toy / "VOCtrainval_11-May-2012.tar", out, key=key_files["ffx"])
    assert doc["source"]["kind"] == "tar"
    assert shard_bytes(out) == shard_bytes(enc_ffx)
    assert doc["source"]["content_sha256"] == read_manifest(enc_ffx).raw["source"]["content_sha256"]


@pytest.mark.parametrize("method", keys.METHODS)
def test_encrypted_samples_decrypt_to_the_plain_shards(method, toy, key_files, plain, tmp_path):
    out = tmp_path / method
    doc = encrypt(toy, out, key=key_files[method])
    key = keys.load(key_files[method])
    assert doc["encryption"]["key_fingerprint"] == key.fingerprint
    assert doc["encryption"]["pixel_divisor"] == key.material.divisor
    plan = compile_plan(key.material, SIZE, SIZE)
    enc, ref = samples(out), samples(plain)
    assert enc.keys() == ref.keys()
    for k, (pixels, mask, meta) in enc.items():
        assert pixels.dtype == (np.uint16 if method == "ffx" else np.uint8)
        np.testing.assert_array_equal(pixels, plan.encrypt(ref[k][0]))
        np.testing.assert_array_equal(plan.decrypt(pixels), ref[k][0])
        np.testing.assert_array_equal(mask, ref[k][1])
        assert meta == ref[k][2]
    # the CLI decrypt writes the same plain image
    k0 = sorted(enc)[0]
    res = invoke("decrypt", out, "--key", key_files[method], "--sample", k0, "-o", tmp_path / f"{method}.png")
    assert res.exit_code == 0, res.output
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{method}.png")), ref[k0][0])


def test_every_id_once_and_readable_with_webdataset(toy, plain):
    doc = read_manifest(plain).raw
    counts = doc["splits"]["counts"]
    assert counts == {"train": 11, "holdout": 1, "test": 12}
    train_ids = (toy / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").read_text().split()
    val_ids = (toy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    urls = [str(plain / s["file"]) for s in doc["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        arr = np.load(io.BytesIO(sample["img.npy"]))
        assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8
        seen.setdefault(meta["split"], []).append(sample["__key__"])
    assert sorted(seen["train"] + seen["holdout"]) == sorted(train_ids)
    assert sorted(seen["test"]) == sorted(val_ids)
    assert sum(s["samples"] for s in doc["shards"]) == len(train_ids) + len(val_ids)
    # masks: class ids and void only, same size as the image
    for _, mask, _ in samples(plain).values():
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= set(range(21)) | {255}


def test_augmentation_replicas_layout(toy, key_files, tmp_path):
    out = tmp_path / "aug"
    doc = encrypt(toy, out, "--augment-copies", 2, "--splits", "train", key=key_files["np"])
    by_replica = {}
    for shard in doc["shards"]:
        keys_in = [k for k, _ in iter_tar_samples(out / shard["file"])]
        suffix = "" if shard["replica"] == 0 else f"_a{shard['replica']}"
        assert all(k.endswith(suffix) and (shard["replica"] or "_a" not in k) for k in keys_in)
        by_replica.setdefault(shard["replica"], []).extend(keys_in)
    assert sorted(by_replica) == [0, 1, 2]
    ids = sorted(by_replica[0])
    assert len(ids) == 11
    for r in (1, 2):
        assert sorted(k.rsplit("_a", 1)[0] for k in by_replica[r]) == ids
    s = samples(out)
    assert not np.array_equal(s[ids[0]][0], s[ids[0] + "_a1"][0])
    assert s[ids[0] + "_a1"][2]["replica"] == 1
    # replicas depend on the seed, not on the run
    out2 = tmp_path / "aug2"
    encrypt(toy, out2, "--augment-copies", 2, "--splits", "train", key=key_files["np"], jobs=2)
    assert shard_bytes(out2) == shard_bytes(out)


def test_paper_split_sizes(tmp_path):
    from keyshard.pipeline.toy_voc import make_toy_voc
    from keyshard.pipeline.voc import VocSource

    root = make_toy_voc(tmp_path / "voc", voc_sizes=True, min_side=8, max_side=8, progress=False)
    tasks, counts = encrypt_job.plan_tasks(VocSource.open(root.parent.parent), encrypt_job.EncryptOptions())
    assert counts == {"train": 1318, "holdout": 146, "test": 1449}
    again, _ = encrypt_job.plan_tasks(VocSource.open(root), encrypt_job.EncryptOptions())
    holdout = [r.voc_id for t in tasks if t.split == "holdout" for r in t.refs]
    assert holdout == [r.voc_id for t in again if t.split == "holdout" for r in t.refs]
    other, _ = encrypt_job.plan_tasks(VocSource.open(root), encrypt_job.EncryptOptions(split_seed=1))
    assert holdout != [r.voc_id for t in other if t.split == "holdout" for r in t.refs]


def test_kill_and_resume_is_byte_identical(toy, key_files, enc_ffx_single, tmp_path):
    """SIGKILL `encrypt --jobs 1` right after its third shard (a test hook: an exact point, not a
    race with a timer); --resume keeps those three and finishes byte-identical."""
    import subprocess
    import sys

    out = tmp_path / "killed"
    args = ["encrypt", "--voc", toy, "--key", key_files["ffx"], "-o", out, "--jobs", 1, *COMMON, "--shard-size", 1]
    proc = subprocess.run([sys.executable, "-c", "from keyshard.cli import main; main()", *map(str, args)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False,
                          env={**os.environ, **faults.arm("encrypt.commit", 3)})
    assert proc.returncode == -signal.SIGKILL
    reference = shard_bytes(enc_ffx_single)
    finished = shard_bytes(out)
    assert len(finished) == 3 < len(reference)
    for name, data in finished.items():  # nothing truncated under a final name
        assert data == reference[name], name
    kept = {name: (out / name).stat().st_ino for name in finished}
    assert not (out / "manifest.json").exists()
    assert_user_error(invoke(*args), "--resume")
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert {name: (out / name).stat().st_ino for name in finished} == kept  # not redone
    assert shard_bytes(out) == reference
    assert read_manifest(out).raw["shards"] == read_manifest(enc_ffx_single).raw["shards"]
    assert not (out / ".keyshard-partial").exists()


def test_resume_refuses_other_settings(toy, key_files, tmp_path):
    out = tmp_path / "part"
    job = ["encrypt", "--voc", toy, "-o", out, *COMMON, "--jobs", 1]
    # an unfinished job started with the np key (no shard written yet)
    opts = encrypt_job.EncryptOptions(size=SIZE, shard_size=4)
    src = encrypt_job.VocSource.open(toy)
    identity = encrypt_job.job_identity(src, keys.load(key_files["np"]), opts)
    encrypt_job.prepare_output(out, identity, resume=False)
    assert_user_error(invoke(*job, "--key", key_files["shf"], "--resume"), str(out), "encryption")
    assert_user_error(invoke(*job, "--key", key_files["np"], "--resume", "--augment-copies", 1), "options")
    assert invoke(*job, "--key", key_files["np"], "--resume").exit_code == 0
    # a finished directory is never written into again
    assert_user_error(invoke(*job, "--key", key_files["np"]), "already holds a finished dataset")


def test_refuses_non_empty_output(toy, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_user_error(invoke("encrypt", "--voc", toy, "--plain", "-o", out, *COMMON), str(out), "not an empty")
    assert (out / "precious.txt").read_text() == "keep me"


def test_verify_detects_problems(toy, tmp_path, plain):
    import shutil

    out = tmp_path / "v"
    shutil.copytree(plain, out)
    assert invoke("verify", out, "-q").exit_code == 0
    shards = sorted(out.glob("*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[700] ^= 1
    shards[0].write_bytes(bytes(data))
    shards[1].unlink()
    (out / "test-999999.tar").write_bytes(b"")
    res = invoke("verify", out, "-q")
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("keyshard: verify:")]
    assert len(lines) == 3, res.output
    assert any(shards[0].name in ln and "sha256" in ln for ln in lines)
    assert any(shards[1].name in ln and "missing" in ln for ln in lines)
    assert any("test-999999.tar" in ln and "not listed" in ln for ln in lines)
    assert_user_error(invoke("verify", tmp_path), "manifest.json")


def test_no_key_material_in_outputs(toy, key_files, enc_ffx, tmp_path):
    key = keys.load(key_files["ffx"])
    secret_hex = key.secret.hex()
    needles = [key.secret, secret_hex.encode(), key.password,
               key.material.mask.astype(np.uint8).tobytes(), key.material.table.astype("<u2").tobytes(),
               np.packbits(key.material.mask).tobytes()]
    blobs = [p.read_bytes() for p in enc_ffx.iterdir() if p.is_file()]
    res = invoke("encrypt", "--voc", toy, "--key", key_files["ffx"], "-o", tmp_path / "x", "--image-size", SIZE,
                 "--shard-size", 4, "--jobs", 1)
    blobs.append(res.output.encode())
    bad = invoke("encrypt", "--voc", toy, "--key", key_files["ffx"], "-o", tmp_path / "x", "--image-size", SIZE)
    blobs.append(bad.output.encode())
    for blob in blobs:
        for needle in needles:
            assert needle not in blob
    skey = keys.load(key_files["shf"])
    out = tmp_path / "shf"
    encrypt(toy, out, key=key_files["shf"])
    perm_bytes = [skey.material.perm.astype(t).tobytes() for t in ("<u4", "<u8", "<u2")]
    for p in out.iterdir():
        for needle in perm_bytes + [skey.secret, skey.secret.hex().encode()]:
            assert needle not in p.read_bytes()


def test_other_joblib_backend_gives_the_same_bytes(toy, key_files, enc_ffx, tmp_path):
    out = tmp_path / "threads"
    encrypt(toy, out, "--backend", "threading", key=key_files["ffx"], jobs=2)
    assert shard_bytes(out) == shard_bytes(enc_ffx)


def test_dask_backend_without_dask_is_one_clear_line(toy, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dask(name, *args, **kw):
        if name.startswith("dask"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    assert_user_error(invoke("encrypt", "--voc", toy, "--plain", "-o", tmp_path / "d", "--backend", "dask", *COMMON),
                      "keyshard[dask]")
    assert not (tmp_path / "d").exists()


def test_workers_die_with_a_killed_parent_and_write_nothing_more(toy, key_files, enc_ffx_single, tmp_path):
    """SIGKILL the `encrypt` process (not its group) while its two workers are busy (a test hook
    kills it right after its second shard): within 3 s none of its workers is alive, no shard
    appeared under a final name after the kill (only the job's own process renames shards into
    place), and --resume finishes byte-identical."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "orphans"
    args = ["encrypt", "--voc", toy, "--key", key_files["ffx"], "-o", out, "--jobs", 2, *COMMON, "--shard-size", 1]
    proc = subprocess.Popen([sys.executable, "-c", "from keyshard.cli import main; main()", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **faults.arm("encrypt.commit", 2)})
    parent, workers = psutil.Process(proc.pid), []
    while proc.poll() is None:  # note the workers while the job lives
        try:
            workers = parent.children(recursive=True) or workers
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    at_kill = sorted(p.name for p in out.glob("*.tar"))
    assert len(workers) == 2 and len(at_kill) == 2
    time.sleep(3)
    alive = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(w.pid, w.cmdline()[:3]) for w in alive]
    assert sorted(p.name for p in out.glob("*.tar")) == at_kill
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert shard_bytes(out) == shard_bytes(enc_ffx_single)
    assert read_manifest(out).raw["shards"] == read_manifest(enc_ffx_single).raw["shards"]


@pytest.mark.parametrize("backend", ["processes", "loky"])
def test_a_killed_worker_stops_the_run_with_one_line_and_resume_finishes(backend, toy, key_files, enc_ffx_single,
                                                                         tmp_path):
    """A worker SIGKILLed mid-run (as by the OOM killer; a test hook kills the one that takes
    shard test-000003): `encrypt` exits 1 with one line, no traceback and no manifest, its other
    workers gone too; --resume is byte-identical."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "oom"
    args = ["encrypt", "--voc", toy, "--key", key_files["ffx"], "-o", out, "--jobs", 2, *COMMON, "--shard-size", 1]
    proc = subprocess.Popen([sys.executable, "-c", "from keyshard.cli import main; main()", *map(str, args),
                             "--backend", backend], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **faults.arm("encrypt.worker", "test-000003.tar")})
    workers = []
    while proc.poll() is None and not workers:
        workers = psutil.Process(proc.pid).children()
        time.sleep(0.005)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    lines = _error_lines(err)
    assert len(lines) == 1 and "worker process ended abruptly" in lines[0] and "--resume" in lines[0], err
    assert not (out / "manifest.json").exists()
    time.sleep(1)
    assert workers and not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert shard_bytes(out) == shard_bytes(enc_ffx_single)


def test_ctrl_c_stops_the_job_and_its_workers_with_one_line(toy, key_files, enc_ffx_single, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it; a test hook sends it
    right after the second shard): exit 130, one line, no traceback from the job or its forked
    workers, none of them left; --resume finishes byte-identical."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "ctrl-c"
    args = ["encrypt", "--voc", toy, "--key", key_files["ffx"], "-o", out, "--jobs", 2, *COMMON, "--shard-size", 1]
    # as from a terminal: Ctrl-C enabled (a shell without job control starts `cmd &` with SIGINT
    # ignored, and the job inherits that — so did this test when CI was run in the background)
    proc = subprocess.Popen([sys.executable, "-c", "from keyshard.cli import main; main()", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, **faults.arm("encrypt.commit", 2, "INT")})
    workers = []
    while proc.poll() is None and len(workers) < 2:
        try:
            workers = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _error_lines(err) == ["keyshard: interrupted (an unfinished job can be continued with --resume)"]
    assert not (out / "manifest.json").exists()
    time.sleep(1)
    assert len(workers) == 2 and not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert shard_bytes(out) == shard_bytes(enc_ffx_single)


def test_a_partial_dir_left_before_job_json_is_cleaned(toy, tmp_path):
    """A run that died before recording its job (e.g. disk full at start) leaves only an empty
    .keyshard-partial/: a rerun cleans it instead of refusing forever; a real unfinished run is kept."""
    out = tmp_path / "stale"
    (out / ".keyshard-partial" / "tmp").mkdir(parents=True)
    (out / ".keyshard-partial" / "tmp" / "train-000000.tar.123").write_bytes(b"half")
    res = invoke("encrypt", "--voc", toy, "--plain", "-o", out, "--jobs", 1, *COMMON)
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists() and not (out / ".keyshard-partial").exists()
    kept = tmp_path / "unfinished"
    (kept / ".keyshard-partial" / "done").mkdir(parents=True)
    (kept / ".keyshard-partial" / "done" / "train-000000.tar.json").write_text("{}")
    assert_user_error(invoke("encrypt", "--voc", toy, "--plain", "-o", kept, *COMMON), "--resume")
