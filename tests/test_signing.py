"""Signed manifests: signing keys, encrypt --sign-with, verify/train/evaluate --trust, provenance records."""

import base64
import hashlib
import io
import json
import shutil
import stat
import subprocess
import tarfile

import pytest

from keyshard import signing
from keyshard.train import checkpoint

from conftest import assert_user_error, invoke
from servers import http_server

COMMON = ["--image-size", 32, "--shard-size", 8, "--jobs", 1, "-q"]
TRAIN = ["--epochs", 1, "--batch-size", 4, "--workers", 0, "-q"]


@pytest.fixture(scope="module")
def signed(toy, key_files, tmp_path_factory):
    """A signing key pair, NP-M4 shards and plain shards signed with it, and unsigned plain shards."""
    root = tmp_path_factory.mktemp("signed")
    assert invoke("signing-key", "-o", root / "publisher").exit_code == 0
    for name, key in (("np4", ["--key", key_files["np"]]), ("plain", ["--plain"])):
        res = invoke("encrypt", "--voc", toy, "-o", root / name, *key, *COMMON, "--sign-with", root / "publisher")
        assert res.exit_code == 0, res.output
        assert "signed:" in res.output
    assert invoke("encrypt", "--voc", toy, "-o", root / "unsigned", "--plain", *COMMON).exit_code == 0
    assert invoke("signing-key", "-o", root / "stranger").exit_code == 0
    return root


def private_needles(path) -> list[bytes]:
    """Every form of the private key that must never leak into outputs."""
    from cryptography.hazmat.primitives import serialization

    pem = path.read_bytes()
    raw = signing.load_private(path).private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption())
    body = b"".join(pem.splitlines()[1:-1])
    return [pem, body, raw, raw.hex().encode(), base64.b64encode(raw)]


def test_signing_key_files_modes_and_refusals(tmp_path):
    res = invoke("signing-key", "-o", tmp_path / "k")
    assert res.exit_code == 0, res.output
    private, public = tmp_path / "k", tmp_path / "k.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    fp = signing.fingerprint(signing.load_public(public))
    assert fp == signing.fingerprint(signing.load_private(private).public_key()) and fp in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]  # no temporary files left
    before = private.read_bytes()
    assert_user_error(invoke("signing-key", "-o", private), str(private), "already exists")
    assert private.read_bytes() == before
    # an existing NAME.pub alone is refused too, and nothing is written
    (tmp_path / "j.pub").write_text("keep me")
    assert_user_error(invoke("signing-key", "-o", tmp_path / "j"), "j.pub", "already exists")
    assert not (tmp_path / "j").exists() and (tmp_path / "j.pub").read_text() == "keep me"
    # like every -o, a missing directory is created; a parent that is a file is one line
    assert invoke("signing-key", "-o", tmp_path / "no" / "k").exit_code == 0
    assert (tmp_path / "no" / "k").stat().st_mode & 0o777 == 0o600 and (tmp_path / "no" / "k.pub").exists()
    assert_user_error(invoke("signing-key", "-o", tmp_path / "j.pub" / "k"), "j.pub")


def test_encrypt_sign_with_writes_a_signature_that_verifies(signed):
    d = signed / "np4"
    raw, sig_text = (d / "manifest.json").read_bytes(), (d / "manifest.json.sig").read_bytes()
    sig = base64.b64decode(sig_text.rstrip(b"\n"), validate=True)
    assert len(sig) == 64 and sig_text == base64.b64encode(sig) + b"\n"
    public = signing.load_public(signed / "publisher.pub")
    assert signing.verify(public, raw, sig)
    fp = signing.fingerprint(public)
    for option in ("--public-key", "--trust"):
        res = invoke("verify", d, option, signed / "publisher.pub", "-q")
        assert res.exit_code == 0, res.output
        assert "signature verified" in res.output and fp in res.output
    res = invoke("verify", d, "-q")
    assert res.exit_code == 0 and "not checked" in res.output
    if shutil.which("openssl"):  # the documented format: base64 of the raw signature, stock tools verify it
        (d.parent / "sig.bin").write_bytes(sig)
        out = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", signed / "publisher.pub", "-rawin",
                              "-in", d / "manifest.json", "-sigfile", d.parent / "sig.bin"], capture_output=True)
        assert out.returncode == 0, out.stderr


