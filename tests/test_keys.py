"""Key files: derivation (documented + reference), FFX table, fingerprints, file safety, key-info."""

import hashlib
import json
import math
import os
import stat
import subprocess
import sys

import click
import numpy as np
import pyffx
import pytest
import torch

from keyshard import keys, methods
from keyshard.methods.masked import mask_size, rule_mask_size
from keyshard.errors import KeyshardError

from conftest import assert_user_error, invoke

FIXED_SECRET = bytes(range(32))


def test_derivation_is_pinned():
    """The documented derivation must never change: same file, same key, on every machine."""
    assert keys.Key("shf", 2, FIXED_SECRET).material.perm.tolist() == [1, 6, 5, 2, 8, 0, 7, 10, 4, 3, 9, 11]
    assert keys.Key("np", 2, FIXED_SECRET).material.mask.astype(int).tolist() == [0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]
    assert keys.Key("ffx", 2, FIXED_SECRET).password == b"bcf6602a59fe3bf6b17f0e973ee2c96d"


def test_fisher_yates_follows_the_documented_stream():
    """Re-derive with an independent transcription of the module docstring's algorithm."""
    n, label = 48, b"shf-permutation"
    data = hashlib.shake_256(b"keyshard/1|" + label + b"|" + FIXED_SECRET).digest(8 * (n + 64))
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]
    perm, pos = list(range(n)), 0
    for i in range(n - 1, 0, -1):
        while True:
            w = words[pos]
            pos += 1
            if w < (2**64 // (i + 1)) * (i + 1):
                break
        j = w % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    assert keys.Key("shf", 4, FIXED_SECRET).material.perm.tolist() == perm


@pytest.mark.parametrize("m", [2, 4, 8])
def test_secret_masks_select_exactly_half(m):
    n = 3 * m * m
    for method in ("np", "ffx"):
        assert int(keys.generate(method, m).material.mask.sum()) == n // 2


@pytest.mark.parametrize("seed", [0, 1, 1234])
@pytest.mark.parametrize("m", [2, 4, 16])
def test_reference_seed_matches_authors_code(seed, m):
    n = m * m * 3
    torch.manual_seed(seed)
    perm = torch.randperm(n)
    expected_mask = (perm > n / 2).numpy()
    assert keys.generate("shf", m, reference_seed=seed).material.perm.tolist() == perm.tolist()
    np.testing.assert_array_equal(keys.generate("np", m, reference_seed=seed).material.mask, expected_mask)
    np.testing.assert_array_equal(
        keys.generate("ffx", m, reference_seed=seed, ffx_password=b"password").material.mask, expected_mask)
    if m == 2:  # the reference quirk: one position fewer than half
        assert expected_mask.sum() == 5


@pytest.mark.parametrize("m", [1, 2, 3, 4, 16])
def test_rule_mask_size_is_what_each_derivation_selects(m):
    """The one helper for mask sizes agrees with the derivations themselves, odd 3M² included."""
    n = 3 * m * m
    assert rule_mask_size(m, keys.DERIVE_SECRET) == n // 2
    assert rule_mask_size(m, keys.DERIVE_REFERENCE) == n - 1 - n // 2
    assert rule_mask_size(m, keys.DERIVE_EXPLICIT) is None
    for method in ("np", "ffx"):
        pw = b"password" if method == "ffx" else None
        for key in (keys.Key(method, m, FIXED_SECRET, ffx_password=pw),
                    *(keys.Key(method, m, FIXED_SECRET, reference_seed=s, ffx_password=pw) for s in (0, 7))):
            assert mask_size(key.material) == int(key.material.mask.sum()) == rule_mask_size(m, key.derivation)
    mask = np.zeros(n, dtype=bool)
    mask[:1] = True  # an explicit (imported) key may hold any mask
    explicit = keys.Key("np", m, FIXED_SECRET, explicit=methods.get("np").Material(m, mask=mask))
    assert mask_size(explicit.material) == 1 and explicit.keyspace_count() == n
    with pytest.raises(ValueError):
        mask_size(keys.Key("shf", m, FIXED_SECRET).material)


def test_ffx_table_equals_pyffx_value_by_value():
    key = keys.generate("ffx", 2, ffx_password=b"password")
    fpe = pyffx.Integer(b"password", length=3)
    assert key.material.table.tolist() == [fpe.encrypt(v) for v in range(256)]
    assert key.material.divisor == max(fpe.encrypt(v) for v in range(256))
    assert len(set(key.material.table.tolist())) == 256


def test_keyspace_counts():
    assert keys.generate("np", 2).keyspace_count() == 924
    assert keys.generate("np", 2, reference_seed=3).keyspace_count() == math.comb(12, 5) == 792
    assert keys.generate("shf", 2).keyspace_count() == math.factorial(12)
    assert keys.generate("ffx", 16).keyspace_bits() == pytest.approx(math.log2(math.comb(768, 384)))
    assert keys.generate("shf", 256).keyspace_count() is None


def test_fingerprint_is_keyed_and_stable(tmp_path):
    a = keys.generate("np", 2)
    keys.save(a, tmp_path / "a.json")
    assert keys.load(tmp_path / "a.json").fingerprint == a.fingerprint
    # same material, other secret (an explicit copy of the key): the fingerprint differs
    copy = keys.Key("np", 2, os.urandom(32), explicit=a.material)
    assert copy.material.equals(a.material) and copy.fingerprint != a.fingerprint
    # and it is not a plain hash of the material anyone could brute-force
    assert a.fingerprint != hashlib.sha256(a.material.canonical_bytes()).hexdigest()


def test_keygen_writes_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "k.json"
    res = invoke("keygen", "--method", "shf", "--block-size", "8", "-o", path)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert_user_error(invoke("keygen", "--method", "np", "--block-size", "8", "-o", path), str(path), "--force")
    assert path.read_bytes() == before
    assert invoke("keygen", "--method", "np", "--block-size", "8", "-o", path, "--force").exit_code == 0
    assert json.loads(path.read_text())["method"] == "np"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = json.loads(path.read_text())["secret"]
    assert secret not in res.output


def test_keygen_refuses_block_size_not_dividing_image(tmp_path):
    assert_user_error(invoke("keygen", "--method", "shf", "-M", "3", "-o", tmp_path / "k.json"), "--block-size 3")
    assert not (tmp_path / "k.json").exists()


def test_key_info_reports_and_warns(tmp_path):
    path = tmp_path / "k.json"
    keys.save(keys.generate("np", 2), path)
    res = invoke("key-info", path)
    assert res.exit_code == 0
    assert keys.load(path).fingerprint in res.output
    assert "924 keys" in res.output and "small key space" in res.output
    secret = json.loads(path.read_text())["secret"]
    assert secret not in res.output
    keys.save(keys.generate("shf", 16, reference_seed=5), tmp_path / "r.json")
    res = invoke("key-info", tmp_path / "r.json")
    assert "only as strong as the seed" in res.output and "small key space" not in res.output


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe\x00", "invalid JSON"),
    (json.dumps({"format": "other"}).encode(), "'format'"),
    (json.dumps({"format": "keyshard-key/1", "method": "rot13", "block_size": 4, "secret": "00" * 32}).encode(), "'method'"),
    (json.dumps({"format": "keyshard-key/1", "method": "np", "block_size": 4, "secret": "abc"}).encode(), "'secret'"),
    (json.dumps({"format": "keyshard-key/1", "method": "np", "block_size": 0, "secret": "00" * 32}).encode(), "'block_size'"),
])
def test_bad_key_files_give_one_clear_line(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    line = assert_user_error(invoke("key-info", path), str(path), fragment)
    assert "00" * 32 not in line


def test_missing_key_file(tmp_path):
    assert_user_error(invoke("key-info", tmp_path / "nope.json"), "nope.json", "not found")


def test_explicit_key_roundtrip(tmp_path):
    orig = keys.generate("ffx", 2)
    explicit = keys.Key("ffx", 2, os.urandom(32), explicit=orig.material)
    keys.save(explicit, tmp_path / "x.json")
    loaded = keys.load(tmp_path / "x.json")
    assert loaded.derivation == keys.DERIVE_EXPLICIT
    assert loaded.material.equals(orig.material)
    assert loaded.fingerprint == explicit.fingerprint != orig.fingerprint


def test_generate_rejects_password_for_other_methods():
    with pytest.raises(KeyshardError, match="ffx"):
        keys.generate("np", 2, ffx_password=b"x")


# -- derivations computed without torch, checked against torch ----------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7, 1234, 2**31 + 5, 2**32 + 5, 2**63 - 1])
def test_reference_permutation_is_torch_randperm(seed):
    """The reference derivation runs without importing torch and gives torch's randperm exactly."""
    for n in (1, 2, 3, 12, 48, 768, 3 * 64 * 64):
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(keys.reference_permutation(seed, n), expected)


def test_loading_a_reference_key_does_not_import_torch(tmp_path):
    keys.save(keys.Key("np", 8, FIXED_SECRET, reference_seed=3), tmp_path / "r.json")
    code = ("import sys; from keyshard import keys; k = keys.load(sys.argv[1]); k.fingerprint; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_fisher_yates_with_rejections_and_a_longer_stream(monkeypatch):
    """Rejected draws and a stream extended past n + 64 words follow the documented algorithm."""
    def words(secret, label, count):  # prefix-stable; every third word is 2^64 - 1, rejected by most bounds
        return np.array([2**64 - 1 if k % 3 == 0 else (k * 0x9E3779B97F4A7C15) % 2**64 for k in range(count)],
                        dtype=np.uint64)

    monkeypatch.setattr(keys, "_stream_words", words)
    n = 200
    stream = words(None, None, 4 * n).tolist()
    perm, pos = list(range(n)), 0
    for i in range(n - 1, 0, -1):
        while True:
            w = stream[pos]
            pos += 1
            if w < (2**64 // (i + 1)) * (i + 1):
                break
        j = w % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    assert pos > n + 64  # the extension path ran
    assert keys.fisher_yates(FIXED_SECRET, b"x", n).tolist() == perm


# -- keys handled like secrets ----------------------------------------------------------------

def test_every_command_warns_once_about_a_readable_key(tmp_path):
    path = tmp_path / "k.json"
    keys.save(keys.generate("np", 2), path)
    path.chmod(0o644)
    res = invoke("key-info", path)
    # the mode, the small key space, and the ciphertext-only benchmark's verdict on NP M=2
    assert res.exit_code == 0 and res.output.count("warning: ") == 3
    assert res.output.count(f"{path}: key file mode is 0644; it should be 0600 (chmod 600 {path})") == 1
    # another command reading it (encrypt loads the key before it looks at --voc)
    res = invoke("encrypt", "--voc", tmp_path / "no-voc", "--key", path, "-o", tmp_path / "out", "-q")
    assert res.exit_code == 1 and res.output.count("key file mode is 0644") == 1
    # however often one command loads it
    with click.Context(click.Command("x")):
        for _ in range(3):
            keys.load(path)
    path.chmod(0o600)
    res = invoke("key-info", path)
    assert res.exit_code == 0 and "key file mode" not in res.output


def test_ffx_password_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.FFX_PASSWORD_ENV, raising=False)
    pw_file = tmp_path / "pw.txt"
    pw_file.write_bytes(b"s3cret pass\n")
    pw_file.chmod(0o600)
    res = invoke("keygen", "--method", "ffx", "-M", "2", "-o", tmp_path / "a.json", "--ffx-password-file", pw_file)
    assert res.exit_code == 0, res.output
    assert "s3cret" not in res.output and "warning: " + str(pw_file) not in res.output
    monkeypatch.setenv(keys.FFX_PASSWORD_ENV, "s3cret pass")
    res = invoke("keygen", "--method", "ffx", "-M", "2", "-o", tmp_path / "b.json")
    assert res.exit_code == 0 and "password from $KEYSHARD_FFX_PASSWORD" in res.output and "s3cret" not in res.output
    a, b = keys.load(tmp_path / "a.json"), keys.load(tmp_path / "b.json")
    assert a.ffx_password == b.ffx_password == b"s3cret pass"
    assert np.array_equal(a.material.table, keys.ffx_table(b"s3cret pass"))
    # the environment variable is only for FFX keys; other methods ignore it
    assert invoke("keygen", "--method", "np", "-M", "2", "-o", tmp_path / "c.json").exit_code == 0
    assert keys.load(tmp_path / "c.json").ffx_password is None
    # two ways at once is refused, naming the ways, not the password
    for extra in (["--ffx-password", "other"], ["--ffx-password-file", pw_file]):
        line = assert_user_error(invoke("keygen", "--method", "ffx", "-M", "2", "-o", tmp_path / "d.json", *extra),
                                 "given twice", "$KEYSHARD_FFX_PASSWORD")
        assert "s3cret" not in line and "other" not in line
    monkeypatch.delenv(keys.FFX_PASSWORD_ENV)
    assert_user_error(invoke("keygen", "--method", "ffx", "-M", "2", "-o", tmp_path / "d.json", "--ffx-password", "x",
                             "--ffx-password-file", pw_file), "--ffx-password and --ffx-password-file")
    assert not (tmp_path / "d.json").exists()


def test_ffx_password_file_checks(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.FFX_PASSWORD_ENV, raising=False)
    out = tmp_path / "k.json"

    def keygen(*extra, method="ffx"):
        return invoke("keygen", "--method", method, "-M", "2", "-o", out, *extra)

    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    assert_user_error(keygen("--ffx-password-file", empty), "FFX password must be 1 to 1024 bytes")
    assert_user_error(keygen("--ffx-password-file", tmp_path / "missing"), "FFX password file not found")
    assert_user_error(keygen("--ffx-password-file", "/dev/zero"), "/dev/zero", "regular file")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    assert_user_error(keygen("--ffx-password-file", big), "too large")
    assert_user_error(keygen("--ffx-password", ""), "--ffx-password", "1 to 1024 bytes")
    assert_user_error(keygen("--ffx-password-file", big, method="np"), "--ffx-password-file applies only to --method ffx")
    assert not out.exists()
    # any bytes, newline conventions, a readable file warned about (once)
    raw = tmp_path / "raw"
    raw.write_bytes(b"\xff\xfepw\r\n")
    raw.chmod(0o644)
    res = keygen("--ffx-password-file", raw)
    assert res.exit_code == 0 and res.output.count("FFX password file mode is 0644") == 1
    assert keys.load(out).ffx_password == b"\xff\xfepw"


def test_attack_search_takes_the_password_one_way(tmp_path, monkeypatch):
    monkeypatch.setenv(keys.FFX_PASSWORD_ENV, "from-env")
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(b"from-file\n")
    pw_file.chmod(0o600)
    args = ["attack", "search", "--checkpoint", tmp_path / "missing.pt", "--labelled-shards", tmp_path,
            "--test", tmp_path]
    line = assert_user_error(invoke(*args, "--ffx-password-file", pw_file), "given twice",
                             "--ffx-password-file and $KEYSHARD_FFX_PASSWORD")
    assert "from-" not in line
    monkeypatch.delenv(keys.FFX_PASSWORD_ENV)
    # accepted: the command goes on to the checkpoint (which is missing here)
    assert_user_error(invoke(*args, "--ffx-password-file", pw_file), "missing.pt")
