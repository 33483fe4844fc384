"""`encrypt --backend dask`: byte-identical to `--jobs 1` on a real cluster, and killed/resumed.

Every dask process here is started in a session of its own (``start_new_session=True``) on
free localhost ports (port 0: the OS picks), and stopped by killing that process group — cluster
workers can outlive their parent — after which the test checks that nothing of the group is
still running.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import psutil
import pytest
from dask.distributed import Client

from keyshard import keys
from keyshard.pipeline.toy_voc import make_toy_voc

from conftest import assert_user_error, invoke, run_subprocess

SIZE = 64
# 40 images -> 20 train ids (18 train, 2 holdout) and 20 test ids; 2 augmented replicas of each
# train image and one sample per shard give 76 shards, so a kill after the first shard reliably
# lands before the last.
COMMON = ["--image-size", SIZE, "--shard-size", 1, "--augment-copies", 2, "-q"]
IGNORED = ("command", "created_utc")  # the only manifest fields that may differ between runs
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
STARTED_GROUPS: list[int] = []  # every process group a test started, checked once more at the end


# -- process groups ---------------------------------------------------------------------------

def alive_in_group(pgid: int) -> list[psutil.Process]:
    """Processes (zombies aside) whose process group is ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def start_group(argv, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new session and process group (pgid == its pid)."""
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env=ENV, start_new_session=True)
    STARTED_GROUPS.append(proc.pid)
    return proc


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 20.0) -> None:
    """Signal the whole group, escalate to SIGKILL after ``grace`` s, and wait until none is left."""
    for s, wait in ((sig, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not alive_in_group(proc.pid):
                return
            time.sleep(0.05)
    left = alive_in_group(proc.pid)
    assert proc.poll() is not None and not left, f"left running: {[p.cmdline() for p in left]}"


@pytest.fixture(scope="module", autouse=True)
def no_dask_process_left_behind():
    yield
    for pgid in STARTED_GROUPS:
        left = alive_in_group(pgid)
        assert not left, f"process group {pgid} still running: {[p.cmdline() for p in left]}"
    mine = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    dask_children = [p.cmdline() for p in mine if any("dask" in a or "distributed" in a for a in p.cmdline())]
    assert not dask_children, dask_children


# -- data and reference -----------------------------------------------------------------------

def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def assert_same_output(out: Path, ref: Path) -> None:
    """Every shard byte-identical; manifest.json byte-identical once command/created_utc agree."""
    assert shard_bytes(out) == shard_bytes(ref)
    text, ref_text = (out / "manifest.json").read_text(), (ref / "manifest.json").read_text()
    doc, ref_doc = json.loads(text), json.loads(ref_text)
    assert json.dumps(doc, indent=2, sort_keys=True) + "\n" == text  # the writer's own format
    doc.update({k: ref_doc[k] for k in IGNORED})
    assert json.dumps(doc, indent=2, sort_keys=True) + "\n" == ref_text
    assert not (out / ".keyshard-partial").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """root/{voc, key.json, ref}: a toy VOC, an FFX key and the `--jobs 1` reference shards."""
    root = tmp_path_factory.mktemp("daskdata")
    make_toy_voc(root / "voc", images=40, seed=3, progress=False)
    keys.save(keys.generate("ffx", 8), root / "key.json")
    res = invoke("encrypt", "--voc", root / "voc", "--key", root / "key.json", "-o", root / "ref",
                 "--jobs", 1, *COMMON)
    assert res.exit_code == 0, res.output
    assert len(shard_bytes(root / "ref")) == 76
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`dask scheduler` + `dask worker --nworkers 2` (the README's multi-node recipe, on one host).

    The workers run in another directory than the client, as they would on other nodes, so
    paths given relative to the client's working directory must not reach them as such.
    """
    d = tmp_path_factory.mktemp("cluster")
    (d / "workers").mkdir()
    sched_file = d / "scheduler.json"
    procs = []
    try:
        procs.append(start_group([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                                  "--port", 0, "--no-dashboard", "--scheduler-file", sched_file],
                                 d / "scheduler.log", cwd=d))
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert procs[0].poll() is None, (d / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written in one go; let it be complete
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs.append(start_group([sys.executable, "-m", "dask", "worker", address, "--nworkers", 2,
                                  "--nthreads", 1, "--host", "127.0.0.1", "--no-dashboard",
                                  "--local-directory", d / "workers"],
                                 d / "workers.log", cwd=d / "workers"))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=90)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for proc in reversed(procs):
            stop_group(proc)


# -- tests ------------------------------------------------------------------------------------

def test_dask_scheduler_gives_the_same_bytes_as_jobs_1(data, cluster):
    # relative --voc/--key/-o, resolved in the client's directory, not the workers'
    res = run_subprocess("encrypt", "--voc", "voc", "--key", "key.json", "-o", "on-cluster", *COMMON,
                         "--backend", "dask", "--dask-scheduler", cluster, cwd=data, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_output(data / "on-cluster", data / "ref")
    doc = json.loads((data / "on-cluster" / "manifest.json").read_text())
    assert doc["command"][-2:] == ["--dask-scheduler", cluster]


def test_local_cluster_killed_midway_resumes_byte_identical(data, tmp_path):
    """`--backend dask --jobs 2` (a LocalCluster of 2 worker processes) killed with its whole
    process group once some but not all shards are final; `--resume` with the default backend
    then finishes byte-identical to `--jobs 1`."""
    out = tmp_path / "killed"
    job = ["encrypt", "--voc", data / "voc", "--key", data / "key.json", "-o", out, *COMMON]
    proc = start_group([sys.executable, "-c", "from keyshard.cli import main; main()", *job,
                        "--backend", "dask", "--jobs", 2], tmp_path / "encrypt.log")
    reference = shard_bytes(data / "ref")
    try:
        deadline = time.monotonic() + 120
        while not any(out.glob("*.tar")):  # final names only; partial shards live in .keyshard-partial/
            assert proc.poll() is None, (tmp_path / "encrypt.log").read_text()
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        stop_group(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    finished = shard_bytes(out)
    assert 1 <= len(finished) < len(reference), "kill came too late to test resume"
    for name, blob in finished.items():  # nothing truncated under a final name
        assert blob == reference[name], name
    assert not (out / "manifest.json").exists()

    res = run_subprocess(*job, "--resume", timeout=300)  # default backend and --jobs
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_output(out, data / "ref")


def test_unreachable_scheduler_is_one_clear_line(data, tmp_path):
    with socket.socket() as s:  # a free port: nothing listens there once it is closed
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        res = invoke("encrypt", "--voc", data / "voc", "--key", data / "key.json", "-o", tmp_path / "x", *COMMON,
                     "--backend", "dask", "--dask-scheduler", address)
    assert_user_error(res, address, "cannot connect")
    assert not (tmp_path / "x").exists()


def test_workers_get_the_key_material_not_the_secret(data):
    """What each task carries (README: "On a dask cluster"): the derived material, which is as
    good as the key for these images, but not the key file's secret or FFX password."""
    key = keys.load(data / "key.json")
    blob = pickle.dumps(key.material)  # the `material` argument of every process_shard task
    assert key.material.table.astype("<u2").tobytes() in blob  # the material itself does travel
    for needle in (key.secret, key.secret.hex().encode(), key.password):
        assert needle not in blob