def test_sign_with_is_checked_before_any_work(toy, signed, tmp_path):
    (tmp_path / "junk").write_text("not a key")
    for bad, fragment in ((signed / "publisher.pub", "is a public key"), (tmp_path / "junk", "not a PEM private key"),
                          (tmp_path / "missing", "not found")):
        out = tmp_path / f"out-{bad.name}"
        assert_user_error(invoke("encrypt", "--voc", toy, "-o", out, "--plain", *COMMON, "--sign-with", bad),
                          str(bad), fragment)
        assert not out.exists()


def test_resumed_run_is_signed(toy, signed, tmp_path):
    voc = tmp_path / "voc"
    shutil.copytree(toy, voc)
    root = next(voc.rglob("JPEGImages"))
    victim = root / (sorted((root.parent / "ImageSets" / "Segmentation" / "val.txt").read_text().split())[-1] + ".jpg")
    good = victim.read_bytes()
    victim.write_bytes(good[:40])  # a truncated JPEG in the test split stops the run part-way
    out = tmp_path / "out"
    args = ["encrypt", "--voc", root.parent, "-o", out, "--plain", *COMMON, "--sign-with", signed / "publisher"]
    assert_user_error(invoke(*args), victim.name)
    assert not (out / "manifest.json").exists() and not (out / "manifest.json.sig").exists()
    assert list(out.glob("train-*.tar"))  # finished shards wait for --resume
    victim.write_bytes(good)
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert invoke("verify", out, "--trust", signed / "publisher.pub", "-q").exit_code == 0


