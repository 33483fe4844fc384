"""Attacks: known-plaintext key recovery, near-miss keys, key search, fine-tuning."""

import json
import math

import numpy as np
import torch
import pytest

from keyshard import keys
from keyshard.methods.masked import mask_size, rule_mask_size
from keyshard.evaluate.known_plaintext import matched_pairs, recover_material
from keyshard.pipeline import encrypt_job
from keyshard.pipeline.toy_voc import make_toy_voc
from keyshard.transforms import compile_plan

from conftest import assert_user_error, fixed_secret, invoke, keyed_run

SIZE = 32


@pytest.fixture(scope="module")
def kpa(tmp_path_factory):
    root = tmp_path_factory.mktemp("kpa")
    voc = make_toy_voc(root / "voc", images=12, seed=8, min_side=40, max_side=56, progress=False)
    opts = encrypt_job.EncryptOptions(size=SIZE, shard_size=8, splits=("test",))
    encrypt_job.run(str(voc), str(root / "plain"), None, opts, jobs=1, progress=False)
    for i, method in enumerate(keys.METHODS):
        for m in (2, 16):
            key = keys.Key(method, m, fixed_secret(i + m))
            keys.save(key, root / f"{method}{m}.json")
            encrypt_job.run(str(voc), str(root / f"{method}{m}"), key, opts, jobs=1, progress=False)
        # a reference-seed key (its masks select 5 of 12 positions at M=2, not 6)
        ref = keys.Key(method, 2, fixed_secret(i), reference_seed=5 + i,
                       ffx_password=b"password" if method == "ffx" else None)
        keys.save(ref, root / f"ref-{method}2.json")
        encrypt_job.run(str(voc), str(root / f"ref-{method}2"), ref, opts, jobs=1, progress=False)
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


@pytest.mark.parametrize("method", keys.METHODS)
@pytest.mark.parametrize("kind", ["derived", "reference-seed"])
def test_recovered_keys_get_wrong_near_miss_and_search_keys_of_their_own_shape(kpa, tmp_path, method, kind):
    """README flow: recover a key, then audit/attack with it.  The explicit key's wrong keys,
    near-miss keys and search space follow its own material: mask size (5 of 12 for a
    reference-seed key, 6 for a derived one), FFX table, permutation length."""
    from keyshard.evaluate import wrong_keys
    from keyshard.evaluate.key_search import Objective, search
    from keyshard.evaluate.near_miss import distance, near_miss_keys

    name = f"{method}2" if kind == "derived" else f"ref-{method}2"
    out = tmp_path / "recovered.json"
    res = invoke("attack", "known-plaintext", "--plain", kpa / "plain", "--encrypted", kpa / name, "-o", out)
    assert res.exit_code == 0, res.output
    recovered, truth = keys.load(out), keys.load(kpa / f"{name}.json")
    assert recovered.derivation == keys.DERIVE_EXPLICIT
    base, n = recovered.material, 12
    wrong = wrong_keys.draw(recovered, 10, seed=2)
    assert [k.fingerprint for k in wrong] == [k.fingerprint for k in wrong_keys.draw(recovered, 10, seed=2)]
    near = near_miss_keys(recovered, 1, 3, seed=1)
    for k in wrong + near:
        assert not k.material.equals(base) and (k.method, k.block_size) == (method, 2)
        if method == "shf":
            assert sorted(k.material.perm.tolist()) == list(range(n))
        else:
            size = rule_mask_size(2, truth.derivation)
            assert size == (5 if kind == "reference-seed" else 6)
            assert mask_size(k.material) == mask_size(base) == mask_size(truth.material) == size
        if method == "ffx":  # the recovered key's own table, not one derived from its fresh secret
            np.testing.assert_array_equal(k.material.table, base.table)
    assert all(distance(k.material, base) == 1 for k in near)
    if method == "np":  # the search enumerates masks of the recovered key's size and finds it
        plain = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
        objective = Objective(OracleNP(base, 8, 8).eval(), plain, oracle_labels(plain), "cpu")
        mode, ranked = search(objective, "np", 2, recovered.derivation, budget=10, exhaustive_limit=5000,
                              start=wrong[0].material, seed=0)
        assert mode == "exhaustive" and len(ranked) == math.comb(n, mask_size(base))
        assert ranked[0][1].equals(base) and ranked[0][1].equals(truth.material)


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

    correct = keys.Key(method, m, fixed_secret(3))
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


class OracleNP(torch.nn.Module):
    """A 'model' whose first stage undoes one NP mask exactly, then reads each channel's sign:
    class 1 + 4·[R>127] + 2·[G>127] + [B>127].  Only the correct mask reproduces every label."""

    def __init__(self, material, h, w):
        super().__init__()
        from keyshard.transforms import IMAGENET_MEAN, IMAGENET_STD

        plan = compile_plan(material, h, w)
        self.register_buffer("flip", torch.from_numpy(plan.xor == 255).permute(2, 0, 1)[None])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        signs = torch.zeros(21, 3)
        for c in range(8):
            signs[1 + c] = torch.tensor([1.0 if c & 4 else -1.0, 1.0 if c & 2 else -1.0, 1.0 if c & 1 else -1.0])
        self.register_buffer("signs", signs)

    def forward(self, x):
        v = (x * self.std + self.mean) * 255
        plain = torch.where(self.flip, 255 - v, v)
        logits = torch.einsum("kc,bchw->bkhw", self.signs, (plain - 127.5) / 8)
        logits[:, 0] = -100
        logits[:, 9:] = -100
        return {"out": logits}


