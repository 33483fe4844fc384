"""The audit: metrics against independent computations, wrong keys, device transforms, refusals."""

import hashlib
import json

import numpy as np
import pytest
import torch

from keyshard import keys, methods
from keyshard.methods.masked import mask_size
from keyshard.evaluate import wrong_keys
from keyshard.evaluate.metrics import Confusion
from keyshard.shardformat import decode_npy, iter_tar_samples
from keyshard.transforms import compile_plan

from conftest import assert_user_error, invoke, keyed_run

SIZE = 32


def numpy_scores(pred, label):
    valid = label != 255
    ious = []
    for c in range(21):
        inter = ((pred == c) & (label == c) & valid).sum()
        union = (((pred == c) | (label == c)) & valid).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float(((pred == label) & valid).sum() / valid.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_and_accuracy_match_independent_computations(seed):
    import torchmetrics

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 21, (4, 24, 24))
    label[rng.random(label.shape) < 0.15] = 255
    if seed:  # absent classes: never in labels, and some also never predicted
        label[np.isin(label, [3, 7, 11])] = 0
    pred = np.where(rng.random(label.shape) < 0.6, np.where(label == 255, 0, label), rng.integers(0, 21, label.shape))
    if seed:
        pred[np.isin(pred, [3, 7])] = 1  # 3 and 7 absent from both; 11 only predicted
    conf = Confusion()
    for i in range(4):  # accumulated over batches
        conf.update(torch.from_numpy(pred[i:i + 1]), torch.from_numpy(label[i:i + 1]))
    scores = conf.scores()
    miou, acc = numpy_scores(pred, label)
    assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["pixel_acc"] == pytest.approx(acc, abs=1e-12)
    tm_acc = torchmetrics.functional.classification.multiclass_accuracy(
        torch.from_numpy(pred), torch.from_numpy(label), num_classes=21, average="micro", ignore_index=255)
    assert scores["pixel_acc"] == pytest.approx(float(tm_acc), abs=1e-6)
    tm_iou = torchmetrics.functional.classification.multiclass_jaccard_index(
        torch.from_numpy(pred), torch.from_numpy(label), num_classes=21, average="none", ignore_index=255)
    present = [i for i, v in enumerate(scores["per_class_iou"]) if v is not None]
    assert np.mean(tm_iou.numpy()[present]) == pytest.approx(scores["miou"], abs=1e-6)
    if seed:
        assert scores["per_class_iou"][3] is None and scores["per_class_iou"][7] is None
        assert scores["per_class_iou"][11] == 0.0  # predicted but never labelled: counts as 0


FIXED_SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(32, 64))


