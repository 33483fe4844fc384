"""Hostile and odd CLI input (issue 12): every numeric option has a range, outputs into missing or
unwritable places, malformed checkpoints and audits — one line each, never a traceback — and the
wrong-key audit in chunks (same scores, bounded memory)."""

import errno
import json
import shutil
import weakref

import pytest
import torch

from keyshard import keys
from keyshard.evaluate import audit as audit_mod
from keyshard.evaluate import wrong_keys
from keyshard.evaluate.report import write_audit
from keyshard.train import checkpoint

from conftest import assert_user_error, invoke, keyed_run


def assert_usage_error(result, *fragments):
    """click's usage error: exit 2, one `Error:` line naming the option, no traceback."""
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, text
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# Required options are given (paths need not exist: the range check comes first).
ENCRYPT = ["encrypt", "--voc", "nowhere", "--plain", "-o", "nowhere-out"]
TRAIN = ["train", "--shards", "nowhere", "--output", "nowhere-run"]
EVALUATE = ["evaluate", "--checkpoint", "nowhere.pt", "--test", "nowhere"]
SEARCH = ["attack", "search", "--checkpoint", "nowhere.pt", "--labelled-shards", "x", "--test", "x"]
FINETUNE = ["attack", "finetune", "--checkpoint", "nowhere.pt", "--plain-train", "x", "--test", "x"]

