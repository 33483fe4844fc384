"""manifests/audit.schema.json describes the audit.json that `keyshard evaluate` writes.

Audits are made here by the same functions `evaluate` calls (``run_audit`` / ``run_baseline`` and
``write_audit``, one audit loop for every task) on tiny toy data, then read back from disk and
validated: a segmentation key audit (with near-miss keys and the predictions record), a segmentation baseline,
a classification key audit and a classification baseline; plus the shipped example and audits
that were damaged on purpose.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from keyshard import keys

from conftest import fixed_secret, invoke, keyed_run

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def _schema() -> dict:
    return json.loads(resources.files("keyshard.manifests").joinpath("audit.schema.json").read_text())


@pytest.fixture(scope="module")
def validator():
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def _trainer(shards: Path, run: Path, epochs: int = 1, **overrides):
    from keyshard.train.loop import TrainConfig, Trainer

    cfg = TrainConfig.from_preset("demo", epochs=epochs, batch_size=8, micro_batch=8, workers=0, seed=0, **overrides)
    Trainer(shards, run, cfg, progress=False, log=lambda msg: None).fit()
    return run / "best.pt"


@pytest.fixture(scope="module")
def segmentation_audits(tmp_path_factory) -> dict:
    """Toy VOC at 32², NP M=4, the demo network one epoch; a key audit (with near-miss keys,
    predictions and a ciphertext-only estimate) and a baseline audit."""
    from keyshard.evaluate.audit import run_audit, run_baseline
    from keyshard.evaluate.predictions import Capture
    from keyshard.evaluate.report import write_audit

    root = keyed_run(tmp_path_factory.mktemp("seg"), "np", 4, images=24, seed=5, epochs=1, shard_size=16)
    capture = Capture(2)
    audit = run_audit(str(root / "run" / "best.pt"), str(root / "key.json"), str(root / "plain"), n_wrong=3, seed=1,
                      workers=0, progress=False, near_miss=(1, 2), near_miss_count=2, capture=capture,
                      ciphertext_only=4)
    write_audit(audit, root / "audit", capture)
    plain_ckpt = _trainer(root / "plain", root / "plainrun")
    base = run_baseline(str(plain_ckpt), str(root / "plain"), workers=0, progress=False)
    write_audit(base, root / "base")
    return {name: json.loads((root / name / "audit.json").read_text()) for name in ("audit", "base")}


@pytest.fixture(scope="module")
def classification_audits(tmp_path_factory) -> dict:
    """Toy classes at 32², SHF M=4, the demo classifier one epoch; a key audit and a baseline audit."""
    from keyshard.evaluate.audit import run_audit, run_baseline
    from keyshard.evaluate.report import write_audit

    root = tmp_path_factory.mktemp("cls")
    res = invoke("toy-classes", root / "toy", "--classes", 3, "--images", 45, "--seed", 3)
    assert res.exit_code == 0, res.output
    keys.save(keys.Key("shf", 4, fixed_secret(5)), root / "key.json")
    for name, how in (("enc", ("--key", root / "key.json")), ("plain", ("--plain",))):
        res = invoke("encrypt", "--image-folder", root / "toy", *how, "-o", root / name, "--image-size", 32,
                     "--shard-size", 32, "-j", 1, "-q")
        assert res.exit_code == 0, res.output
    ckpt = _trainer(root / "enc", root / "run")
    audit = run_audit(str(ckpt), str(root / "key.json"), str(root / "plain"), n_wrong=3, seed=1,
                      workers=0, progress=False)
    write_audit(audit, root / "audit")
    plain_ckpt = _trainer(root / "plain", root / "plainrun", block_size=4)  # patch_vit needs M on plain shards
    base = run_baseline(str(plain_ckpt), str(root / "plain"), workers=0, progress=False)
    write_audit(base, root / "base")
    return {name: json.loads((root / name / "audit.json").read_text()) for name in ("audit", "base")}


def test_schema_is_package_data_and_a_valid_draft_2020_12_schema():
    schema = _schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == json.loads((MANIFESTS / "audit.schema.json").read_text())


def test_segmentation_audits_match_the_schema(validator, segmentation_audits):
    audit, base = segmentation_audits["audit"], segmentation_audits["base"]
    assert "task" not in audit and audit["kind"] == "key" and base["kind"] == "baseline"
    assert [r["distance"] for r in audit["results"]["near_miss"]] == [1, 2] and "predictions" in audit
    assert audit["ciphertext_only"]["images"] == 4
    for doc in (audit, base):
        assert _errors(validator, doc) == []


def test_classification_audits_match_the_schema(validator, classification_audits):
    audit, base = classification_audits["audit"], classification_audits["base"]
    assert audit["task"] == base["task"] == "classification"
    for doc in (audit, base):
        assert _errors(validator, doc) == []


def test_the_example_audit_matches_the_schema(validator):
    example = json.loads((MANIFESTS / "example-audit.json").read_text())
    assert example["format"] == "keyshard-audit/1" and example["kind"] == "key"
    assert _errors(validator, example) == []


def _damaged(doc: dict) -> list[tuple[str, dict]]:
    """Copies of a keyed audit, each broken in one way the schema must catch."""
    out = []

    def variant(name, change):
        d = copy.deepcopy(doc)
        change(d)
        out.append((name, d))

    first_score = "miou" if "task" not in doc else "top1_acc"
    variant("score above 1", lambda d: d["results"]["correct"].__setitem__(first_score, 1.5))
    variant("negative score", lambda d: d["results"]["wrong"]["keys"][0].__setitem__(first_score, -0.1))
    variant("missing wrong_keys", lambda d: d.pop("wrong_keys"))
    variant("unknown top-level field", lambda d: d.__setitem__("secret", "00" * 32))
    variant("fingerprint not hex", lambda d: d["key"].__setitem__("fingerprint", "not-a-fingerprint"))
    variant("malformed method name", lambda d: d["key"].__setitem__("method", "Shf M=2"))  # any registered plug-in name is valid
    variant("another format", lambda d: d.__setitem__("format", "keyshard-audit/2"))
    variant("key audit without a key", lambda d: d.__setitem__("key", None))
    variant("count as text", lambda d: d["wrong_keys"].__setitem__("count", "3"))
    variant("no wrong key rows", lambda d: d["results"]["wrong"].__setitem__("keys", []))
    if "ciphertext_only" in doc:
        variant("key fraction above 1",
                lambda d: d["ciphertext_only"]["scores"].__setitem__("key_fraction", 1.5))
        variant("ciphertext-only row without the model's score", lambda d: d["ciphertext_only"].pop("model"))
    variant("other task's results", lambda d: d.__setitem__("task", "classification") if "task" not in d
            else d.pop("task"))
    return out


def test_damaged_audits_fail_validation(validator, segmentation_audits, classification_audits):
    for doc in (segmentation_audits["audit"], classification_audits["audit"],
                json.loads((MANIFESTS / "example-audit.json").read_text())):
        assert _errors(validator, doc) == []
        for name, bad in _damaged(doc):
            assert _errors(validator, bad), f"schema accepted an audit with {name}"
    base = copy.deepcopy(segmentation_audits["base"])
    base["key"] = {"fingerprint": "0" * 64, "method": "np", "block_size": 4, "derivation": "explicit/1",
                   "fingerprint_check": "match"}
    assert _errors(validator, base), "schema accepted a baseline audit with a key"
    base = copy.deepcopy(segmentation_audits["base"])
    base["ciphertext_only"] = segmentation_audits["audit"]["ciphertext_only"]
    assert _errors(validator, base), "schema accepted a baseline audit with a ciphertext-only row"