def key_kinds(method: str, m: int) -> dict:
    """One correct key of every kind: derived from a secret (FFX: derived password and a given
    one), from a reference seed, and explicit copies of both as `attack known-plaintext` writes
    them (the material plus a fresh secret — whose derived FFX password is *not* the key's)."""
    pw = b"pw" if method == "ffx" else None
    out = {"derived": keys.Key(method, m, FIXED_SECRET),
           "reference-seed": keys.Key(method, m, FIXED_SECRET, reference_seed=9, ffx_password=pw)}
    if method == "ffx":
        out["derived, given password"] = keys.Key(method, m, FIXED_SECRET, ffx_password=pw)
    for name, key in list(out.items()):
        out[f"explicit from {name}"] = keys.Key(method, m, OTHER_SECRET, explicit=key.material)
    return out


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("method", keys.METHODS)
def test_wrong_keys_follow_the_correct_keys_own_rules_for_every_kind(method, m):
    n = 3 * m * m
    drawn = {}
    for kind, correct in key_kinds(method, m).items():
        base = correct.material
        a = wrong_keys.draw(correct, 20, seed=3)
        b = wrong_keys.draw(correct, 20, seed=3)
        c = wrong_keys.draw(correct, 20, seed=4)
        assert [k.fingerprint for k in a] == [k.fingerprint for k in b], kind  # deterministic from the seed
        assert all(x.material.equals(y.material) for x, y in zip(a, b)), kind
        assert [k.fingerprint for k in a] != [k.fingerprint for k in c], kind
        assert len({k.material.canonical_bytes() for k in a}) == 20, kind  # distinct
        for k in a:
            w = k.material
            assert (w.method, w.block_size) == (method, m), kind
            assert not w.equals(base), kind  # never the correct key
            if method == "shf":  # a permutation of the same length
                assert sorted(w.perm.tolist()) == list(range(n)), kind
            else:  # as many positions as the correct key's mask
                assert w.mask.shape == (n,) and mask_size(w) == mask_size(base), kind
            if method == "ffx":  # the correct key's table (the paper's setting)
                np.testing.assert_array_equal(w.table, base.table, err_msg=kind)
        if method != "shf":
            expected = n - 1 - n // 2 if "reference" in kind else n // 2
            assert mask_size(base) == expected, kind
            assert f"({expected} of {n} positions)" in wrong_keys.rule(correct), kind
        if method == "ffx":
            assert "the key's FFX table" in wrong_keys.rule(correct)
            other = wrong_keys.draw(correct, 5, seed=3, randomize_password=True)
            assert "FFX table" not in wrong_keys.rule(correct, randomize_password=True)
            for k in other:  # --randomize-ffx-password: another table, same mask size
                assert not np.array_equal(k.material.table, base.table), kind
                assert len(set(k.material.table.tolist())) == 256 and k.material.table.max() <= 999
                assert mask_size(k.material) == mask_size(base)
            assert [k.fingerprint for k in other] == [k.fingerprint for k in
                                                      wrong_keys.draw(correct, 5, seed=3, randomize_password=True)]
        drawn[kind] = a
    # the draw depends on the material only: an explicit copy gets the very same wrong keys
    for kind, ks in drawn.items():
        if kind.startswith("explicit from "):
            original = drawn[kind[len("explicit from "):]]
            assert all(x.material.equals(y.material) for x, y in zip(ks, original)), kind


def test_wrong_keys_of_a_secret_key_are_the_keys_their_secrets_derive():
    """Stable across library versions: the documented derivation, not a numpy generator."""
    correct = keys.Key("np", 4, FIXED_SECRET)
    for i, k in enumerate(wrong_keys.draw(correct, 3, seed=5)):
        fresh = keys.Key("np", 4, hashlib.sha256(f"keyshard-wrong-key/1|5|{i}".encode()).digest())
        assert k.material.equals(fresh.material)


def test_wrong_keys_keep_an_explicit_masks_unusual_size():
    mask = np.zeros(12, dtype=bool)
    mask[[0, 4, 11]] = True  # an imported key: 3 of 12 positions, no derivation selects that
    correct = keys.Key("ffx", 2, OTHER_SECRET, explicit=methods.get("ffx").Material(2, mask=mask,
                                                                          table=keys.ffx_table(b"pw")))
    every_other = wrong_keys.draw(correct, 219, seed=0)  # C(12, 3) - 1
    assert all(mask_size(k.material) == 3 for k in every_other)
    assert len({k.material.canonical_bytes() for k in every_other}) == 219
    assert "(3 of 12 positions)" in wrong_keys.rule(correct)
    with pytest.raises(Exception, match="219 other keys"):
        wrong_keys.draw(correct, 220, seed=0)


