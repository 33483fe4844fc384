"""Hostile and odd key files (issue 12): whatever a key file holds, loading it gives a key or one
KeyshardError line naming the file, and `key-info` exits 0, 1 or 2 (a click usage error) without
a traceback, without quoting the secret, without hanging and without building huge arrays.

The property tests are derandomized (the same examples on every run, CI included) and bounded.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tracemalloc

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from keyshard import keys, methods
from keyshard.errors import KeyshardError

from conftest import assert_user_error, fixed_secret, invoke, run_subprocess

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

VALID = {
    "derived shf": keys.Key("shf", 2, fixed_secret(1)),
    "derived np": keys.Key("np", 2, fixed_secret(2)),
    "derived ffx": keys.Key("ffx", 2, fixed_secret(3)),
    "ffx with password": keys.Key("ffx", 2, fixed_secret(4), ffx_password=b"password"),
    "reference np": keys.Key("np", 2, fixed_secret(5), reference_seed=7),
    "explicit shf": keys.Key("shf", 2, fixed_secret(6), explicit=keys.Key("shf", 2, fixed_secret(7)).material),
    "explicit np": keys.Key("np", 2, fixed_secret(8), explicit=keys.Key("np", 2, fixed_secret(9)).material),
    "explicit ffx": keys.Key("ffx", 2, fixed_secret(10), explicit=keys.Key("ffx", 2, fixed_secret(11)).material),
}
VALID_DOCS = [keys.to_json(k) for k in VALID.values()]
EXPLICIT_DOCS = [doc for doc in VALID_DOCS if "material" in doc]
SECRETS = {doc["secret"] for doc in VALID_DOCS}
FIELDS = ["format", "method", "block_size", "channels", "derivation", "secret", "reference_seed",
          "ffx_password", "material", "permutation", "mask", "table", "reference-seed", ""]

# Literals json.dumps cannot write (Python refuses to print ints of more than 4300 digits; deep
# nesting overflows the encoder): placeholders replaced in the text after dumping.
HUGE_INT = "\x00huge-int\x00"
DEEP = "\x00deep\x00"
PLACEHOLDERS = {json.dumps(HUGE_INT): "9" * 5000, json.dumps(DEEP): "[" * 100_000 + "]" * 100_000}


def _dump(doc) -> bytes:
    text = json.dumps(doc)  # NaN and Infinity included: Python's parser reads them back
    for placeholder, literal in PLACEHOLDERS.items():
        text = text.replace(placeholder, literal)
    return text.encode("utf-8", "surrogatepass")


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=12)
    | st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([HUGE_INT, DEEP]),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=12)

odd_values = st.one_of(
    json_values,
    st.sampled_from([0, -1, 1, 2, 3, 511, 512, 513, 4096, 10**6, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63),
                     1.0, 2.0, 1e308, float("inf"), float("nan"), True, False, "", "2", "shf", "np", "ffx",
                     "keyshard-key/1", "keyshard-key/2", "explicit/1", "reference-torch-randperm/1",
                     "keyshard-shake256/1", "0" * 64, "g" * 64, "\ud800", "\udcff", "01" * 6, "01" * 6 + "\n"]),
    st.lists(st.integers(min_value=-2, max_value=20), max_size=300),   # wrong lengths, duplicates, ranges
    st.lists(st.integers(0, 999), min_size=255, max_size=257),          # FFX tables of nearly the right size
    st.integers(1, 40).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)


@st.composite
def mutated_docs(draw):
    """A valid key file with one to three changes at the top level or inside 'material'."""
    doc = json.loads(json.dumps(draw(st.sampled_from(VALID_DOCS + EXPLICIT_DOCS))))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one: the first error hides others
        inside = isinstance(doc.get("material"), dict) and draw(st.integers(0, 2)) > 0
        target = doc["material"] if inside else doc
        name = draw(st.sampled_from(sorted(target) + FIELDS))
        value = target.get(name)
        action = draw(st.sampled_from(["set", "set", "delete", "resize", "duplicate", "element", "nudge"]))
        if action == "delete":
            target.pop(name, None)
        elif action == "resize" and isinstance(value, (list, str)):
            target[name] = value[: draw(st.integers(0, len(value)))] + value[: draw(st.integers(0, 3))]
        elif action == "duplicate" and isinstance(value, list) and len(value) > 1:
            value[draw(st.integers(0, len(value) - 1))] = value[draw(st.integers(0, len(value) - 1))]
        elif action == "element" and isinstance(value, (list, str)) and value:
            i = draw(st.integers(0, len(value) - 1))
            if isinstance(value, list):
                value[i] = draw(odd_values)
            else:
                target[name] = value[:i] + draw(st.characters()) + value[i + 1:]
        elif action == "nudge" and type(value) is int:
            target[name] = value + draw(st.integers(-3, 3))
        else:
            target[name] = draw(odd_values)
    return doc


@st.composite
def mangled_bytes(draw):
    """The bytes of a valid or mutated key file, cut, spliced or overwritten; or random bytes."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(_dump(draw(mutated_docs() | st.sampled_from(VALID_DOCS))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["cut", "insert", "overwrite"]))
        if how == "cut":
            del data[at:at + draw(st.integers(1, 20))]
        elif how == "insert":
            data[at:at] = draw(st.sampled_from(
                [b"\xff", b"\xc3", b"\x00", b"{", b"[", b"]", b"}", b'"', b"\\", b",", b":", b" ", b"-", b"9" * 30,
                 b"1e400", b"NaN", b"true", b'"secret": "' + b"0" * 64 + b'", ']) | st.binary(min_size=1, max_size=4))
        else:
            data[at:at + 1] = bytes([draw(st.integers(0x20, 0x7E) | st.integers(0, 255))])
    return bytes(data)


