"""keyshard predict and keyshard.load_predictor (issue 23, part 1).

A small model trained one epoch on FFX-keyed 32×32 toy shards predicts on photographs of mixed
sizes (label maps at each original size, overlays, the jsonl lines), on plain test shards (label
maps equal to the argmax computed here from the checkpoint, ``encrypt_image`` and the model,
independently of the predictor), and through the Python API (the same maps as the command).  A
classifier gives the jsonl and CSV.  Fingerprint mismatch, a missing key, duplicate stems, an
unreadable image and a non-empty output each stop the command with one line; --skip-bad and
--resume carry on.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import keyshard
from keyshard import keys
from keyshard.evaluate.predict import upsampled_argmax
from keyshard.transforms import encrypt_image, normalize_pixels

from conftest import assert_user_error, fixed_secret, invoke, keyed_run

SIZES = [(41, 53), (64, 64), (37, 100), (23, 17), (200, 300)]  # (height, width) of the photographs


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """An FFX M=4 model trained one epoch on keyed 32×32 shards of 24 toy images (plain shards too)."""
    return keyed_run(tmp_path_factory.mktemp("predict-seg"), "ffx", 4, images=24, seed=3, epochs=1)


def photographs(folder, suffix: str = ".jpg") -> list:
    """Five smooth pictures of SIZES written as ``suffix`` files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1)
        pixels = np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"photo{i}{suffix}")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def label_map(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.array(im)


def test_photographs_get_label_maps_at_their_original_size(seg, tmp_path):
    files = photographs(tmp_path / "in")
    out = tmp_path / "out"
    res = invoke("predict", "--checkpoint", seg / "run" / "best.pt", "--key", seg / "key.json", *files,
                 "-o", out, "--overlay", "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    records = {r["id"]: r for r in lines(out / "predictions.jsonl")}
    assert sorted(records) == [f"photo{i}" for i in range(len(SIZES))]
    for i, (h, w) in enumerate(SIZES):
        labels = label_map(out / f"photo{i}.png")
        assert labels.shape == (h, w)
        with Image.open(out / f"photo{i}.overlay.png") as overlay:
            assert overlay.size == (w, h) and overlay.mode == "RGB"
        record = records[f"photo{i}"]
        assert (record["width"], record["height"]) == (w, h)
        assert sum(record["pixels_per_class"].values()) == h * w
        names = keyshard.read_manifest(seg / "enc").dataset.class_names
        counts = np.bincount(labels.ravel(), minlength=len(names))
        assert record["pixels_per_class"] == {names[c]: int(n) for c, n in enumerate(counts) if n}
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_the_api_gives_the_commands_label_maps(seg, tmp_path):
    """PNG photographs: the command decodes them as PIL does, so arrays through the API meet the
    very same pixels; the label maps must be equal."""
    files = photographs(tmp_path / "in", ".png")
    res = invoke("predict", "--checkpoint", seg / "run" / "best.pt", "--key", seg / "key.json",
                 "--input-dir", tmp_path / "in", "-o", tmp_path / "out", "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    predictor = keyshard.load_predictor(seg / "run" / "best.pt", seg / "key.json", device="cpu")
    arrays = [np.array(Image.open(f).convert("RGB")) for f in files]
    maps = predictor.predict(arrays)
    assert len(maps) == len(files)
    for i, labels in enumerate(maps):
        assert labels.dtype == np.uint8 and labels.shape == SIZES[i]
        assert np.array_equal(labels, label_map(tmp_path / "out" / f"photo{i}.png"))
    assert np.array_equal(predictor.predict(arrays[1]), maps[1])  # one array in, one map out
    assert predictor.keyed and predictor.fingerprint_check == "match" and predictor.image_size == 32


def shard_images(shards, split: str = "test"):
    """(ids, N×H×W×3 pixels) of every sample of a split, read with tarfile, in shard and member order."""
    ids, pixels = [], []
    for path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".img.npy"):
                    ids.append(m.name.split(".")[0])
                    pixels.append(np.load(io.BytesIO(tar.extractfile(m).read())))
    return ids, np.stack(pixels)


def test_plain_shards_give_the_argmax_of_checkpoint_key_and_model(seg, tmp_path):
    from keyshard.train.checkpoint import load_model

    out = tmp_path / "out"
    res = invoke("predict", "--checkpoint", seg / "run" / "best.pt", "--key", seg / "key.json",
                 "--shards", seg / "plain", "-o", out, "--batch-size", 64, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    ids, plain = shard_images(seg / "plain")
    key = keys.load(seg / "key.json")
    model, _ = load_model(seg / "run" / "best.pt", torch.device("cpu"))
    keyed = encrypt_image(plain, key)  # numpy, not the predictor's torch plan
    with torch.no_grad():
        expected = model(normalize_pixels(torch.from_numpy(keyed.astype(np.int32)), key.material.divisor))["out"]
    expected = expected.argmax(1).numpy().astype(np.uint8)
    assert [r["id"] for r in lines(out / "predictions.jsonl")] == ids
    for i, image_id in enumerate(ids):
        assert np.array_equal(label_map(out / f"{image_id}.png"), expected[i]), image_id


def test_plain_shows_what_a_user_without_the_key_gets(seg, tmp_path):
    res = invoke("predict", "--checkpoint", seg / "run" / "best.pt", "--plain", "--shards", seg / "plain",
                 "-o", tmp_path / "out", "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    assert "--plain: no key was applied" in res.output
    assert len(lines(tmp_path / "out" / "predictions.jsonl")) == len(shard_images(seg / "plain")[0])


def test_key_checks_are_one_line(seg, tmp_path):
    ckpt, files = seg / "run" / "best.pt", photographs(tmp_path / "in")
    other = tmp_path / "other.json"
    keys.save(keys.Key("ffx", 4, fixed_secret(9)), other)
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", other, *files, "-o", tmp_path / "a", "-q"),
                      str(other), "fingerprint does not match", "--ignore-fingerprint")
    res = invoke("predict", "--checkpoint", ckpt, "--key", other, "--ignore-fingerprint", files[0],
                 "-o", tmp_path / "b", "--workers", 0, "-q")
    assert res.exit_code == 0 and "fingerprint check: overridden" in res.output, res.output
    assert_user_error(invoke("predict", "--checkpoint", ckpt, *files, "-o", tmp_path / "c", "-q"),
                      "was trained on keyed images", "--key", "--plain")
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", seg / "key.json", "--plain", *files,
                             "-o", tmp_path / "d", "-q"), "at most one of --key or --plain")
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", seg / "key.json", "--shards", seg / "enc",
                             "-o", tmp_path / "e", "-q"), "must be plain")
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", seg / "key.json", "-o", tmp_path / "f"),
                      "FILES, --input-dir or --shards")
    assert not any((tmp_path / name).exists() for name in "acdef")  # refused before anything was written