def test_small_key_space_is_exhausted_exactly():
    correct = keys.Key("np", 2, FIXED_SECRET)
    every_other = wrong_keys.draw(correct, 923, seed=0)
    assert len({k.material.canonical_bytes() for k in every_other}) == 923
    with pytest.raises(Exception, match="923 other keys"):
        wrong_keys.draw(correct, 924, seed=0)
    ref = keys.Key("np", 2, FIXED_SECRET, reference_seed=9)
    assert all(int(k.material.mask.sum()) == 5 for k in wrong_keys.draw(ref, 10, seed=0))
    every_other_ref = wrong_keys.draw(keys.Key("np", 2, OTHER_SECRET, explicit=ref.material), 791, seed=0)
    assert len({k.material.canonical_bytes() for k in every_other_ref}) == 791  # C(12, 5) - 1


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Plain shards, FFX-M4 shards, and a model trained 2 epochs on them."""
    return keyed_run(tmp_path_factory.mktemp("audit"), "ffx", 4, images=40, seed=5, epochs=2)


def test_device_transforms_equal_the_offline_shards(audited):
    key = keys.load(audited / "key.json")
    tplan = compile_plan(key.material, SIZE, SIZE).to_torch("cuda" if torch.cuda.is_available() else "cpu")
    enc = {k: decode_npy(f["img.npy"]) for s in sorted((audited / "enc").glob("test-*.tar")) for k, f in iter_tar_samples(s)}
    plain = {k: decode_npy(f["img.npy"]) for s in sorted((audited / "plain").glob("test-*.tar")) for k, f in iter_tar_samples(s)}
    assert enc.keys() == plain.keys() and len(enc) == 20
    batch = torch.from_numpy(np.stack([plain[k] for k in sorted(plain)])).to(tplan.t["lut"].device)
    on_device = tplan.encrypt(batch).cpu().numpy()
    np.testing.assert_array_equal(on_device, np.stack([enc[k] for k in sorted(enc)]).astype(on_device.dtype))


def test_evaluate_writes_the_audit_and_report(audited, tmp_path):
    out = tmp_path / "audit"
    res = invoke("evaluate", "--checkpoint", audited / "run" / "best.pt", "--key", audited / "key.json",
                 "--test", audited / "plain", "--wrong-keys", 4, "--seed", 7, "--output", out, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    assert audit["key"]["fingerprint_check"] == "match"
    assert audit["test"]["images"] == 20 and audit["wrong_keys"]["count"] == 4
    wrong = [k["miou"] for k in audit["results"]["wrong"]["keys"]]
    assert audit["results"]["wrong"]["summary"]["mean"] == pytest.approx(np.mean(wrong))
    assert audit["results"]["wrong"]["summary"]["max"] == max(wrong)
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| correct key |" in (out / "audit.md").read_text()
    secret = keys.load(audited / "key.json").secret.hex()
    for p in out.iterdir():
        assert secret.encode() not in p.read_bytes()
    again = invoke("evaluate", "--checkpoint", audited / "run" / "best.pt", "--key", audited / "key.json",
                   "--test", audited / "plain", "--wrong-keys", 4, "--seed", 7, "--output", out, "-q")
    assert_user_error(again, "already holds an audit")
    rep = invoke("report", out, "--csv", tmp_path / "t.csv")
    assert rep.exit_code == 0, rep.output
    assert "| FFX | 4 | small | 20 |" in rep.output and "not full-scale" in rep.output
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("method,block_size")
    # 2 workers read alternate shards; the audit (per-image list and figure order included) is the same
    res = invoke("evaluate", "--checkpoint", audited / "run" / "best.pt", "--key", audited / "key.json",
                 "--test", audited / "plain", "--wrong-keys", 4, "--seed", 7, "--output", tmp_path / "w2",
                 "--workers", 2, "--save-predictions", 8, "-q")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "w2" / "audit.json").read_text())
    per_image = again["results"]["correct"]["per_image"]
    assert len({p["id"] for p in per_image}) == len(per_image) == 20
    assert [p["id"] for p in per_image] == [p["id"] for p in audit["results"]["correct"]["per_image"]]
    assert again["predictions"]["ids"] == [p["id"] for p in per_image][:8]
    assert {k: v for k, v in again.items() if k not in ("created_utc", "predictions")} == \
        {k: v for k, v in audit.items() if k != "created_utc"}


def test_evaluate_refuses_mismatches(audited, tmp_path):
    other = tmp_path / "other.json"
    keys.save(keys.Key("ffx", 4, OTHER_SECRET), other)
    args = ["--checkpoint", audited / "run" / "best.pt", "--test", audited / "plain", "--wrong-keys", 2,
            "--workers", 0, "-q"]
    assert_user_error(invoke("evaluate", *args, "--key", other, "--output", tmp_path / "a"), "fingerprint")
    assert not (tmp_path / "a").exists()
    res = invoke("evaluate", *args, "--key", other, "--output", tmp_path / "b", "--ignore-fingerprint")
    assert res.exit_code == 0, res.output
    assert "overridden" in json.loads((tmp_path / "b" / "audit.json").read_text())["key"]["fingerprint_check"]
    assert "overridden" in res.output
    wrong_m = tmp_path / "m8.json"
    keys.save(keys.Key("ffx", 8, OTHER_SECRET), wrong_m)
    assert_user_error(invoke("evaluate", *args, "--key", wrong_m, "--output", tmp_path / "c"), "M=8")
    enc_test = ["--checkpoint", audited / "run" / "best.pt", "--test", audited / "enc", "--key", audited / "key.json"]
    assert_user_error(invoke("evaluate", *enc_test, "--output", tmp_path / "d", "-q"), "must be plain")


def test_audit_with_an_explicit_key_keeps_the_wrong_keys_promises(audited, tmp_path):
    """README flow: a recovered (explicit) copy of the key, `evaluate --ignore-fingerprint`: its
    wrong keys are the original's — same mask size, same FFX table — so every score is the same."""
    original = keys.load(audited / "key.json")
    copy = tmp_path / "explicit.json"
    keys.save(keys.Key("ffx", 4, OTHER_SECRET, explicit=original.material), copy)
    common = ["--checkpoint", audited / "run" / "best.pt", "--test", audited / "plain", "--wrong-keys", 3,
              "--seed", 11, "--near-miss", "2", "--near-miss-keys", 2, "--workers", 0, "-q"]
    assert invoke("evaluate", *common, "--key", audited / "key.json", "--output", tmp_path / "a").exit_code == 0
    res = invoke("evaluate", *common, "--key", copy, "--output", tmp_path / "b", "--ignore-fingerprint")
    assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("a", "b"))
    assert b["key"]["derivation"] == keys.DERIVE_EXPLICIT and "overridden" in b["key"]["fingerprint_check"]
    assert a["wrong_keys"]["rule"] == b["wrong_keys"]["rule"] == \
        "random masks of the key's size (24 of 48 positions), the key's FFX table"
    assert b["results"]["correct"] == a["results"]["correct"]
    assert [k["miou"] for k in b["results"]["wrong"]["keys"]] == [k["miou"] for k in a["results"]["wrong"]["keys"]]
    assert b["results"]["near_miss"][0]["mean"] == a["results"]["near_miss"][0]["mean"]
    assert "the key's FFX table" in (tmp_path / "b" / "audit.md").read_text()


