"""Attacks: known-plaintext key recovery, near-miss keys, key search, fine-tuning."""

import json

import numpy as np
import pytest

from keyshard import keys
from keyshard.evaluate.known_plaintext import matched_pairs, recover_material
from keyshard.pipeline import encrypt_job
from keyshard.pipeline.toy_voc import make_toy_voc
from keyshard.transforms import compile_plan

from conftest import assert_user_error, invoke

SIZE = 32


@pytest.fixture(scope="module")
def kpa(tmp_path_factory):
    root = tmp_path_factory.mktemp("kpa")
    voc = make_toy_voc(root / "voc", images=12, seed=8, min_side=40, max_side=56, progress=False)
    opts = encrypt_job.EncryptOptions(size=SIZE, shard_size=8, splits=("test",))
    encrypt_job.run(str(voc), str(root / "plain"), None, opts, jobs=1, progress=False)
    for method in keys.METHODS:
        for m in (2, 16):
            key = keys.generate(method, m)
            keys.save(key, root / f"{method}{m}.json")
            encrypt_job.run(str(voc), str(root / f"{method}{m}"), key, opts, jobs=1, progress=False)
    return root


@pytest.mark.parametrize("method", keys.METHODS)
@pytest.mark.parametrize("m", [2, 16])
def test_known_plaintext_recovers_the_key(kpa, tmp_path, method, m):
    out = tmp_path / "recovered.json"
    res = invoke("attack", "known-plaintext", "--plain", kpa / "plain", "--encrypted", kpa / f"{method}{m}",
                 "-o", out, "--key", kpa / f"{method}{m}.json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[: res.output.rindex("}") + 1])
    assert report["reproduced"] == report["pairs_available"] == 6 and 1 <= report["pairs_needed"] <= 6
    recovered, truth = keys.load(out), keys.load(kpa / f"{method}{m}.json")
    assert recovered.derivation == keys.DERIVE_EXPLICIT and recovered.fingerprint != truth.fingerprint
    # every encrypted sample is re-made exactly from its plain one
    _, pairs = matched_pairs(kpa / "plain", kpa / f"{method}{m}")
    plan = compile_plan(recovered.material, SIZE, SIZE)
    for _, plain, enc in pairs:
        np.testing.assert_array_equal(plan.encrypt(plain), enc)
    # and the key material equals the true key wherever the data determine it
    _, _, determined = recover_material(method, m, pairs)
    if method == "shf":
        assert determined.sum() > 0
        np.testing.assert_array_equal(recovered.material.perm[determined], truth.material.perm[determined])
        assert report["true_key_equal_where_determined"]
    else:
        np.testing.assert_array_equal(recovered.material.mask, truth.material.mask)
    if method == "np":
        assert report["pairs_needed"] == 1
    if method == "ffx":
        observed = np.unique(np.concatenate([p.reshape(-1) for _, p, _ in pairs]))
        assert set(np.flatnonzero(determined)) <= set(observed.tolist())
        np.testing.assert_array_equal(recovered.material.table[determined], truth.material.table[determined])
        assert report["table_entries_known"] == int(determined.sum()) > 100


def test_known_plaintext_refuses_mismatched_inputs(kpa, tmp_path):
    args = ["attack", "known-plaintext", "-o", tmp_path / "k.json"]
    assert_user_error(invoke(*args, "--plain", kpa / "np2", "--encrypted", kpa / "shf2"), "is not plain")
    assert_user_error(invoke(*args, "--plain", kpa / "plain", "--encrypted", kpa / "plain"), "plain shards")
    assert not (tmp_path / "k.json").exists()


def test_known_plaintext_refuses_other_ids(kpa, tmp_path):
    voc = kpa / "voc"
    key = keys.load(kpa / "np2.json")
    encrypt_job.run(str(voc), str(tmp_path / "train"), key,
                    encrypt_job.EncryptOptions(size=SIZE, splits=("train",)), jobs=1, progress=False)
    assert_user_error(invoke("attack", "known-plaintext", "--plain", kpa / "plain", "--encrypted", tmp_path / "train",
                             "-o", tmp_path / "k.json"), "no sample ids in common")


@pytest.mark.parametrize("method", keys.METHODS)
@pytest.mark.parametrize("m", [2, 4])
def test_near_miss_keys_are_at_exactly_the_requested_distance(method, m):
    from keyshard.evaluate.near_miss import distance, max_distance, near_miss_keys

    correct = keys.generate(method, m)
    n = 3 * m * m
    top = max_distance(correct.material)
    for d, count in ((1, 3), (2, 3), (top, 1)):  # at M=2 NP/FFX, distance 6 is the complement only
        ks = near_miss_keys(correct, d, count, seed=1)
        assert len({k.material.canonical_bytes() for k in ks}) == count
        for k in ks:
            assert not k.material.equals(correct.material)
            assert distance(k.material, correct.material) == d
            if method == "shf":  # d disjoint transpositions move exactly 2d values
                assert int((k.material.perm != correct.material.perm).sum()) == 2 * d
            else:  # d selected swapped with d unselected: 2d positions differ, size kept
                assert int((k.material.mask != correct.material.mask).sum()) == 2 * d
                assert k.material.mask.sum() == correct.material.mask.sum()
    with pytest.raises(Exception, match="outside 1.."):
        near_miss_keys(correct, max_distance(correct.material) + 1, 1, seed=1)
    assert max_distance(correct.material) == (n // 2 if method == "shf" else min(n // 2, n - n // 2))
    assert near_miss_keys(correct, 2, 3, seed=1)[0].fingerprint == near_miss_keys(correct, 2, 3, seed=1)[0].fingerprint
