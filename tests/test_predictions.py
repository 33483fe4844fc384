"""Figures and per-image scores: `preview` (the paper's Fig. 4) and `evaluate --save-predictions`
(Fig. 5) with per-image mIoU checked against independent computations."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from keyshard import keys
from keyshard.evaluate import audit as audit_mod
from keyshard.evaluate import wrong_keys
from keyshard.evaluate.metrics import PerImage, per_image_miou
from keyshard.evaluate.predictions import Capture
from keyshard.manifest import read as read_manifest
from keyshard.pipeline.samples import prepare
from keyshard.shardformat import decode_mask, decode_npy, iter_tar_samples
from keyshard.transforms import compile_plan, normalize_pixels

from conftest import assert_user_error, invoke, keyed_run

SIZE = 32
PNG = b"\x89PNG\r\n\x1a\n"


def numpy_image_miou(pred, label):
    """The project's mIoU of one image, by a plain loop: classes present in its labelled pixels'
    labels or predictions; None when no pixel is labelled."""
    valid = label != 255
    if not valid.any():
        return None
    ious = []
    for c in range(21):
        inter = ((pred == c) & (label == c) & valid).sum()
        union = (((pred == c) | (label == c)) & valid).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Plain + NP-M4 shards of a 24-image toy VOC at 32² (12 test images), a demo model trained 1 epoch."""
    return keyed_run(tmp_path_factory.mktemp("pred"), "np", 4, images=24, seed=2, epochs=1)


def test_per_image_miou_matches_a_loop_and_torchmetrics():
    import torchmetrics

    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, (5, 16, 16))
    label[rng.random(label.shape) < 0.2] = 255
    label[1][np.isin(label[1], [2, 5, 9])] = 0  # classes absent from one image
    label[3] = 255  # an image with no labelled pixel: skipped and counted
    pred = np.where(rng.random(label.shape) < 0.5, np.where(label == 255, 0, label), rng.integers(0, 21, label.shape))
    got = per_image_miou(torch.from_numpy(pred), torch.from_numpy(label)).numpy()
    for i in range(5):
        expected = numpy_image_miou(pred[i], label[i])
        if expected is None:
            assert np.isnan(got[i])
            continue
        assert got[i] == pytest.approx(expected, abs=1e-12)
        iou = torchmetrics.functional.classification.multiclass_jaccard_index(
            torch.from_numpy(pred[i]), torch.from_numpy(label[i]), num_classes=21, average="none", ignore_index=255)
        keep = label[i] != 255
        present = np.union1d(label[i][keep], pred[i][keep])
        assert float(iou.numpy()[present].mean()) == pytest.approx(expected, abs=1e-6)
    acc = PerImage(keep=True)
    acc.add(torch.from_numpy(got), [f"id{i}" for i in range(5)])
    sc = acc.scores()
    assert sc["images_scored"] == 4 and sc["images_unlabelled"] == 1
    assert [r["id"] for r in sc["per_image"]] == ["id0", "id1", "id2", "id4"]
    assert sc["miou_per_image_mean"] == pytest.approx(np.nanmean(got), abs=1e-12)


# -- preview (Fig. 4) ---------------------------------------------------------------------------