def oracle_labels(plain: torch.Tensor) -> torch.Tensor:
    bits = (plain > 127).long()
    return 1 + 4 * bits[..., 0] + 2 * bits[..., 1] + bits[..., 2]


def test_exhaustive_search_finds_the_key_a_model_is_built_for():
    import torch

    from keyshard.evaluate.key_search import Objective, search

    correct = keys.Key("np", 2, fixed_secret(4))
    plain = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    model = OracleNP(correct.material, 8, 8).eval()
    objective = Objective(model, plain, oracle_labels(plain), "cpu")
    mode, ranked = search(objective, "np", 2, correct.derivation, budget=10, exhaustive_limit=5000,
                          start=None, seed=0)
    assert mode == "exhaustive" and len(ranked) == 924 and objective.evaluations == 924
    assert ranked[0][1].equals(correct.material)
    assert ranked[0][0] < ranked[1][0]


def test_hill_climbing_improves_on_its_start():
    import torch

    from keyshard.evaluate import wrong_keys
    from keyshard.evaluate.key_search import Objective, hill_climb

    correct = keys.Key("np", 4, fixed_secret(5))
    plain = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    objective = Objective(OracleNP(correct.material, 8, 8).eval(), plain, oracle_labels(plain), "cpu")
    start = wrong_keys.draw(correct, 1, seed=1)[0].material
    ranked = hill_climb(objective, start, budget=600, seed=0)
    from keyshard.evaluate.near_miss import distance

    assert ranked[0][0] < objective(start)
    assert distance(ranked[0][1], correct.material) < distance(start, correct.material)


@pytest.fixture(scope="module")
def np2_model(tmp_path_factory):
    """A small model trained a few epochs on NP M=2 toy shards, with plain shards for the attacker."""
    return keyed_run(tmp_path_factory.mktemp("np2"), "np", 2, images=80, seed=11, epochs=8, shard_size=16,
                     enc_splits=("train", "holdout"), lr=0.1)


def test_exhaustive_search_ranks_the_true_np_key_near_the_top(np2_model, tmp_path):
    res = invoke("attack", "search", "--checkpoint", np2_model / "run" / "best.pt", "--labelled-shards",
                 np2_model / "plain", "--labelled", 8, "--test", np2_model / "plain", "--key", np2_model / "key.json",
                 "--output", tmp_path / "search.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "search.json").read_text())
    assert report["mode"] == "exhaustive" and report["evaluations"] >= 924
    assert report["true_key_rank"] <= 5, report
    assert len(report["best"]) == 5 and all("distance_to_true_key" in b for b in report["best"])


def test_search_refuses_mismatched_inputs(np2_model, tmp_path):
    args = ["attack", "search", "--checkpoint", np2_model / "run" / "best.pt", "--labelled", 4]
    assert_user_error(invoke(*args, "--labelled-shards", np2_model / "enc", "--test", np2_model / "plain"),
                      "must hold plain shards")
    other = tmp_path / "m4.json"
    keys.save(keys.Key("np", 4, fixed_secret(6)), other)
    assert_user_error(invoke(*args, "--labelled-shards", np2_model / "plain", "--test", np2_model / "plain",
                             "--key", other), "M=4")


def test_finetune_attack_reports_both_models(np2_model, tmp_path):
    out = tmp_path / "ft.json"
    res = invoke("attack", "finetune", "--checkpoint", np2_model / "run" / "best.pt", "--plain-train",
                 np2_model / "plain", "--test", np2_model / "plain", "--fraction", "0.1,0.5", "--epochs", 2,
                 "--output", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    n_train = 36  # 40 train.txt ids minus round(40*146/1464) = 4 holdout
    assert [r["images"] for r in report["rows"]] == [round(0.1 * n_train), round(0.5 * n_train)]
    for r in report["rows"]:
        assert 0 <= r["finetuned_miou"] <= 1 and 0 <= r["scratch_miou"] <= 1
        assert r["head_start"] == pytest.approx(r["finetuned_miou"] - r["scratch_miou"])
    assert "| 0.1 |" in res.output
    assert_user_error(invoke("attack", "finetune", "--checkpoint", np2_model / "run" / "best.pt", "--plain-train",
                             np2_model / "enc", "--test", np2_model / "plain", "--fraction", "0.1"),
                      "must hold plain shards")
    assert_user_error(invoke("attack", "finetune", "--checkpoint", np2_model / "run" / "best.pt", "--plain-train",
                             np2_model / "plain", "--test", np2_model / "plain", "--fraction", "2"), "(0, 1]")