def _check_load(path) -> None:
    """keys.load gives a usable key or one KeyshardError naming the file and not quoting the secret."""
    try:
        key = keys.load(path)
    except KeyshardError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert not any(secret in message for secret in SECRETS), message
        event(_kind(message))
        return
    event("valid key")
    assert key.block_size <= keys.MAX_BLOCK_SIZE
    assert len(key.fingerprint) == 64 and key.keyspace_bits() >= 0  # the material derives cleanly


def _kind(message: str) -> str:
    """The kind of problem, for hypothesis' statistics (--hypothesis-show-statistics)."""
    what = message.split(": ", 1)[1]
    what = re.sub(r"\[\d+\]", "[i]", re.sub(r" at line \d+ column \d+", "", what))
    return re.sub(r"\d{3,}", "N", what)


def _check_key_info(path) -> None:
    res = invoke("key-info", path)
    assert res.exit_code in (0, 1, 2), res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert not any(secret in res.output for secret in SECRETS), res.output
    if res.exit_code == 1:
        assert_user_error(res, str(path))


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


def _write(path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@PROPERTY
@given(doc=st.one_of(json_values, mutated_docs(), mutated_docs(), mutated_docs()))
def test_random_and_mutated_key_documents(hostile_dir, doc):
    path = hostile_dir / "doc.json"
    _write(path, _dump(doc))
    _check_load(path)
    _check_key_info(path)


@PROPERTY
@given(data=mangled_bytes())
def test_mangled_key_file_bytes(hostile_dir, data):
    path = hostile_dir / "bytes.json"
    _write(path, data)
    _check_load(path)
    _check_key_info(path)


def test_valid_documents_stay_valid(hostile_dir):
    """The property tests start from files every kind of key really is, all accepted."""
    for name, key in VALID.items():
        path = hostile_dir / f"{name.replace(' ', '-')}.json"
        keys.save(key, path)
        assert keys.load(path).fingerprint == key.fingerprint, name
        assert invoke("key-info", path).exit_code == 0, name


# -- the cases reported in issue 12 -----------------------------------------------------------

def _doc(**changes) -> dict:
    doc = keys.to_json(VALID["derived np"])
    doc.update(changes)
    return doc


def _key_file(tmp_path, content, name="key.json"):
    path = tmp_path / name
    _write(path, content if isinstance(content, bytes) else _dump(content))
    return path


def test_dev_zero_is_refused_without_reading():
    with pytest.raises(KeyshardError, match="/dev/zero: is a character device; a key file must be a regular file"):
        keys.load("/dev/zero")
    assert_user_error(invoke("key-info", "/dev/zero"), "/dev/zero", "regular file")


def test_fifo_is_refused_and_does_not_hang(tmp_path):
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    with pytest.raises(KeyshardError, match="named pipe"):
        keys.load(fifo)  # would block forever if it were opened for reading without O_NONBLOCK
    # the real command in a child process, with a timeout that fails the test instead of hanging it
    assert_user_error(run_subprocess("key-info", fifo, timeout=120), str(fifo), "named pipe (FIFO)")


def test_directory_and_symlinks(tmp_path):
    with pytest.raises(KeyshardError, match="is a directory, not a key file"):
        keys.load(tmp_path)
    res = invoke("key-info", tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output  # click's usage error (dir_okay=False)
    keys.save(VALID["derived np"], tmp_path / "real.json")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert keys.load(tmp_path / "link.json").fingerprint == VALID["derived np"].fingerprint
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    assert_user_error(invoke("key-info", tmp_path / "zero.json"), "zero.json", "character device")


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(keys.MAX_KEY_FILE_BYTES + 1)  # sparse: costs no disk
    path.chmod(0o600)
    tracemalloc.start()
    try:
        with pytest.raises(KeyshardError, match="too large for a key file"):
            keys.load(path)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("block_size", [4096, 10**6, 513])
def test_block_size_beyond_the_bound_builds_nothing(tmp_path, block_size):
    """The schema bound stops a huge block size before any 3M² array exists (4096 took 89 s and 5 GB)."""
    path = _key_file(tmp_path, _doc(block_size=block_size))
    tracemalloc.start()
    try:
        with pytest.raises(KeyshardError, match=rf"{path}: invalid key file: 'block_size' must be at most "
                                                 rf"{keys.MAX_BLOCK_SIZE}"):
            keys.load(path)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()
    assert_user_error(invoke("key-info", path), str(path), "'block_size'")


def test_largest_valid_keys_load(tmp_path):
    """M = MAX_BLOCK_SIZE is valid; its largest file (an explicit SHF key) is under the size cap."""
    m = keys.MAX_BLOCK_SIZE
    n = 3 * m * m
    perm = np.random.default_rng(0).permutation(n)
    explicit = keys.Key("shf", m, fixed_secret(0), explicit=methods.get("shf").Material(m, perm=perm))
    keys.save(explicit, tmp_path / "x.json")
    assert (tmp_path / "x.json").stat().st_size < keys.MAX_KEY_FILE_BYTES
    loaded = keys.load(tmp_path / "x.json")
    assert np.array_equal(loaded.material.perm, perm)
    assert invoke("key-info", tmp_path / "x.json").exit_code == 0
    # a bad value at the end of the long list: one clear line (and no slow walk of all items)
    doc = keys.to_json(explicit)
    for value, fragment in ((n, f"'material.permutation[{n - 1}]' must be at most {n - 1}"),
                            (-1, f"'material.permutation[{n - 1}]' must be at least 0"),
                            ("7", f"'material.permutation[{n - 1}]' must be an integer"),
                            (int(perm[0]), f"must be a permutation of 0..{n - 1}")):
        doc["material"]["permutation"][-1] = value
        path = _key_file(tmp_path, doc, "bad.json")
        assert_user_error(invoke("key-info", path), str(path), fragment)


def test_integer_of_5000_digits(tmp_path):
    path = _key_file(tmp_path, _doc(block_size=HUGE_INT))
    with pytest.raises(KeyshardError, match="invalid JSON: a number with too many digits"):
        keys.load(path)
    assert_user_error(invoke("key-info", path), str(path), "too many digits")


def test_deep_nesting(tmp_path):
    path = _key_file(tmp_path, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(KeyshardError, match="invalid JSON: nested too deeply"):
        keys.load(path)
    assert_user_error(invoke("key-info", path), str(path), "nested too deeply")
    # nesting the parser accepts, inside fields the schema walks
    deep = json.loads("[" * 900 + "]" * 900)
    for doc in (_doc(block_size=deep), _doc(material={"mask": deep}),
                keys.to_json(VALID["explicit ffx"]) | {"material": {"mask": "0" * 12, "table": [deep] * 256}}):
        path = _key_file(tmp_path, doc)
        assert_user_error(invoke("key-info", path), str(path), "must be")


@pytest.mark.parametrize("seed, ok", [(2**63 - 1, True), (2**63, False), (2**64, False), (-1, False)])
def test_reference_seed_bounds(tmp_path, seed, ok):
    path = _key_file(tmp_path, _doc(reference_seed=seed, derivation=keys.DERIVE_REFERENCE))
    if ok:
        assert len(keys.load(path).fingerprint) == 64
    else:
        assert_user_error(invoke("key-info", path), str(path), "'reference_seed' must be at")


def test_keygen_huge_reference_seed_writes_nothing(tmp_path):
    out = tmp_path / "k.json"
    res = invoke("keygen", "--method", "np", "-M", "4", "--reference-seed", "99999999999999999999999", "-o", out)
    assert res.exit_code == 2 and "Traceback" not in res.output and "--reference-seed" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # so the rerun with a good seed needs no --force
    assert invoke("keygen", "--method", "np", "-M", "4", "--reference-seed", str(2**63 - 1), "-o", out).exit_code == 0
    assert keys.load(out).reference_seed == 2**63 - 1


def test_keygen_derives_before_it_writes(tmp_path, monkeypatch):
    """A failure while deriving the key leaves no file (it used to be written first)."""
    def broken(*args):
        raise KeyshardError("derivation failed")

    monkeypatch.setattr(keys, "fisher_yates", broken)
    out = tmp_path / "k.json"
    assert_user_error(invoke("keygen", "--method", "shf", "-M", "4", "-o", out), "derivation failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("block_size", ["4096", "0", "1000000"])
def test_keygen_refuses_block_sizes_out_of_range(tmp_path, block_size):
    res = invoke("keygen", "--method", "shf", "-M", block_size, "--image-size", "4096", "-o", tmp_path / "k.json")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "k.json").exists()


def test_save_refuses_what_load_would_refuse(tmp_path):
    for key in (keys.Key("np", 4096, fixed_secret(0)), keys.Key("np", 4, fixed_secret(0), reference_seed=2**64),
                keys.Key("ffx", 4, fixed_secret(0), ffx_password=b"")):
        with pytest.raises(KeyshardError, match="cannot write key file"):
            keys.save(key, tmp_path / "k.json")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, field, value, fragment", [
    ("explicit shf", "permutation", [0.0] + list(range(1, 12)), "'material.permutation[0]' must be an integer"),
    ("explicit shf", "permutation", ["0"] + list(range(1, 12)), "'material.permutation[0]' must be an integer"),
    ("explicit shf", "permutation", [True] + list(range(1, 12)), "'material.permutation[0]' must be an integer"),
    ("explicit shf", "permutation", list(range(11)) + [0], "must be a permutation of 0..11"),
    ("explicit shf", "permutation", list(range(13)), "must be a permutation of 0..11"),
    ("explicit shf", "permutation", {"0": 1}, "'material.permutation' must be a list"),
    ("explicit ffx", "table", [1.5] + list(range(1, 256)), "'material.table[0]' must be an integer"),
    ("explicit ffx", "table", [None] * 256, "'material.table[0]' must be an integer"),
    ("explicit ffx", "table", [0] + list(range(1, 256))[:-1] + [0], "'material.table' must not repeat a value"),
    ("explicit ffx", "table", list(range(255)) + [1000], "'material.table[255]' must be at most 999"),
    ("explicit ffx", "table", list(range(255)), "'material.table' must have at least 256 items"),
    ("explicit np", "mask", "0" * 11, "'material.mask' must have 3M² = 12 characters"),
    ("explicit np", "mask", "0" * 11 + "2", "'material.mask' must be a string of '0' and '1' characters"),
    ("explicit np", "mask", "0" * 11 + "\n", "'material.mask' must be a string of '0' and '1' characters"),
    ("explicit np", "table", list(range(256)), "'material.table' is only for method ffx"),
])
def test_explicit_material_errors_are_one_line(tmp_path, kind, field, value, fragment):
    doc = keys.to_json(VALID[kind])
    doc["material"][field] = value
    path = _key_file(tmp_path, doc)
    assert_user_error(invoke("key-info", path), str(path), fragment)


@pytest.mark.parametrize("content, fragment", [
    (b'{"format": "keyshard-key/1", "format": "keyshard-key/1"}', "field 'format' appears twice"),
    (_dump(_doc(**{"reference-seed": 5})), "unknown field 'reference-seed'"),
    (_dump(_doc(**{"x" * 1000: 5})), "unknown field '" + "x" * 40 + "...'"),
    (_dump(_doc(format="keyshard-key/2")), "'format' must be 'keyshard-key/1'"),
    (_dump(_doc(derivation="explicit/1")), "'derivation' must be 'keyshard-shake256/1'"),
    (_dump(_doc(secret="g" * 64)), "'secret' must be 64 hex characters"),
    (_dump(_doc(secret="0" * 63 + "\n")), "'secret' must be 64 hex characters"),
    (_dump(_doc(block_size=4.0)), "'block_size' must be an integer"),
    (_dump(_doc(block_size=True)), "'block_size' must be an integer"),
    (_dump(_doc(ffx_password="pw")), "'ffx_password' is only for method ffx"),
    (_dump(keys.to_json(VALID["ffx with password"]) | {"ffx_password": "\ud800"}), "unpaired surrogate"),
    (_dump(keys.to_json(VALID["ffx with password"]) | {"ffx_password": "p" * 1025}), "at most 1024 characters"),
    (_dump([]), "the top level must be an object"),
    (b"\xef\xbb\xbf{}", "invalid JSON"),
    (b"\xff" * 10, "invalid JSON: not UTF-8"),
    (b"", "invalid JSON"),
    (b"NaN", "the top level must be an object"),
])
def test_odd_documents_are_one_line(tmp_path, content, fragment):
    path = _key_file(tmp_path, content)
    line = assert_user_error(invoke("key-info", path), str(path), fragment)
    assert not any(secret in line for secret in SECRETS)


# -- the schema ---------------------------------------------------------------------------

def test_schema_is_valid_and_agrees_with_the_code():
    schema = keys.key_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    props, material = schema["properties"], schema["properties"]["material"]["properties"]
    assert props["block_size"]["maximum"] == keys.MAX_BLOCK_SIZE
    assert material["permutation"]["maxItems"] == material["mask"]["maxLength"] == keys.MAX_BLOCK_LEN
    assert material["permutation"]["items"]["maximum"] == keys.MAX_BLOCK_LEN - 1
    assert props["reference_seed"]["maximum"] == keys.MAX_REFERENCE_SEED < 2**63
    assert props["ffx_password"]["maxLength"] == keys.MAX_FFX_PASSWORD_BYTES
    assert props["format"]["const"] == keys.KEY_FORMAT and props["method"]["enum"] == list(keys.METHODS)
    assert props["derivation"]["enum"] == [keys.DERIVE_SECRET, keys.DERIVE_REFERENCE, keys.DERIVE_EXPLICIT]


def test_every_written_key_matches_the_plain_schema():
    """An off-the-shelf validator accepts what keyshard writes (the fast path changes no answer)."""
    validator = jsonschema.Draft202012Validator(keys.key_schema())
    for doc in VALID_DOCS:
        validator.validate(doc)


def test_fast_items_path_gives_the_generic_answer():
    """keyshard's validator answers as the generic one does, except that 1.0 is no integer to it."""
    generic = jsonschema.Draft202012Validator(keys.key_schema())
    ours = keys._validator()
    for perm in ([0, 1, 2], [2, 1, 0, 3, 4, 5], [0, -1, 2], [0, 1, 786431], [0, 1, 786432], [0, True, 2],
                 [0, None], [[0], 1, 2], ["0", 1, 2], list(range(12)), []):
        doc = _doc(method="shf", derivation=keys.DERIVE_EXPLICIT, material={"permutation": perm})
        assert ours.is_valid(doc) == generic.is_valid(doc), perm
    doc = _doc(method="shf", derivation=keys.DERIVE_EXPLICIT, material={"permutation": [0, 1.0, 2]})
    assert generic.is_valid(doc) and not ours.is_valid(doc)


def test_mode_is_checked_on_what_was_read(tmp_path):
    path = tmp_path / "k.json"
    keys.save(VALID["derived np"], path)
    path.chmod(0o640)
    res = invoke("key-info", path)
    assert res.exit_code == 0
    assert res.output.count("key file mode is 0640") == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # warned about, never changed
