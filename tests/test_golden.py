"""Refactors change no behaviour: the golden chain (tests/golden_chain.py) gives what it gave when
tests/golden/ was recorded — byte-identical shards, the same manifests, checkpoint tensors within
1e-6 and audit numbers within 1e-9."""

from __future__ import annotations

import json
import math

import torch

from golden_chain import GOLDEN, _stable, run_chain


def test_golden_chain_is_unchanged(tmp_path):
    expected = json.loads((GOLDEN / "outputs.json").read_text())
    expected_tensors = torch.load(GOLDEN / "checkpoints.pt", weights_only=True)
    out, tensors = run_chain(tmp_path)
    out = json.loads(json.dumps(out))  # the same JSON round trip as the recorded file
    assert out["shards"] == expected["shards"]
    for name, manifest in expected["manifests"].items():
        assert out["manifests"][name] == _stable(manifest, GOLDEN), name  # less what is volatile now
    for task, numbers in expected["audits"].items():
        got = out["audits"][task]
        assert set(got) == set(numbers), (task, set(got) ^ set(numbers))
        bad = {k: (got[k], v) for k, v in numbers.items() if not math.isclose(got[k], v, rel_tol=0, abs_tol=1e-9)}
        assert not bad, (task, bad)
    assert set(tensors) == set(expected_tensors)
    for name, value in expected_tensors.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
        if value.is_floating_point():
            assert torch.allclose(tensors[name], value, rtol=0, atol=1e-6), name
        else:
            assert torch.equal(tensors[name], value), name
