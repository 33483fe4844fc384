"""Datasets beyond VOC (issue 14.1): --image-dir/--mask-dir folders with K classes, label maps,
splits, toy-voc --classes, and manifests without a dataset entry reading as VOC."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keyshard.manifest import read as read_manifest
from keyshard.shardformat import VOC_CLASS_NAMES, dataset_info, decode_mask, iter_tar_samples

from conftest import assert_user_error, invoke


def _toy5(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy5") / "t"
    res = invoke("toy-voc", out, "--images", 12, "--classes", 5, "--min-side", 32, "--max-side", 40)
    assert res.exit_code == 0, res.output
    return out / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="module")
def toy5(tmp_path_factory):
    return _toy5(tmp_path_factory)


def _folders(root: Path):
    s = root / "ImageSets" / "Segmentation"
    return ["--image-dir", root / "JPEGImages", "--mask-dir", root / "SegmentationClass",
            "--splits-from", f"train={s / 'train.txt'},val={s / 'val.txt'}"]


def _masks(shards: Path) -> dict:
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        for key, files in iter_tar_samples(tar):
            out[key] = decode_mask(files["mask.png"])
    return out


def test_toy_voc_classes_5(toy5):
    values = set()
    for p in (toy5 / "SegmentationClass").glob("*.png"):
        values |= set(np.unique(np.asarray(Image.open(p))).tolist())
    assert values <= {0, 1, 2, 3, 4, 255} and len(values - {0, 255}) >= 2


def test_folder_k5_encrypt_train_evaluate(toy5, tmp_path):
    out = tmp_path / "plain"
    res = invoke("encrypt", *_folders(toy5), "--num-classes", 5, "--plain", "--image-size", 32, "-o", out, "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    doc = read_manifest(out).raw
    info = dataset_info(doc)
    assert (info["kind"], info["num_classes"], info["ignore_index"]) == ("folders", 5, 255)
    assert len(info["class_names"]) == 5 and doc["source"]["kind"] == "folders"
    assert doc["splits"]["counts"] == {"train": 5, "holdout": 1, "test": 6}
    assert all(set(np.unique(m).tolist()) <= {0, 1, 2, 3, 4, 255} for m in _masks(out).values())
    res = invoke("train", "--shards", out, "--output", tmp_path / "run", "--epochs", 1, "--batch-size", 4,
                 "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", "--checkpoint", tmp_path / "run" / "best.pt", "--test", out, "--output", tmp_path / "ev",
                 "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((tmp_path / "ev" / "audit.json").read_text())
    assert len(audit["results"]["plain"]["per_class_iou"]) == 5
    assert audit["checkpoint"]["data"]["dataset"]["num_classes"] == 5


def test_label_outside_k_is_refused_naming_the_file(toy5, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(toy5, root)
    bad = sorted((root / "SegmentationClass").glob("*.png"))[0]
    arr = np.asarray(Image.open(bad)).copy()
    arr[0, 0] = 7
    Image.fromarray(arr, "L").save(bad)
    res = invoke("encrypt", *_folders(root), "--num-classes", 5, "--plain", "--image-size", 32, "-o", tmp_path / "o",
                 "-j", 1, "-q")
    assert_user_error(res, bad.name, "[7]")
    assert not (tmp_path / "o" / "manifest.json").exists()


def _tiny(tmp_path: Path, values: list[int]) -> tuple[Path, Path]:
    img, msk = tmp_path / "img", tmp_path / "msk"
    img.mkdir()
    msk.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(img / f"s{i}.png")
        m = np.array(values * (64 // len(values)), np.uint8).reshape(8, 8)
        Image.fromarray(m, "L").save(msk / f"s{i}.png")
    return img, msk


def test_label_map_and_reduce_zero_label(tmp_path):
    img, msk = _tiny(tmp_path, [0, 7, 8, 26, 255, 3, 0, 7])
    lm = tmp_path / "map.json"
    lm.write_text(json.dumps({"0": 255, "7": 0, "8": 1, "26": 2, "3": 255}))
    out = tmp_path / "a"
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 3, "--label-map", lm,
                 "--val-fraction", 0.25, "--plain", "--image-size", 8, "-o", out, "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    for m in _masks(out).values():
        assert m.reshape(-1)[:8].tolist() == [255, 0, 1, 2, 255, 255, 255, 0]
    assert "label_map_sha256" in read_manifest(out).raw["source"]

    (tmp_path / "z").mkdir()
    img2, msk2 = _tiny(tmp_path / "z", [0, 1, 2, 3, 255, 4, 0, 1])
    out = tmp_path / "b"
    res = invoke("encrypt", "--image-dir", img2, "--mask-dir", msk2, "--num-classes", 4, "--reduce-zero-label",
                 "--val-fraction", 0.25, "--plain", "--image-size", 8, "-o", out, "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    for m in _masks(out).values():
        assert m.reshape(-1)[:8].tolist() == [255, 0, 1, 2, 255, 3, 255, 0]
    assert read_manifest(out).raw["source"]["reduce_zero_label"] is True


def test_missing_and_extra_partners_one_line(tmp_path):
    img, msk = _tiny(tmp_path, [0, 1])
    (msk / "s3.png").unlink()
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 2, "--val-fraction", 0.3,
                 "--plain", "-o", tmp_path / "o", "-q")
    assert_user_error(res, "s3.png", "no mask")
    (img / "s3.png").unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(msk / "extra.png")
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 2, "--val-fraction", 0.3,
                 "--plain", "-o", tmp_path / "o", "-q")
    assert_user_error(res, "extra.png", "no image")


def test_splits_from_and_val_fraction(tmp_path):
    img, msk = _tiny(tmp_path, [0, 1])
    (tmp_path / "tr.txt").write_text("s0\ns1\ns2\n")
    (tmp_path / "va.txt").write_text("s3\n")
    out = tmp_path / "a"
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 2, "--splits-from",
                 f"train={tmp_path / 'tr.txt'},val={tmp_path / 'va.txt'}", "--plain", "--image-size", 8, "-o", out, "-q",
                 "-j", 1)
    assert res.exit_code == 0, res.output
    doc = read_manifest(out).raw
    assert doc["splits"]["counts"] == {"train": 2, "holdout": 1, "test": 1}
    assert {k for k in _masks(out)} == {"s0", "s1", "s2", "s3"}
    test_keys = {k for t in out.glob("test-*.tar") for k, _ in iter_tar_samples(t)}
    assert test_keys == {"s3"}
    (tmp_path / "va.txt").write_text("s9\n")
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 2, "--splits-from",
                 f"train={tmp_path / 'tr.txt'},val={tmp_path / 'va.txt'}", "--plain", "-o", tmp_path / "b", "-q")
    assert_user_error(res, "va.txt", "s9")
    out = tmp_path / "c"
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 2, "--val-fraction", 0.25,
                 "--plain", "--image-size", 8, "-o", out, "-q", "-j", 1)
    assert res.exit_code == 0, res.output
    assert read_manifest(out).raw["splits"]["counts"] == {"train": 2, "holdout": 1, "test": 1}
    res = invoke("encrypt", "--image-dir", img, "--mask-dir", msk, "--num-classes", 2, "--plain", "-o",
                 tmp_path / "d", "-q")
    assert_user_error(res, "--splits-from", "--val-fraction")


def test_manifest_without_dataset_reads_as_voc():
    doc = json.loads((Path(__file__).parent.parent / "manifests" / "example-manifest.json").read_text())
    doc.pop("dataset")
    info = dataset_info(doc)
    assert (info["kind"], info["num_classes"], info["ignore_index"]) == ("voc", 21, 255)
    assert info["class_names"] == list(VOC_CLASS_NAMES)


def test_help_shows_counts_and_directories():
    enc = invoke("encrypt", "--help").output
    toy = invoke("toy-voc", "--help").output
    assert "--image-dir DIR" in enc and "--mask-dir DIR" in enc and "--num-classes K" in enc
    assert "--images N" in toy and "--classes K" in toy