def test_input_errors_are_one_line(seg, tmp_path):
    ckpt, key = seg / "run" / "best.pt", seg / "key.json"
    files = photographs(tmp_path / "in")
    twin = tmp_path / "twin" / "photo0.png"
    twin.parent.mkdir()
    Image.open(files[0]).save(twin)
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", key, files[0], twin, "-o", tmp_path / "a"),
                      str(files[0]), str(twin), "photo0.png")
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", key, "--input-dir", tmp_path / "in",
                             "-o", tmp_path / "b", "--workers", 0, "-q"), str(bad), "cannot decode")
    assert not (tmp_path / "b" / "broken.png").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", key, *files, "-o", tmp_path / "full"),
                      str(tmp_path / "full"), "not empty", "--resume")
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", key, "--input-dir", tmp_path / "twin",
                             "--max-pixels", 100, "-o", tmp_path / "c", "--workers", 0, "-q"),
                      str(twin), "over the limit")


def test_skip_bad_lists_unreadable_images(seg, tmp_path):
    files = photographs(tmp_path / "in")
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    out = tmp_path / "out"
    res = invoke("predict", "--checkpoint", seg / "run" / "best.pt", "--key", seg / "key.json", "--input-dir",
                 tmp_path / "in", "-o", out, "--skip-bad", "--workers", 2, "-q")
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable image(s)" in res.output
    (failed,) = lines(out / "failed.jsonl")
    assert failed["id"] == "broken" and failed["file"] == str(bad) and "cannot decode" in failed["error"]
    assert sorted(r["id"] for r in lines(out / "predictions.jsonl")) == sorted(f.stem for f in files)