RANGE_CASES = [
    (ENCRYPT + ["--image-size", "0"], "--image-size"),
    (ENCRYPT + ["--image-size", "-5"], "--image-size"),
    (ENCRYPT + ["--image-size", "100000"], "--image-size"),
    (ENCRYPT + ["--jobs", "0"], "--jobs"),
    (ENCRYPT + ["--jobs", "-2"], "--jobs"),
    (ENCRYPT + ["--jobs", "1000000"], "--jobs"),
    (ENCRYPT + ["--shard-size", "0"], "--shard-size"),
    (ENCRYPT + ["--holdout", "-1"], "--holdout"),
    (ENCRYPT + ["--augment-copies", "-1"], "--augment-copies"),
    (ENCRYPT + ["--augment-copies", "100000"], "--augment-copies"),
    (ENCRYPT + ["--split-seed", "-1"], "--split-seed"),
    (ENCRYPT + ["--augment-seed", str(2**64)], "--augment-seed"),
    (ENCRYPT + ["--crop-scale", "0,2"], "--crop-scale"),
    (ENCRYPT + ["--crop-scale", "0.1,nan"], "--crop-scale"),
    (ENCRYPT + ["--backend", "nonsense"], "--backend"),
    (TRAIN + ["--lr", "0"], "--lr"),
    (TRAIN + ["--lr", "-0.1"], "--lr"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--lr", "inf"], "--lr"),
    (TRAIN + ["--momentum", "1.5"], "--momentum"),
    (TRAIN + ["--momentum", "-0.1"], "--momentum"),
    (TRAIN + ["--weight-decay", "-1"], "--weight-decay"),
    (TRAIN + ["--min-lr", "-1e-4"], "--min-lr"),
    (TRAIN + ["--aux-weight", "nan"], "--aux-weight"),
    (TRAIN + ["--epochs", "0"], "--epochs"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--workers", "-1"], "--workers"),
    (TRAIN + ["--seed", "-1"], "--seed"),
    (TRAIN + ["--block-crop", "0"], "--block-crop"),
    (TRAIN + ["--block-size", "513"], "--block-size"),  # above keys.MAX_BLOCK_SIZE
    (TRAIN + ["--shuffle-buffer", "-1"], "--shuffle-buffer"),
    (EVALUATE + ["--wrong-keys", "10001"], "--wrong-keys"),
    (EVALUATE + ["--wrong-keys", "100000"], "--wrong-keys"),
    (EVALUATE + ["--wrong-keys", "0"], "--wrong-keys"),
    (EVALUATE + ["--seed", "-1"], "--seed"),
    (EVALUATE + ["--near-miss-keys", "0"], "--near-miss-keys"),
    (EVALUATE + ["--near-miss-keys", "101"], "--near-miss-keys"),
    (EVALUATE + ["--batch-size", "0"], "--batch-size"),
    (EVALUATE + ["--workers", "1000"], "--workers"),
    (["demo", "--jobs", "0"], "--jobs"),
    (["demo", "--image-size", "0"], "--image-size"),
    (["demo", "-M", "0"], "--block-size"),
    (["demo", "--wrong-keys", "10001"], "--wrong-keys"),
    (["demo", "--key-seed", "-1"], "--key-seed"),
    (["toy-voc", "out", "--images", "0"], "--images"),
    (["toy-voc", "out", "--images", "2"], "--images"),
    (["toy-voc", "out", "--min-side", "0"], "--min-side"),
    (["toy-voc", "out", "--seed", "-3"], "--seed"),
    (SEARCH + ["--budget", "1"], "--budget"),
    (SEARCH + ["--top", "0"], "--top"),
    (SEARCH + ["--seed", "-1"], "--seed"),
    (SEARCH + ["--labelled", "0"], "--labelled"),
    (FINETUNE + ["--lr", "0"], "--lr"),
    (FINETUNE + ["--lr", "inf"], "--lr"),
    (FINETUNE + ["--epochs", "0"], "--epochs"),
]


@pytest.mark.parametrize("args,option", RANGE_CASES, ids=[" ".join(a[-2:]) for a, _ in RANGE_CASES])
def test_every_numeric_option_has_a_range(args, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but never into the repository
    assert_usage_error(invoke(*args), option)
    assert not any(tmp_path.iterdir())


def test_jobs_accepts_minus_one_and_positive_counts():
    from keyshard.options import JOBS

    assert JOBS.convert("-1", None, None) == -1 and JOBS.convert("3", None, None) == 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Plain + NP-M4 shards of a 24-image toy VOC at 32² and a demo model trained 1 epoch."""
    return keyed_run(tmp_path_factory.mktemp("hostile"), "np", 4, images=24, seed=2, epochs=1)


def audit_args(run):
    return ["--checkpoint", run / "run" / "best.pt", "--key", run / "key.json", "--test", run / "plain",
            "--workers", 0, "-q"]


# -- the wrong-key audit in chunks ----------------------------------------------------------

def test_chunked_audit_equals_one_pass_and_bounds_live_plans(run, tmp_path, monkeypatch):
    common = dict(ckpt_path=str(run / "run" / "best.pt"), key_path=str(run / "key.json"),
                  test_dir=str(run / "plain"), n_wrong=7, seed=3, batch_size=5, workers=0, progress=False,
                  near_miss=(1,), near_miss_count=2)
    whole = audit_mod.run_audit(**common)
    assert whole["scoring"] == {"keys_per_pass": audit_mod.MAX_KEYS_PER_PASS, "passes": 1}

    live, peak, calls = set(), [0], [0]
    real = audit_mod.compile_plan

    class Tracked:  # counts compiled torch plans alive at once (freed plans leave `live`)
        def __init__(self, plan):
            self.plan = plan

        def to_torch(self, device=None):
            tplan = self.plan.to_torch(device)
            token = object()
            live.add(token)
            weakref.finalize(tplan, live.discard, token)
            calls[0] += 1
            peak[0] = max(peak[0], len(live))
            return tplan

    monkeypatch.setattr(audit_mod, "compile_plan", lambda material, h, w: Tracked(real(material, h, w)))
    chunked = audit_mod.run_audit(**common, keys_per_pass=3)
    # correct + 2 near-miss + 7 wrong = 10 plans; pass 1 holds correct + 2, then 3, 3, 1
    assert calls[0] == 10 and peak[0] == 3 and not live
    assert chunked["scoring"] == {"keys_per_pass": 3, "passes": 4}
    for part in ("correct", "plain", "wrong", "near_miss"):
        assert chunked["results"][part] == whole["results"][part], part
    assert chunked["wrong_keys"] == whole["wrong_keys"] and chunked["wrong_keys"]["count"] == 7

    # a run with two audit folders: `report RUN` includes both (and one further down)
    run_dir = tmp_path / "myrun"
    write_audit(whole, run_dir / "audit")
    write_audit(chunked, run_dir / "audit-chunked")
    write_audit(whole, run_dir / "old" / "audit")
    rep = invoke("report", run_dir, "--csv", tmp_path / "new" / "dir" / "t.csv")
    assert rep.exit_code == 0, rep.output
    rows = [line for line in rep.output.splitlines() if line.startswith("| NP | 4 |")]
    assert len(rows) == 3, rep.output
    for name in ("audit/audit.json", "audit-chunked/audit.json", "old/audit/audit.json"):
        assert sum(name in r for r in rows) >= 1, (name, rows)
    assert len((tmp_path / "new" / "dir" / "t.csv").read_text().splitlines()) == 4  # header + 3, dir created
    # the same audit named twice is counted once
    again = invoke("report", run_dir / "audit", run_dir / "audit" / "audit.json")
    assert len([line for line in again.output.splitlines() if line.startswith("| NP | 4 |")]) == 1


def test_wrong_keys_upper_bound_and_lazy_draw():
    key = keys.Key("shf", 8, bytes(range(32)))
    with pytest.raises(Exception, match="at most 10000"):
        wrong_keys.iter_draw(key, wrong_keys.MAX_COUNT + 1, 0)  # refused before any key is made
    lazy = wrong_keys.iter_draw(key, wrong_keys.MAX_COUNT, 0)
    first = [next(lazy) for _ in range(3)]
    assert [k.fingerprint for k in first] == [k.fingerprint for k in wrong_keys.draw(key, 3, 0)]


def test_evaluate_refuses_too_many_keys_in_one_line(run, tmp_path):
    res = invoke("evaluate", *audit_args(run), "--wrong-keys", 10001, "--output", tmp_path / "a")
    assert_usage_error(res, "--wrong-keys", "10000")
    assert_user_error(invoke("evaluate", *audit_args(run), "--wrong-keys", 2, "--near-miss", "1,30",
                             "--output", tmp_path / "b"), "distance 30", "outside 1..24")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- outputs: missing directories are created; unwritable places are one line ----------------

def first_sample(shards):
    from keyshard.manifest import read
    from keyshard.shardformat import iter_tar_samples

    return next(name for name, _ in iter_tar_samples(shards / read(shards).raw["shards"][0]["file"]))


def test_outputs_into_missing_directories_are_created(run, tmp_path):
    key_id = first_sample(run / "enc")
    out = tmp_path / "missing" / "deeper" / "x.png"
    res = invoke("decrypt", run / "enc", "--key", run / "key.json", "--sample", key_id, "-o", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_user_error(invoke("decrypt", run / "enc", "--key", run / "key.json", "--sample", key_id, "-o", out),
                      str(out), "already exists")
    noext = tmp_path / "noext"  # no extension: still a PNG (the format is not guessed from the name)
    assert invoke("decrypt", run / "enc", "--key", run / "key.json", "--sample", key_id, "-o", noext).exit_code == 0
    assert noext.read_bytes()[:4] == b"\x89PNG"
    res = invoke("evaluate", *audit_args(run), "--wrong-keys", 1, "--output", tmp_path / "a" / "b" / "audit")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "b" / "audit" / "audit.json").exists()
    res = invoke("keygen", "--method", "np", "-M", 4, "-o", tmp_path / "k" / "new" / "key.json")
    assert res.exit_code == 0, res.output
    assert keys.load(tmp_path / "k" / "new" / "key.json").block_size == 4
    res = invoke("signing-key", "-o", tmp_path / "s" / "new" / "publisher")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "new" / "publisher.pub").exists()
    res = invoke("protect", "--checkpoint", run / "run" / "best.pt", "--key", run / "key.json",
                 "-o", tmp_path / "p" / "q" / "best.pt")
    assert_user_error(res, "keyed shards already")  # refused for its model, not for the missing directory


def test_outputs_onto_unwritable_places_are_one_line(run, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    ckpt = run / "run" / "best.pt"
    dec = ["decrypt", run / "enc", "--key", run / "key.json", "--sample", "whatever"]
    # a regular file where a directory is needed
    assert_user_error(invoke(*dec, "-o", blocker / "x.png"), "file.txt", "not a directory")
    assert_user_error(invoke("evaluate", *audit_args(run), "--output", blocker / "audit"), "not a directory")
    assert_user_error(invoke("protect", "--checkpoint", ckpt, "--key", run / "key.json", "-o", blocker / "p.pt"),
                      "not a directory")
    assert_user_error(invoke("attack", "search", "--checkpoint", ckpt, "--labelled-shards", run / "plain",
                             "--test", run / "plain", "--output", blocker / "r.json"), "not a directory")
    assert_user_error(invoke("attack", "finetune", "--checkpoint", ckpt, "--plain-train", run / "plain",
                             "--test", run / "plain", "--output", blocker / "r.json"), "not a directory")
    assert_user_error(invoke("attack", "known-plaintext", "--plain", run / "plain", "--encrypted", run / "enc",
                             "-o", blocker / "k.json"), "not a directory")
    assert_user_error(invoke("report", run, "--csv", blocker / "t.csv"), "not a directory")
    assert_user_error(invoke("keygen", "--method", "np", "-M", 4, "-o", blocker / "key.json"), "file.txt")
    assert_user_error(invoke("signing-key", "-o", blocker / "publisher"), "file.txt")
    # a directory where a file is expected: click refuses it as a usage error
    for args in (dec + ["-o", tmp_path], ["report", run, "--csv", tmp_path],
                 ["protect", "--checkpoint", ckpt, "--key", run / "key.json", "-o", tmp_path]):
        assert_usage_error(invoke(*args), "is a directory")
    # a file where the evaluate --output directory is expected: click refuses it too
    assert_usage_error(invoke("evaluate", *audit_args(run), "--output", blocker), "is a file")


def test_read_only_file_system_is_one_line(run, tmp_path, monkeypatch):
    """A read-only file system (EROFS) when probing before the work, and when writing after it."""
    import tempfile

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "TemporaryFile", read_only)
        assert_user_error(invoke("decrypt", run / "enc", "--key", run / "key.json", "--sample", "x",
                                 "-o", tmp_path / "x.png"), "x.png", "read-only file system")
        assert_user_error(invoke("evaluate", *audit_args(run), "--output", tmp_path / "audit"), "read-only file system")
    res = invoke("evaluate", *audit_args(run), "--wrong-keys", 1, "--output", tmp_path / "ok")
    assert res.exit_code == 0, res.output
    with monkeypatch.context() as m:  # the probe passed, the file system turned read-only afterwards
        m.setattr("keyshard.fsutil.os.replace", read_only)
        assert_user_error(invoke("report", tmp_path / "ok", "--csv", tmp_path / "t.csv"), "t.csv",
                          "read-only file system")
    assert not list(tmp_path.glob(".t.csv.tmp-*"))  # no temporary left behind


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories")
def test_directory_without_write_permission_is_one_line(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_user_error(invoke("report", run, "--csv", locked / "sub" / "t.csv"), "locked")
    finally:
        locked.chmod(0o755)


def test_an_unanticipated_os_error_is_one_line(monkeypatch, tmp_path):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("keyshard.evaluate.report.find_audits", denied)
    assert_user_error(invoke("report", tmp_path), str(tmp_path), "Permission denied")


# -- malformed checkpoints -------------------------------------------------------------------

def _edit(state, path, value):
    if path.startswith("model."):  # a state-dict key: dots are part of its name
        parents, last = ["model"], path[len("model."):]
    else:
        *parents, last = path.split(".")
    for part in parents:
        state = state[part]
    if value is KeyError:
        del state[last]
    else:
        state[last] = value


CHECKPOINT_CASES = [
    ("model_name", KeyError, "model_name"),
    ("model_name", "resnet9000", "model_name"),
    ("model", {"w": "not a tensor"}, "model is missing or not a state dict"),
    ("model", {}, "model is missing"),
    ("epoch", -1, "epoch"),
    ("epoch", "3", "epoch"),
    ("config", KeyError, "config"),
    ("data", KeyError, "data"),
    ("data.image_size", KeyError, "data.image_size"),
    ("data.image_size", 10**9, "data.image_size"),
    ("data.plain", "no", "data.plain"),
    ("data.method", "rot13", "data.method"),
    ("data.block_size", 5, "data.block_size"),
    ("data.key_fingerprint", None, "data.key_fingerprint"),
    ("manifest", "yes", "manifest"),
    ("manifest.signature_verified", True, "manifest.signer_fingerprint"),
    ("model_block_size", 0, "model_block_size"),
    ("model.head.weight", torch.zeros(3, 3), "does not fit"),       # another shape
    ("model.head.bias", KeyError, "does not fit"),                  # a tensor missing
    ("model.extra.weight", torch.zeros(1), "does not fit"),         # an unexpected tensor
]


@pytest.mark.parametrize("field,value,fragment", CHECKPOINT_CASES, ids=[f"{c[0]}={c[1]!s:.12}" for c in CHECKPOINT_CASES])
def test_malformed_checkpoints_are_one_line(run, tmp_path, field, value, fragment):
    state = torch.load(run / "run" / "best.pt", weights_only=True)
    if field.startswith("manifest.") and state.get("manifest") is None:
        state["manifest"] = {"manifest_sha256": "0" * 64, "signature_verified": False, "signer_fingerprint": None}
    _edit(state, field, value)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    assert_user_error(invoke("evaluate", *audit_args(run)[2:], "--checkpoint", bad, "--wrong-keys", 1,
                             "--output", tmp_path / "audit"), str(bad), fragment)
    assert not (tmp_path / "audit").exists()


def test_not_a_checkpoint_at_all(run, tmp_path):
    for name, obj in (("list.pt", [1, 2, 3]), ("tensor.pt", torch.zeros(2))):
        torch.save(obj, tmp_path / name)
        assert_user_error(invoke("evaluate", *audit_args(run)[2:], "--checkpoint", tmp_path / name),
                          name, "not a keyshard checkpoint")
    assert_usage_error(invoke("evaluate", *audit_args(run)[2:], "--checkpoint", tmp_path), "is a directory")


def test_resume_from_a_malformed_last_checkpoint_is_one_line(run, tmp_path):
    shutil.copytree(run / "run", tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["optimizer"]
    torch.save(state, last)
    res = invoke("train", "--shards", run / "enc", "--output", tmp_path / "run", "--resume", "--epochs", 2,
                 "--batch-size", 8, "--workers", 0, "-q")
    assert_user_error(res, "last.pt", "optimizer")
    state["optimizer"] = {"state": {}, "param_groups": [{"params": [0]}]}  # fits no optimizer of this model
    torch.save(state, last)
    res = invoke("train", "--shards", run / "enc", "--output", tmp_path / "run", "--resume", "--epochs", 2,
                 "--batch-size", 8, "--workers", 0, "-q")
    assert_user_error(res, "last.pt", "does not fit")


def test_checkpoint_load_accepts_the_real_ones(run):
    state = checkpoint.load(run / "run" / "last.pt", resume=True)
    assert state["model_name"] == "small" and not state["data"]["plain"]


# -- malformed audits ------------------------------------------------------------------------

AUDIT_CASES = [
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "a JSON object expected"),
    (b"\"text\"", "a JSON object expected"),
    (b"{\"format\": \"keyshard-audit/1\", ", "invalid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not an audit"),
    (b"{\"format\": \"something-else\"}", "not a keyshard audit"),
    (b"{\"format\": \"keyshard-audit/1\"}", "audit field checkpoint.model is missing"),
    (b"{\"format\": \"keyshard-audit/1\", \"kind\": \"baseline\", \"checkpoint\": {\"model\": \"small\"}, "
     b"\"results\": {\"plain\": {\"miou\": \"high\"}}}", "results.plain.miou is missing or not a number"),
    (b"{\"format\": \"keyshard-audit/1\", \"kind\": 7}", "unknown audit kind"),
]


@pytest.mark.parametrize("content,fragment", AUDIT_CASES, ids=[f[1] for f in AUDIT_CASES])
def test_malformed_audits_are_one_line(tmp_path, content, fragment):
    bad = tmp_path / "audit" / "audit.json"
    bad.parent.mkdir()
    bad.write_bytes(content)
    assert_user_error(invoke("report", tmp_path), str(bad), fragment)
    assert_user_error(invoke("report", bad), str(bad), fragment)


def test_report_on_a_keyed_audit_missing_one_field(run, tmp_path):
    res = invoke("evaluate", *audit_args(run), "--wrong-keys", 1, "--output", tmp_path / "ok")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "ok" / "audit.json").read_text())
    del doc["results"]["wrong"]["summary"]["max"]
    bad = tmp_path / "bad" / "audit.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(doc))
    assert_user_error(invoke("report", tmp_path / "ok", tmp_path / "bad"), "results.wrong.summary.max")


def test_report_on_nothing(tmp_path):
    assert_user_error(invoke("report", tmp_path), "no audit.json")
    assert_user_error(invoke("report", tmp_path / "missing"), "missing", "not found")