def test_preview_writes_a_grid_whose_tiles_equal_the_transforms(run, tmp_path):
    from keyshard.pipeline.preview import encrypt_tiles, read_voc_sample

    root = run / "voc" / "VOCdevkit" / "VOC2012"
    voc_id = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    out = tmp_path / "figs" / "grid.png"  # a missing directory is created
    res = invoke("preview", "--voc", run / "voc", "--id", voc_id, "--image-size", SIZE, "--key-seed", 5, "-o", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG
    with Image.open(out) as im:
        assert im.width > 6 * SIZE and im.height > 3 * SIZE  # plain + 5 block sizes, 3 methods

    # the same tiles, from the function the command draws, against an independent computation
    image, _, _ = prepare((root / "JPEGImages" / f"{voc_id}.jpg").read_bytes(),
                          (root / "SegmentationClass" / f"{voc_id}.png").read_bytes(), SIZE, "img", "mask")
    read, _ = read_voc_sample(run / "voc", voc_id, SIZE)
    np.testing.assert_array_equal(read, image)
    sizes = (2, 4, 8, 16, 32)
    tiles = encrypt_tiles(read, keys.METHODS, sizes, key_seed=5)
    assert [(t.method, t.block_size) for t in tiles] == [(m, s) for m in keys.METHODS for s in sizes]
    for t in tiles:
        secret = hashlib.sha256(f"keyshard-preview-key/1|5|{t.method}|{t.block_size}".encode()).digest()
        key = keys.Key(t.method, t.block_size, secret)
        assert t.key.fingerprint == key.fingerprint
        expected = compile_plan(key.material, SIZE, SIZE).encrypt(image)
        np.testing.assert_array_equal(t.encrypted, expected)
        if t.method == "ffx":
            shown = np.round(expected / key.material.table.max() * 255).astype(np.uint8)
            assert t.encrypted.dtype == np.uint16 and expected.max() > 255
        else:
            shown = expected
        np.testing.assert_array_equal(t.display, shown)
    # fresh keys when no --key-seed: two calls differ
    a, b = (encrypt_tiles(read, ("shf",), (4,))[0] for _ in range(2))
    assert a.key.fingerprint != b.key.fingerprint

    # refusals: one line, nothing written
    assert_user_error(invoke("preview", "--voc", run / "voc", "--id", "nope", "-o", tmp_path / "x.png"), "nope")
    assert_user_error(invoke("preview", "--voc", run / "voc", "--id", voc_id, "--image-size", SIZE,
                             "--block-sizes", "3", "-o", tmp_path / "y.png"), "--block-sizes")
    both = invoke("preview", "--voc", run / "voc", "--shards", run / "enc", "--id", voc_id, "-o", tmp_path / "z.png")
    assert both.exit_code == 2 and "exactly one" in both.output
    assert_user_error(invoke("preview", "--voc", run / "voc", "--id", voc_id, "--image-size", SIZE, "-o", out),
                      "already exists")
    assert not any((tmp_path / n).exists() for n in ("x.png", "y.png", "z.png"))


def test_preview_of_a_stored_sample_and_its_decryption(run, tmp_path):
    from keyshard.pipeline.preview import read_shard_sample

    doc = read_manifest(run / "enc").raw
    first = doc["shards"][0]
    voc_id, files = next(iter_tar_samples(run / "enc" / first["file"]))
    out = tmp_path / "pair.png"
    res = invoke("preview", "--shards", run / "enc", "--key", run / "key.json", "--id", voc_id, "-o", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG
    key = keys.load(run / "key.json")
    stored, _, _ = read_shard_sample(run / "enc", voc_id, key, run / "key.json")
    np.testing.assert_array_equal(stored, decode_npy(files["img.npy"]))
    plain = {k: decode_npy(f["img.npy"]) for s in read_manifest(run / "plain").raw["shards"]
             for k, f in iter_tar_samples(run / "plain" / s["file"])}
    np.testing.assert_array_equal(compile_plan(key.material, SIZE, SIZE).decrypt(stored), plain[voc_id])
    other = tmp_path / "other.json"
    keys.save(keys.Key("np", 4, bytes(range(40, 72))), other)
    assert_user_error(invoke("preview", "--shards", run / "enc", "--key", other, "--id", voc_id,
                             "-o", tmp_path / "o.png"), "fingerprint")
    assert_user_error(invoke("preview", "--shards", run / "plain", "--key", run / "key.json", "--id", voc_id,
                             "-o", tmp_path / "p.png"), "plain")
    missing_key = invoke("preview", "--shards", run / "enc", "--id", voc_id, "-o", tmp_path / "q.png")
    assert missing_key.exit_code == 2 and "--key" in missing_key.output


# -- evaluate --save-predictions (Fig. 5) and per-image scores ---------------------------------

def independent_per_image(ckpt, plain_dir, plans):
    """(ids, {name: [per-image mIoU]}) for the test split: the model's predictions on each
    (torch plan or None, divisor) input, scored image by image with the numpy loop."""
    from keyshard.train.checkpoint import load_model

    model, _ = load_model(ckpt, "cpu")
    doc = read_manifest(plain_dir).raw
    ids, pixels, masks = [], [], []
    for s in doc["shards"]:
        if s["split"] == "test":
            for k, f in iter_tar_samples(plain_dir / s["file"]):
                ids.append(k)
                pixels.append(decode_npy(f["img.npy"]))
                masks.append(decode_mask(f["mask.png"]))
    batch, labels = torch.from_numpy(np.stack(pixels)), np.stack(masks)
    out = {}
    with torch.no_grad():
        for name, (tplan, divisor) in plans.items():
            x = tplan.encrypt(batch) if tplan is not None else batch
            pred = model(normalize_pixels(x, divisor))["out"].argmax(1).numpy()
            out[name] = [numpy_image_miou(pred[i], labels[i]) for i in range(len(ids))]
    return ids, out


def test_save_predictions_grid_and_per_image_scores_agree_with_an_independent_computation(run, tmp_path):
    out = tmp_path / "audit"
    res = invoke("evaluate", "--checkpoint", run / "run" / "best.pt", "--key", run / "key.json", "--test",
                 run / "plain", "--wrong-keys", 3, "--seed", 4, "--output", out, "--workers", 0, "-q",
                 "--save-predictions", 4)
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    key = keys.load(run / "key.json")
    wrong = wrong_keys.draw(key, 3, seed=4)
    plan = lambda k: (compile_plan(k.material, SIZE, SIZE).to_torch("cpu"), k.material.divisor)  # noqa: E731
    ids, ref = independent_per_image(run / "run" / "best.pt", run / "plain", {"correct": plan(key), "plain": (None, 255),
                                           **{f"wrong{i}": plan(w) for i, w in enumerate(wrong)}})
    r = audit["results"]
    for name in ("correct", "plain"):
        rows = r[name]["per_image"]
        assert [x["id"] for x in rows] == ids and r[name]["images_scored"] == 12, name
        assert r[name]["images_unlabelled"] == 0
        np.testing.assert_allclose([x["miou"] for x in rows], ref[name], atol=1e-12, err_msg=name)
        assert r[name]["miou_per_image_mean"] == pytest.approx(np.mean(ref[name]), abs=1e-12)
    for i, row in enumerate(r["wrong"]["keys"]):
        assert row["fingerprint"] == wrong[i].fingerprint
        assert row["miou_per_image_mean"] == pytest.approx(np.mean(ref[f"wrong{i}"]), abs=1e-12)
    assert r["wrong"]["summary"]["miou_per_image_mean"] == pytest.approx(
        np.mean([np.mean(ref[f"wrong{i}"]) for i in range(3)]), abs=1e-12)
    assert set(r["wrong"]["summary"]) == {"mean", "std", "min", "max", "miou_per_image_mean"}
    assert "does not state" in audit["metrics"]["paper"]
    md = (out / "audit.md").read_text()
    assert "mean per image" in md and "does not state" in md
    assert audit["predictions"] == {"file": "predictions.png", "images": 4, "ids": ids[:4],
                                    "wrong_key_fingerprint": wrong[0].fingerprint}
    assert (out / "predictions.png").read_bytes()[:8] == PNG
    with Image.open(out / "predictions.png") as im:
        assert im.height > 4 * SIZE and im.width > 6 * SIZE  # 4 rows of 6 panels

    # the report shows both readings and says which one it compares with the paper
    rep = invoke("report", out)
    assert rep.exit_code == 0, rep.output
    assert f"({round(r['correct']['miou_per_image_mean'], 4):.4f})" in rep.output
    assert "does not state" in rep.output


def test_capture_is_the_same_however_the_keys_are_chunked(run):
    """The wrong key's panel comes from whichever pass scores it; per-image scores do not
    depend on the chunking either."""
    common = dict(ckpt_path=str(run / "run" / "best.pt"), key_path=str(run / "key.json"),
                  test_dir=str(run / "plain"), n_wrong=3, seed=4, batch_size=5, workers=0, progress=False,
                  near_miss=(1,), near_miss_count=2)
    one, chunked = Capture(7), Capture(7)
    whole = audit_mod.run_audit(**common, capture=one)
    # 2 keys per pass: correct + plain + 1 near-miss key, then [near-miss, first wrong], [wrong, wrong]
    parts = audit_mod.run_audit(**common, capture=chunked, keys_per_pass=2)
    assert parts["scoring"]["passes"] == 3 and whole["scoring"]["passes"] == 1
    assert whole["results"]["correct"] == parts["results"]["correct"]
    assert whole["results"]["wrong"] == parts["results"]["wrong"]
    assert whole["results"]["near_miss"] == parts["results"]["near_miss"]
    assert one.ids == chunked.ids and len(one.ids) == 7  # batches of 5: across a batch boundary
    assert one.wrong_fingerprint == chunked.wrong_fingerprint == whole["results"]["wrong"]["keys"][0]["fingerprint"]
    for name in ("correct", "plain", "wrong"):
        for part in ("input", "pred"):
            np.testing.assert_array_equal(np.stack(one.panels[name][part]), np.stack(chunked.panels[name][part]))
        assert one.panels[name]["miou"] == chunked.panels[name]["miou"]
    per = {x["id"]: x["miou"] for x in whole["results"]["correct"]["per_image"]}
    assert one.panels["correct"]["miou"] == [per[i] for i in one.ids]
    key = keys.load(run / "key.json")
    expected_input = compile_plan(key.material, SIZE, SIZE).encrypt(np.stack(one.images))
    np.testing.assert_array_equal(np.stack(one.panels["correct"]["input"]), expected_input)


def test_baseline_audit_has_per_image_scores_and_predictions(run, tmp_path):
    from keyshard.train.loop import TrainConfig, Trainer

    cfg = TrainConfig.from_preset("demo", epochs=1, batch_size=8, micro_batch=8, workers=0)
    Trainer(run / "plain", tmp_path / "plainrun", cfg, progress=False, log=lambda m: None).fit()
    res = invoke("evaluate", "--checkpoint", tmp_path / "plainrun" / "best.pt", "--test", run / "plain",
                 "--output", tmp_path / "base", "--workers", 0, "-q", "--save-predictions", 2)
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "base" / "audit.json").read_text())
    plain = base["results"]["plain"]
    ids, ref = independent_per_image(tmp_path / "plainrun" / "best.pt", run / "plain", {"plain": (None, 255)})
    assert [x["id"] for x in plain["per_image"]] == ids
    np.testing.assert_allclose([x["miou"] for x in plain["per_image"]], ref["plain"], atol=1e-12)
    assert plain["miou_per_image_mean"] == pytest.approx(np.mean(ref["plain"]), abs=1e-12)
    assert base["predictions"]["images"] == 2 and "wrong_key_fingerprint" not in base["predictions"]
    assert (tmp_path / "base" / "predictions.png").read_bytes()[:8] == PNG
    assert "mean per image" in (tmp_path / "base" / "audit.md").read_text()


def test_colorize_draws_the_datasets_ignore_index_as_void():
    """A dataset whose unlabelled value is not 255 (here 10, with 5 classes): those pixels get
    VOC's void colour in the figures, not the palette's colour for id 10; class ids keep theirs."""
    from keyshard.figures import colorize
    from keyshard.shardformat import VOID, voc_palette

    lut = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    mask = np.array([[10, 1, 2], [VOID, 10, 4]], np.uint8)
    assert np.array_equal(colorize(mask), lut[mask])  # VOC: 255 is the palette's own void colour
    got = colorize(mask, ignore_index=10)
    assert np.array_equal(got[mask == 10], np.tile(lut[VOID], (2, 1)))
    assert np.array_equal(got[mask != 10], lut[mask[mask != 10]])
    assert not np.array_equal(lut[10], lut[VOID])