def test_evaluate_near_miss_curve(audited, tmp_path):
    out = tmp_path / "nm"
    base = ["evaluate", "--checkpoint", audited / "run" / "best.pt", "--key", audited / "key.json",
            "--test", audited / "plain", "--wrong-keys", 2, "--workers", 0, "-q"]
    res = invoke(*base, "--near-miss", "1,4", "--near-miss-keys", 2, "--output", out)
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    rows = audit["results"]["near_miss"]
    assert [r["distance"] for r in rows] == [1, 4] and all(len(r["keys"]) == 2 for r in rows)
    assert (out / "near_miss.png").exists() and "## Near-miss keys" in (out / "audit.md").read_text()
    assert_user_error(invoke(*base, "--near-miss", "25", "--output", tmp_path / "x"), "outside 1..24")


def test_baseline_audit_and_side_by_side_report(audited, tmp_path):
    from keyshard.train.loop import TrainConfig, Trainer

    cfg = TrainConfig.from_preset("demo", epochs=1, batch_size=8, micro_batch=8, workers=0)
    Trainer(audited / "plain", tmp_path / "plainrun", cfg, progress=False, log=lambda m: None).fit()
    res = invoke("evaluate", "--checkpoint", tmp_path / "plainrun" / "best.pt", "--test", audited / "plain",
                 "--output", tmp_path / "base", "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "base" / "audit.json").read_text())
    assert base["kind"] == "baseline" and 0 <= base["results"]["plain"]["miou"] <= 1
    keyed = invoke("evaluate", "--checkpoint", audited / "run" / "best.pt", "--key", audited / "key.json",
                   "--test", audited / "plain", "--wrong-keys", 2, "--output", tmp_path / "k", "--workers", 0, "-q")
    assert keyed.exit_code == 0, keyed.output
    rep = invoke("report", tmp_path / "base", tmp_path / "k")
    assert rep.exit_code == 0, rep.output
    row = next(line for line in rep.output.splitlines() if line.startswith("| FFX | 4 | small"))
    assert f"{base['results']['plain']['miou']:.4f}" in row
    assert_user_error(invoke("evaluate", "--checkpoint", audited / "run" / "best.pt", "--test", audited / "plain",
                             "--output", tmp_path / "z", "-q"), "--key")
