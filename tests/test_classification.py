"""Classification (issue 14.2): ImageFolder toy set → encrypt --image-folder → train → evaluate,
and ``protect`` for the patch-embedding model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from keyshard import keys
from keyshard.shardformat import dataset_info, iter_tar_samples
from keyshard.transforms import compile_plan, normalize_pixels

from conftest import assert_user_error, fixed_secret, invoke


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    res = invoke("toy-classes", root / "toy", "--classes", 3, "--images", 90, "--seed", 3)
    assert res.exit_code == 0, res.output
    key = root / "key.json"
    keys.save(keys.Key("shf", 4, fixed_secret(5)), key)
    for name, how in (("enc", ("--key", key)), ("plain", ("--plain",))):
        res = invoke("encrypt", "--image-folder", root / "toy", *how, "-o", root / name, "--size", 32,
                     "--shard-size", 32, "-j", 1, "-q")
        assert res.exit_code == 0, res.output
    return root


def test_image_folder_shards_hold_class_indices(cls_data):
    doc = json.loads((cls_data / "enc" / "manifest.json").read_text())
    info = dataset_info(doc)
    assert info["task"] == "classification" and info["num_classes"] == 3
    assert info["class_names"] == ["class_000", "class_001", "class_002"] and info["ignore_index"] is None
    assert sum(doc["splits"]["counts"].values()) == 90 and doc["splits"]["counts"]["test"] == 18  # 20 % per class
    shard = next(s for s in doc["shards"] if s["split"] == "train")
    key, files = next(iter_tar_samples(cls_data / "enc" / shard["file"]))
    assert set(files) == {"img.npy", "cls", "json"}
    meta = json.loads(files["json"])
    assert int(files["cls"]) == meta["class"] == int(meta["id"].split("/")[0][-3:])


def test_splits_from_lists(cls_data, tmp_path):
    ids = sorted(p.relative_to(cls_data / "toy").as_posix() for p in (cls_data / "toy").rglob("*.png"))
    (tmp_path / "train.txt").write_text("\n".join(ids[:60]))
    (tmp_path / "val.txt").write_text("\n".join(ids[60:]))
    res = invoke("encrypt", "--image-folder", cls_data / "toy", "--plain", "-o", tmp_path / "out", "--size", 32,
                 "--splits-from", f"train={tmp_path / 'train.txt'},val={tmp_path / 'val.txt'}", "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["counts"]
    assert counts["test"] == 30 and counts["train"] + counts["holdout"] == 60


def test_task_mismatch_is_refused(cls_data, tmp_path):
    res = invoke("train", "--shards", cls_data / "enc", "--out", tmp_path / "r", "--task", "segmentation",
                 "--workers", 0, "-q")
    assert_user_error(res, "--task segmentation", "classification")


def test_encrypt_train_evaluate_top1(cls_data, tmp_path):
    run = tmp_path / "run"
    res = invoke("train", "--shards", cls_data / "enc", "--out", run, "--epochs", 4, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", "--checkpoint", run / "best.pt", "--key", cls_data / "key.json",
                 "--test", cls_data / "plain", "--wrong-keys", 20, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((run / "audit" / "audit.json").read_text())
    r = audit["results"]
    assert audit["task"] == "classification" and len(r["wrong"]["keys"]) == 20
    assert r["wrong"]["summary"]["mean"] == pytest.approx(np.mean([k["top1_acc"] for k in r["wrong"]["keys"]]))
    assert r["correct"]["top1_acc"] >= 0.8
    assert r["correct"]["top1_acc"] > r["plain"]["top1_acc"] + 0.2
    assert r["correct"]["top1_acc"] > r["wrong"]["summary"]["mean"] + 0.2
    assert (run / "audit" / "audit.png").exists() and "top-1" in (run / "audit" / "audit.md").read_text()


@pytest.mark.parametrize("method,m", [("shf", 4), ("np", 4), ("shf", 2), ("np", 8)])
def test_protect_patch_embedding_is_exact(method, m):
    from keyshard.train.classifiers import PatchViT
    from keyshard.train.protect import protect_model

    torch.manual_seed(m)
    plain = PatchViT(m, 5, 32).eval()
    protected = PatchViT(m, 5, 32).eval()
    protected.load_state_dict(plain.state_dict())
    key = keys.Key(method, m, fixed_secret(m))
    protect_model(protected, key.material)
    x = np.random.default_rng(m).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    enc = compile_plan(key.material, 32, 32).encrypt(x)
    with torch.no_grad():
        want = plain(normalize_pixels(torch.from_numpy(x), 255))["out"]
        got = protected(normalize_pixels(torch.from_numpy(enc), 255))["out"]
        other = plain(normalize_pixels(torch.from_numpy(enc), 255))["out"]
    err = (got - want).abs().max().item()
    assert err <= 1e-4
    assert (other - want).abs().max().item() > 10 * max(err, 1e-5)


def test_protect_command_on_patch_vit(cls_data, tmp_path):
    from keyshard.train import checkpoint

    run = tmp_path / "plain"
    res = invoke("train", "--shards", cls_data / "plain", "--out", run, "--block-size", 4, "--epochs", 1,
                 "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    out = tmp_path / "protected.pt"
    res = invoke("protect", "--checkpoint", run / "best.pt", "--key", cls_data / "key.json", "-o", out)
    assert res.exit_code == 0, res.output
    state = checkpoint.load(out)
    assert state["model_name"] == "patch_vit" and state["data"]["method"] == "shf"
    plain_model, _ = checkpoint.load_model(run / "best.pt", "cpu")
    model, _ = checkpoint.load_model(out, "cpu")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    enc = compile_plan(keys.load(cls_data / "key.json").material, 32, 32).encrypt(x)
    with torch.no_grad():
        want = plain_model(normalize_pixels(torch.from_numpy(x), 255))["out"]
        got = model(normalize_pixels(torch.from_numpy(enc), 255))["out"]
    assert (got - want).abs().max().item() <= 1e-4
