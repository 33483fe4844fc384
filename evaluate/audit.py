"""The key audit: a checkpoint on plain test shards, encrypted on the device with the correct
key, no key, and N random wrong keys — each test batch is read and decoded once per pass, then
every key of the pass is applied to it on the GPU (or CPU) with the same compiled plans as the
offline encryption.

Keys are scored a chunk at a time: a pass over the test split compiles the plans of at most
``keys_per_pass`` keys (as many as fit in ``PLAN_BUDGET_BYTES``, at most ``MAX_KEYS_PER_PASS``),
scores them, and drops them before the next chunk's keys are even drawn.  Memory therefore stays
flat whatever ``--wrong-keys`` is (an SHF M=8 plan at 256² is ~3 MB: 100,000 of them at once
were 300 GB), and the first batch is scored right away.  Every key's confusion matrix is a
function of the model, its plan and the (fixed-order) batches only, so the scores are identical
however the keys are chunked (tested).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch

from keyshard import __version__, keys
from keyshard.errors import KeyshardError
from keyshard.fsutil import sha256_file
from keyshard.evaluate import wrong_keys
from keyshard.evaluate.metrics import Confusion, PerImage
from keyshard.evaluate.near_miss import MAX_KEYS_PER_DISTANCE, near_miss_keys
from keyshard.pipeline.manifest import library_versions
from keyshard.pipeline.manifest import load_trusted
from keyshard.shardformat import dataset_info
from keyshard.train.checkpoint import load_model
from keyshard.train.data import epoch_plan, open_shards
from keyshard.train.device import pick_device
from keyshard.transforms import compile_plan, normalize_pixels


def check_inputs(state: dict, key: keys.Key, test_manifest: dict, ckpt_path, key_path, test_dir,
                 ignore_fingerprint: bool) -> str:
    """Refuse mismatches with one line; return the fingerprint-check status for the report."""
    data = state["data"]
    if not test_manifest["encryption"]["plain"]:
        raise KeyshardError(f"{test_dir}: test shards must be plain (keyshard encrypt --plain); "
                            "the audit encrypts them itself with every key")
    if "test" not in test_manifest["splits"]["counts"]:
        raise KeyshardError(f"{test_dir}: holds no test split")
    if data["plain"]:
        raise KeyshardError(f"{ckpt_path}: was trained on plain images; there is no key to audit")
    if (key.method, key.block_size) != (data["method"], data["block_size"]):
        raise KeyshardError(f"{key_path}: is {key.method} M={key.block_size} but {ckpt_path} was trained "
                            f"with {data['method']} M={data['block_size']}")
    check_dataset(state, test_manifest, ckpt_path, test_dir)
    if test_manifest["image"]["height"] != data["image_size"]:
        raise KeyshardError(f"{test_dir}: images are {test_manifest['image']['height']}px but the model was "
                            f"trained on {data['image_size']}px")
    if key.fingerprint == data["key_fingerprint"]:
        return "match"
    if not ignore_fingerprint:
        raise KeyshardError(f"{key_path}: fingerprint does not match {ckpt_path} (the model was trained with "
                            "another key; --ignore-fingerprint overrides)")
    return "overridden (--ignore-fingerprint)"


def check_dataset(state: dict, test_manifest: dict, ckpt_path, test_dir) -> None:
    """The test shards label the classes the model predicts (same class count and ignore index)."""
    from keyshard.train.checkpoint import dataset_of

    trained, test = dataset_of(state), dataset_info(test_manifest)
    for field in ("num_classes", "ignore_index"):
        if trained[field] != test[field]:
            raise KeyshardError(f"{test_dir}: its dataset has {field} {test[field]} but {ckpt_path} was trained "
                                f"with {trained[field]} ({trained['kind']})")


def test_batches(source, manifest: dict, batch_size: int = 32, workers: int = 0, split: str = "test"):
    """One pass over a split in manifest order (no shuffling, one rank), streamed and verified."""
    return open_shards(source, split, batch_size=batch_size, workers=workers, shuffle=False, rank=0, world=1,
                       manifest=manifest)


def score_on_split(model, configs: list, source, manifest: dict, device, batch_size: int = 32, workers: int = 0,
                   progress: bool = True, desc: str = "score", split: str = "test", bar=None,
                   keep_per_image: tuple = (), capture=None) -> list[dict]:
    """Scores of (torch plan or None for plain images, pixel divisor) configs on one split.

    Each batch is read and decoded once; every config is applied to it on the device.  ``bar``:
    a tqdm bar to advance (the caller's, spanning several passes) instead of a new one.

    Every config gets the dataset-level scores (one confusion matrix over the split) and the
    per-image ones (``metrics.PerImage``: ``miou_per_image_mean``, ``images_scored``,
    ``images_unlabelled``), both from one batched ``bincount`` per batch; the configs whose index
    is in ``keep_per_image`` also get the ``per_image`` list (id, mIoU).  ``capture``:
    ``(predictions.Capture, {config index: condition name})`` — the first images' inputs and
    predictions for ``predictions.png``, taken from this same pass.
    """
    from tqdm import tqdm

    info = dataset_info(manifest)  # class count and ignore index of the split's dataset
    confusions = [Confusion(device, info["num_classes"], info["ignore_index"]) for _ in configs]
    per_image = [PerImage(device, keep=i in keep_per_image) for i in range(len(configs))]
    batches = test_batches(source, manifest, batch_size, workers, split)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=batches.plan.samples * len(configs), unit="img", desc=desc, disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
    cap, names = capture if capture is not None else (None, {})
    seen = 0  # real images before this batch
    with torch.no_grad():
        for pixels, masks, ids, n_padding in batches:
            real = len(ids) - n_padding  # padding rows (void, never in a single-rank pass) are not images
            pixels, masks = pixels.to(device), masks.to(device)
            grab = cap is not None and cap.wants(seen)
            if grab:
                cap.add_images(seen, ids[:real], pixels[:real], masks[:real], info["ignore_index"])
            for i, ((tplan, divisor), conf) in enumerate(zip(configs, confusions)):
                x = tplan.encrypt(pixels) if tplan is not None else pixels
                pred = model(normalize_pixels(x, divisor))["out"].argmax(1)
                mious = conf.update_images(pred, masks)[:real]
                per_image[i].add(mious, ids[:real])
                if grab and i in names:
                    cap.add(names[i], seen, x[:real], divisor, pred[:real], mious)
            seen += real
            bar.update(len(pixels) * len(configs))
    if own_bar:
        bar.close()
    return [{**c.scores(), **p.scores()} for c, p in zip(confusions, per_image)]


# Keys scored per pass over the test split: as many compiled plans as fit in PLAN_BUDGET_BYTES
# (at least one), and never more than MAX_KEYS_PER_PASS.
PLAN_BUDGET_BYTES = 256 << 20
MAX_KEYS_PER_PASS = 128


def plan_nbytes(tplan) -> int:
    """Bytes held by one compiled torch plan."""
    return sum(t.element_size() * t.numel() for t in tplan.t.values())


def keys_per_pass_for(plan_bytes: int, budget: int = PLAN_BUDGET_BYTES, cap: int = MAX_KEYS_PER_PASS) -> int:
    return max(1, min(cap, budget // max(1, plan_bytes)))


def _chunks(iterable, n: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# What the two mIoU readings in audit.json are (recorded in every audit).
METRICS_NOTE = {
    "miou": "dataset-level: one confusion matrix summed over every test image (the dataset's classes, its "
            "ignore index left out; VOC: 21 classes, 255 ignored), "
            "mean IoU over the classes present in its labels or predictions",
    "miou_per_image_mean": "the same definition applied to each image alone (classes present in its labels "
                           "or its prediction), averaged over the images; images without a labelled pixel "
                           "are skipped and counted (images_unlabelled)",
    "paper": "the paper (Table 1, Fig. 6) does not state which aggregation it uses; Fig. 5 shows per-image values",
}


def run_baseline(ckpt_path: str, test_dir: str, batch_size: int = 32, workers: int = 0,
                 progress: bool = True, trust: str | None = None, capture=None) -> dict:
    """The audit of a model trained on plain images: its test mIoU (the no-key baseline), dataset
    level and per image.  ``capture``: a ``predictions.Capture`` to fill (``--save-predictions``)."""
    device = pick_device()
    model, state = load_model(ckpt_path, device)
    manifest, test_provenance = load_trusted(test_dir, trust)
    if not manifest["encryption"]["plain"] or "test" not in manifest["splits"]["counts"]:
        raise KeyshardError(f"{test_dir}: needs plain shards with a test split")
    check_dataset(state, manifest, ckpt_path, test_dir)
    scores = score_on_split(model, [(None, 255)], test_dir, manifest, device, batch_size, workers, progress,
                            desc="baseline", keep_per_image=(0,),
                            capture=(capture, {0: "plain"}) if capture is not None else None)
    audit = {
        "format": "keyshard-audit/1", "kind": "baseline",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "keyshard", "version": __version__}, "libraries": library_versions(),
        "checkpoint": {"path": str(ckpt_path), "sha256": sha256_file(Path(ckpt_path)), "epoch": state["epoch"] + 1,
                       "model": state["model_name"], "model_block_size": state.get("model_block_size"),
                       "data": state["data"], "manifest": state.get("manifest")},
        "key": None,
        "test": {"path": str(test_dir), "images": epoch_plan(test_dir, manifest, "test", 0, 0, shuffle=False).samples,
                 "source_content_sha256": manifest["source"]["content_sha256"], **test_provenance},
        "device": str(device), "metrics": METRICS_NOTE, "results": {"plain": scores[0]},
    }
    if capture is not None:
        audit["predictions"] = capture.record()
    return audit


def run_audit(ckpt_path: str, key_path: str, test_dir: str, n_wrong: int = 100, seed: int = 0,
              batch_size: int = 32, ignore_fingerprint: bool = False, randomize_password: bool = False,
              workers: int = 0, progress: bool = True, near_miss: tuple[int, ...] = (),
              near_miss_count: int = 5, trust: str | None = None, keys_per_pass: int | None = None,
              capture=None) -> dict:
    """The key audit.  ``keys_per_pass``: keys scored per pass over the test split (default: as
    many plans as fit in ``PLAN_BUDGET_BYTES``, at most ``MAX_KEYS_PER_PASS``); the scores do not
    depend on it.  ``capture``: a ``predictions.Capture`` filled during the same passes with the
    first test images under the correct key, plain images and the first random wrong key
    (``--save-predictions``)."""
    from tqdm import tqdm

    device = pick_device()
    model, state = load_model(ckpt_path, device)
    key = keys.load(key_path)
    manifest, test_provenance = load_trusted(test_dir, trust)
    status = check_inputs(state, key, manifest, ckpt_path, key_path, test_dir, ignore_fingerprint)
    size = state["data"]["image_size"]
    near_miss = tuple(dict.fromkeys(near_miss))  # distinct, in the order given
    if near_miss_count > MAX_KEYS_PER_DISTANCE:
        raise KeyshardError(f"--near-miss-keys {near_miss_count}: at most {MAX_KEYS_PER_DISTANCE} keys per distance")
    if len(near_miss) * near_miss_count > wrong_keys.MAX_COUNT:
        raise KeyshardError(f"--near-miss: {len(near_miss)} distances x {near_miss_count} keys is more than "
                            f"{wrong_keys.MAX_COUNT} near-miss keys")
    for d in near_miss:  # bad distances and counts are refused now, not after hours of scoring
        near_miss_keys(key, d, near_miss_count, seed)
    wrong = wrong_keys.iter_draw(key, n_wrong, seed, randomize_password)  # too many keys: refused here

    def keyed():  # (distance or None for a wrong key, key), drawn lazily, one chunk at a time
        for d in near_miss:
            for k in near_miss_keys(key, d, near_miss_count, seed):
                yield d, k
        for k in wrong:
            yield None, k

    def compiled(chunk):
        return [(compile_plan(k.material, size, size).to_torch(device), k.material.divisor) for _, k in chunk]

    correct_plan = compile_plan(key.material, size, size).to_torch(device)
    per_pass = keys_per_pass or keys_per_pass_for(plan_nbytes(correct_plan))
    n_keyed = len(near_miss) * near_miss_count + n_wrong
    passes = 1 + math.ceil(max(0, n_keyed - (per_pass - 1)) / per_pass)
    images = epoch_plan(test_dir, manifest, "test", 0, 0, shuffle=False).samples
    bar = tqdm(total=images * (2 + n_keyed), unit="img", desc=f"audit ({2 + n_keyed} keys, {passes} pass(es))",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    wrong_scores, near_scores = [], {d: [] for d in near_miss}

    def record(chunk, scores):
        for (d, k), sc in zip(chunk, scores):
            row = {"fingerprint": k.fingerprint, "miou": sc["miou"], "pixel_acc": sc["pixel_acc"],
                   "miou_per_image_mean": sc["miou_per_image_mean"]}
            (wrong_scores if d is None else near_scores[d]).append(row)

    first_wrong = len(near_miss) * near_miss_count  # stream position of the first random wrong key

    def capturing(chunk, start, offset):
        """``score_on_split``'s capture for a chunk at stream position ``start`` whose configs
        begin at index ``offset``: the first random wrong key, if the chunk holds it."""
        if capture is None or not start <= first_wrong < start + len(chunk):
            return {}
        capture.wrong_fingerprint = chunk[first_wrong - start][1].fingerprint
        return {offset + first_wrong - start: "wrong"}

    stream = keyed()
    # pass 1: the correct key, plain images and the first keys, at most per_pass plans in all
    chunk = list(itertools.islice(stream, per_pass - 1))
    configs = [(correct_plan, key.material.divisor), (None, 255)] + compiled(chunk)
    del correct_plan
    names = {0: "correct", 1: "plain", **capturing(chunk, 0, 2)}
    scores = score_on_split(model, configs, test_dir, manifest, device, batch_size, workers, bar=bar,
                            keep_per_image=(0, 1), capture=(capture, names) if capture is not None else None)
    del configs
    correct_scores, plain_scores = scores[0], scores[1]
    record(chunk, scores[2:])
    position = len(chunk)
    for chunk in _chunks(stream, per_pass):  # later passes: per_pass keys each, drawn just in time
        configs = compiled(chunk)
        names = capturing(chunk, position, 0)
        record(chunk, score_on_split(model, configs, test_dir, manifest, device, batch_size, workers, bar=bar,
                                     capture=(capture, names) if names else None))
        position += len(chunk)
        del configs  # before the next chunk's plans are compiled
    bar.close()
    mious = np.array([w["miou"] for w in wrong_scores]) if wrong_scores else np.array([np.nan])
    audit = {
        "format": "keyshard-audit/1", "kind": "key",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "keyshard", "version": __version__}, "libraries": library_versions(),
        "checkpoint": {"path": str(ckpt_path), "sha256": sha256_file(Path(ckpt_path)), "epoch": state["epoch"] + 1,
                       "model": state["model_name"], "data": state["data"], "manifest": state.get("manifest")},
        "key": {"fingerprint": key.fingerprint, "method": key.method, "block_size": key.block_size,
                "derivation": key.derivation, "fingerprint_check": status},
        "test": {"path": str(test_dir), "images": images,
                 "source_content_sha256": manifest["source"]["content_sha256"], **test_provenance},
        "device": str(device), "scoring": {"keys_per_pass": per_pass, "passes": passes}, "metrics": METRICS_NOTE,
        "wrong_keys": {"count": len(wrong_scores), "seed": seed, "randomize_password": randomize_password,
                       "rule": wrong_keys.rule(key, randomize_password)},
        "results": {
            "correct": correct_scores, "plain": plain_scores,
            "wrong": {"summary": {"mean": float(np.mean(mious)), "std": float(np.std(mious)),
                                  "min": float(np.min(mious)), "max": float(np.max(mious)),
                                  "miou_per_image_mean": _mean_of(wrong_scores)},
                      "keys": wrong_scores},
            "near_miss": [{"distance": d, "mean": float(np.mean([x["miou"] for x in ks])),
                           "min": float(np.min([x["miou"] for x in ks])), "max": float(np.max([x["miou"] for x in ks])),
                           "miou_per_image_mean": _mean_of(ks), "keys": ks} for d, ks in near_scores.items()],
        },
    }
    if capture is not None:
        audit["predictions"] = capture.record()
    return audit


def _mean_of(rows: list[dict]) -> float | None:
    """Mean over keys of their per-image mIoU means (keys whose every image was unlabelled left out)."""
    values = [r["miou_per_image_mean"] for r in rows if r["miou_per_image_mean"] is not None]
    return float(np.mean(values)) if values else None
