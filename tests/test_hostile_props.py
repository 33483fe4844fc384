"""Property tests (hypothesis, derandomized, bounded): mutated manifests and audits, and random
option values, fed to the loaders and commands — only a KeyshardError (one line, exit 1) or a
click usage error (exit 2) may come out, never a traceback.  Key files: tests/test_hostile_keys.py.
"""

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keyshard
from keyshard.errors import KeyshardError
from keyshard.pipeline import encrypt_job
from keyshard.pipeline.toy_voc import make_toy_voc

from conftest import invoke

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _paths(doc, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def mutate(doc, data):
    """Replace or delete one value somewhere in ``doc`` (a copy)."""
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(sorted(_paths(doc), key=repr)))
    if not path:
        return data.draw(JSON)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON)
    return doc


def assert_clean(result):
    text = result.output
    assert result.exit_code in (0, 1, 2), text
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Plain shards and a baseline audit of a 1-epoch model on them."""
    root = tmp_path_factory.mktemp("props")
    voc = make_toy_voc(root / "voc", images=12, seed=2, min_side=40, max_side=48, progress=False)
    encrypt_job.run(str(voc), str(root / "plain"), None, encrypt_job.EncryptOptions(size=16, shard_size=4),
                    jobs=1, progress=False)
    assert invoke("train", "--shards", root / "plain", "--output", root / "run", "--epochs", 1, "--batch-size", 4,
                  "--workers", 0, "-q").exit_code == 0
    assert invoke("evaluate", "--checkpoint", root / "run" / "best.pt", "--test", root / "plain",
                  "--workers", 0, "-q").exit_code == 0
    return root


@SETTINGS
@given(data=st.data())
def test_mutated_manifests_give_one_line_or_work(audited, tmp_path_factory, data):
    good = json.loads((audited / "plain" / "manifest.json").read_text())
    d = tmp_path_factory.mktemp("m")
    shutil.copytree(audited / "plain", d / "s")
    (d / "s" / "manifest.json").write_text(json.dumps(mutate(good, data)))
    assert_clean(invoke("verify", d / "s", "-q"))
    try:
        for _ in keyshard.open_shards(str(d / "s"), "test", batch_size=4, shuffle=False):
            pass
    except KeyshardError as exc:
        assert "\n" not in str(exc)


@SETTINGS
@given(data=st.data())
def test_mutated_audits_give_one_line_or_work(audited, tmp_path_factory, data):
    good = json.loads((audited / "run" / "audit" / "audit.json").read_text())
    d = tmp_path_factory.mktemp("a")
    (d / "audit.json").write_text(json.dumps(mutate(good, data)))
    assert_clean(invoke("report", d / "audit.json"))


OPTION = st.one_of(st.integers(min_value=-2**70, max_value=2**70).map(str), st.floats(allow_nan=True).map(str),
                   st.text(max_size=10))


@SETTINGS
@given(value=OPTION, which=st.sampled_from([
    ("encrypt", "--voc", "{missing}", "--plain", "-o", "{out}", "--image-size"),
    ("encrypt", "--voc", "{missing}", "--plain", "-o", "{out}", "--jobs"),
    ("encrypt", "--voc", "{missing}", "--plain", "-o", "{out}", "--crop-scale", "0.1"),
    ("encrypt", "--voc", "{missing}", "--plain", "-o", "{out}", "--max-pixels"),
    ("train", "--shards", "{missing}", "--output", "{out}", "--lr"),
    ("train", "--shards", "{missing}", "--output", "{out}", "--batch-size"),
    ("evaluate", "--checkpoint", "{missing}", "--test", "{missing}", "--wrong-keys"),
    ("evaluate", "--checkpoint", "{missing}", "--test", "{missing}", "--near-miss"),
    ("keygen", "--method", "np", "-o", "{out}/k.json", "--block-size"),
]))
def test_random_option_values_give_one_line(tmp_path_factory, value, which):
    d = tmp_path_factory.mktemp("o")
    args = [a.format(missing=d / "missing", out=d / "out") for a in which] + [value]
    if which[0] == "keygen":  # succeeds on good values: keep the key small
        args += ["--image-size", "64"]
    result = invoke(*args)
    assert_clean(result)
    if which[0] != "keygen":
        assert result.exit_code in (1, 2)  # the missing input is always named, or the value refused