def test_tampered_manifests_are_refused(signed, tmp_path):
    # a flipped byte anywhere in manifest.json
    flipped = tmp_path / "flipped"
    shutil.copytree(signed / "np4", flipped)
    raw = bytearray((flipped / "manifest.json").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (flipped / "manifest.json").write_bytes(bytes(raw))
    line = assert_user_error(invoke("verify", flipped, "--public-key", signed / "publisher.pub", "-q"),
                             "manifest.json.sig", "bad signature")
    assert str(flipped) in line
    # the attack signing stops: replace a shard and rewrite its sha256 and size in the manifest
    swapped = tmp_path / "swapped"
    shutil.copytree(signed / "np4", swapped)
    doc = json.loads((swapped / "manifest.json").read_text())
    entry = doc["shards"][0]
    victim = swapped / entry["file"]
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    masks = [i for i, (m, _) in enumerate(members) if m.name.endswith(".mask.png")]
    members[masks[0]] = (members[masks[0]][0], members[masks[1]][1])  # poisoned labels for one sample
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert buf.getvalue() != victim.read_bytes()
    victim.write_bytes(buf.getvalue())
    entry["bytes"], entry["sha256"] = victim.stat().st_size, hashlib.sha256(victim.read_bytes()).hexdigest()
    (swapped / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    assert invoke("verify", swapped, "-q").exit_code == 0  # the sha256s alone cannot tell
    assert_user_error(invoke("verify", swapped, "--public-key", signed / "publisher.pub", "-q"), "bad signature")
    assert_user_error(invoke("train", "--shards", swapped, "--output", tmp_path / "run", "--trust",
                             signed / "publisher.pub", *TRAIN), "bad signature")
    assert not (tmp_path / "run").exists()


def test_unsigned_manifest_and_wrong_keys_are_refused(signed, tmp_path):
    pub = signed / "publisher.pub"
    line = assert_user_error(invoke("verify", signed / "unsigned", "--trust", pub, "-q"), "manifest.json.sig", "unsigned")
    assert str(signed / "unsigned") in line
    assert_user_error(invoke("train", "--shards", signed / "unsigned", "--output", tmp_path / "r", "--trust", pub, *TRAIN),
                      "unsigned")
    assert_user_error(invoke("verify", signed / "np4", "--public-key", signed / "stranger.pub", "-q"),
                      "bad signature", "stranger.pub")
    assert_user_error(invoke("verify", signed / "np4", "--public-key", signed / "publisher", "-q"), "is a private key")
    assert_user_error(invoke("verify", signed / "np4", "--public-key", tmp_path / "none.pub", "-q"), "not found")
    garbled = tmp_path / "garbled"
    shutil.copytree(signed / "plain", garbled)
    (garbled / "manifest.json.sig").write_text("%%% not base64\n")
    assert_user_error(invoke("verify", garbled, "--trust", pub, "-q"), "not a keyshard signature")


def test_train_and_evaluate_record_provenance(signed, key_files, tmp_path):
    pub = signed / "publisher.pub"
    fp = signing.fingerprint(signing.load_public(pub))
    run = tmp_path / "run"
    res = invoke("train", "--shards", signed / "np4", "--output", run, "--trust", pub, *TRAIN)
    assert res.exit_code == 0, res.output
    assert "signature verified" in res.output
    sha = hashlib.sha256((signed / "np4" / "manifest.json").read_bytes()).hexdigest()
    state = checkpoint.load(run / "last.pt")
    assert state["manifest"] == {"manifest_sha256": sha, "signature_verified": True, "signer_fingerprint": fp}
    assert "manifest" not in state["data"]
    # resuming a verified run needs --trust again (and checks the signature again)
    more = ["--epochs", 2, "--batch-size", 4, "--workers", 0, "-q", "--resume"]
    assert_user_error(invoke("train", "--shards", signed / "np4", "--output", run, *more), "--trust")
    assert invoke("train", "--shards", signed / "np4", "--output", run, *more, "--trust", pub).exit_code == 0
    assert checkpoint.load(run / "last.pt")["manifest"]["signature_verified"] is True
    # without --trust the sha256 is still recorded
    plain_run = tmp_path / "plain-run"
    assert invoke("train", "--shards", signed / "np4", "--output", plain_run, *TRAIN).exit_code == 0
    assert checkpoint.load(plain_run / "last.pt")["manifest"] == {
        "manifest_sha256": sha, "signature_verified": False, "signer_fingerprint": None}

    out = tmp_path / "audit"
    res = invoke("evaluate", "--checkpoint", run / "best.pt", "--key", key_files["np"], "--test", signed / "plain",
                 "--trust", pub, "--wrong-keys", 2, "--workers", 0, "--output", out, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    test_sha = hashlib.sha256((signed / "plain" / "manifest.json").read_bytes()).hexdigest()
    assert (audit["test"]["manifest_sha256"], audit["test"]["signature_verified"],
            audit["test"]["signer_fingerprint"]) == (test_sha, True, fp)
    assert audit["checkpoint"]["manifest"] == state["manifest"]
    assert "signature verified" in (out / "audit.md").read_text()
    assert_user_error(invoke("evaluate", "--checkpoint", run / "best.pt", "--key", key_files["np"], "--test",
                             signed / "unsigned", "--trust", pub, "--wrong-keys", 2, "--output", tmp_path / "a2", "-q"),
                      "unsigned")
    assert not (tmp_path / "a2").exists()

    # the private key never appears in what was published or produced
    outputs = [signed / "np4" / "manifest.json", signed / "np4" / "manifest.json.sig", run / "best.pt",
               run / "last.pt", *out.iterdir()]
    for needle in private_needles(signed / "publisher"):
        for path in outputs:
            assert needle not in path.read_bytes(), path


def test_trust_over_http(signed):
    pub = signed / "publisher.pub"
    with http_server(signed) as base:
        res = invoke("verify", f"{base}plain/", "--trust", pub, "-q")
        assert res.exit_code == 0, res.output
        assert "signature verified" in res.output
        assert_user_error(invoke("verify", f"{base}unsigned/", "--trust", pub, "-q"),
                          f"{base}unsigned/manifest.json.sig", "unsigned")