def test_resume_skips_what_is_done(seg, tmp_path):
    files = photographs(tmp_path / "in")
    out, args = tmp_path / "out", ("--checkpoint", seg / "run" / "best.pt", "--key", seg / "key.json")
    assert invoke("predict", *args, *files[:2], "-o", out, "--workers", 0, "-q").exit_code == 0
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "photo2", "wid')  # a line cut short by an interruption: photo2 is not done
    before = (out / "photo0.png").stat().st_mtime_ns
    res = invoke("predict", *args, *files, "-o", out, "--resume", "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    assert "predicted 3 image(s)" in res.output and "2 done by an earlier run" in res.output
    assert [r["id"] for r in lines(out / "predictions.jsonl")] == [f"photo{i}" for i in range(5)]
    assert (out / "photo0.png").stat().st_mtime_ns == before




def test_classification_writes_jsonl_and_csv(classifier, tmp_path):
    ckpt, key, out = classifier / "run" / "best.pt", classifier / "key.json", tmp_path / "out"
    files = sorted((classifier / "toy").rglob("*.png"))[:7]
    res = invoke("predict", "--checkpoint", ckpt, "--key", key, *files, "-o", out, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    names = keyshard.read_manifest(classifier / "enc").dataset.class_names
    records = lines(out / "predictions.jsonl")
    assert [r["id"] for r in records] == [f.stem for f in files]
    probabilities = keyshard.load_predictor(ckpt, key, device="cpu").predict(
        [np.array(Image.open(f).convert("RGB")) for f in files])
    assert probabilities.shape == (len(files), 3)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    for record, p in zip(records, probabilities):
        assert set(record) == {"id", "class", "class_name", "probability", "top5"}
        top = record["top5"]
        assert len(top) == 3  # fewer than 5 classes
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert sum(v for _, v in top) <= 1 + 1e-5
        assert record["class"] == top[0][0] == int(np.argmax(p)) and record["probability"] == top[0][1]
        assert record["class_name"] == names[record["class"]]
        assert abs(record["probability"] - float(p.max())) < 1e-5
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "class", "class_name", "probability"]
    assert rows[1:] == [[r["id"], str(r["class"]), r["class_name"], str(r["probability"])] for r in records]
    assert_user_error(invoke("predict", "--checkpoint", ckpt, "--key", key, files[0], "-o", tmp_path / "o2",
                             "--overlay", "--workers", 0, "-q"), "--overlay", "not for classification")


def test_upsampled_argmax_in_groups_equals_one_pass():
    logits = torch.randn(21, 8, 8)
    whole = torch.nn.functional.interpolate(logits[None], size=(37, 50), mode="bilinear", align_corners=False)
    assert torch.equal(upsampled_argmax(logits, (37, 50), budget=4 * 37 * 50 * 4), whole[0].argmax(0))


def test_load_predictor_is_a_lazy_export():
    code = ("import sys, keyshard; assert 'torch' not in sys.modules; "
            "assert 'load_predictor' in dir(keyshard) and callable(keyshard.load_predictor)")
    subprocess.run([sys.executable, "-c", code], check=True)
