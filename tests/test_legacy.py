"""Files written by keyshard 0.1.0 still work: its key file, manifests, shards and a checkpoint
(tests/legacy/, see its README).  Auditing the 0.1.0 checkpoint today gives the audit 0.1.0 wrote."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import keyshard
from conftest import invoke
from golden_chain import _numbers

LEGACY = Path(__file__).resolve().parent / "legacy"


def _copy(tmp_path: Path) -> Path:
    work = tmp_path / "legacy"
    shutil.copytree(LEGACY, work)
    (work / "key.json").chmod(0o600)  # git keeps no modes but the executable bit
    return work


def test_manifests_key_and_shards_of_0_1_read(tmp_path):
    work = _copy(tmp_path)
    plain, keyed = keyshard.read_manifest(work / "plain"), keyshard.read_manifest(work / "enc")
    key = keyshard.load_key(work / "key.json")
    assert plain.encryption.plain and not keyed.encryption.plain
    assert keyed.encryption.key_fingerprint == key.fingerprint and keyed.encryption.method == key.method
    assert plain.dataset.kind == "voc" and plain.dataset.num_classes == 21
    assert invoke("verify", work / "plain").exit_code == 0


def test_a_0_1_checkpoint_audits_as_it_did(tmp_path):
    work = _copy(tmp_path)
    result = invoke("evaluate", "--checkpoint", work / "run" / "last.pt", "--key", work / "key.json",
                    "--test", work / "plain", "--wrong-keys", 3, "--seed", 0, "--workers", 0, "-o", work / "audit")
    assert result.exit_code == 0, result.output
    old = json.loads((LEGACY / "audit-0.1.json").read_text())["results"]
    new = json.loads((work / "audit" / "audit.json").read_text())["results"]
    expected, got = _numbers(old), _numbers(new)
    assert set(expected) <= set(got), set(expected) - set(got)
    bad = {k: (got[k], v) for k, v in expected.items() if not math.isclose(got[k], v, rel_tol=0, abs_tol=1e-9)}
    assert not bad, bad
