"""The key audit, the one loop for every task: a checkpoint on plain test shards, encrypted on the
device with the correct key, no key, and N random wrong keys (and, where the task has them,
near-miss keys) — each test batch is read and decoded once per pass, then every key of the pass is
applied to it on the GPU (or CPU) with the same compiled plans as the offline encryption.

What differs between tasks comes from the task (``keyshard/tasks/``): its scorer accumulates
each key's scores over the split (segmentation: one confusion matrix and per-image mIoUs;
classification: top-1 accuracy), and it turns scores into the audit's rows and summaries.

Keys are scored a chunk at a time: a pass over the test split compiles the plans of at most
``keys_per_pass`` keys (as many as fit in ``PLAN_BUDGET_BYTES``, at most ``MAX_KEYS_PER_PASS``),
scores them, and drops them before the next chunk's keys are even drawn.  Memory therefore stays
flat whatever the number of wrong keys (an SHF M=8 plan at 256² is ~3 MB: 100,000 of them at
once were 300 GB), and the first batch is scored right away.  Every key's scores are a function
of the model, its plan and the (fixed-order) batches only, so they are identical however the keys
are chunked (tested).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from keyshard import __version__, keys, tasks
from keyshard.errors import KeyshardError
from keyshard.evaluate import wrong_keys
from keyshard.evaluate.near_miss import MAX_KEYS_PER_DISTANCE, near_miss_keys
from keyshard.fsutil import sha256_file
from keyshard.manifest import Manifest, as_manifest, library_versions
from keyshard.train.checkpoint import check_key_kind, fingerprint_overridden, load_model
from keyshard.train.data import epoch_plan, open_shards
from keyshard.train.device import pick_device
from keyshard.transforms import compile_plan, normalize_pixels


# -- checks -------------------------------------------------------------------------------------
def check_inputs(state: dict, key: keys.Key, test_manifest, ckpt_path, key_path, test_dir,
                 ignore_fingerprint: bool) -> str:
    """Refuse mismatches with one line; return the fingerprint-check status for the report."""
    data, test = state["data"], as_manifest(test_manifest)
    check_test_split(test, test_dir)
    check_key_kind(data, key, ckpt_path, key_path)
    check_dataset(state, test, ckpt_path, test_dir)
    check_image_size(data, test, test_dir)
    overridden = fingerprint_overridden(data, key, ckpt_path, key_path, ignore_fingerprint)
    return "overridden (--ignore-fingerprint)" if overridden else "match"


def check_test_split(test_manifest, test_dir) -> None:
    """The audit encrypts the test images itself with every key, so they must be plain."""
    test = as_manifest(test_manifest)
    if not test.encryption.plain:
        raise KeyshardError(f"{test_dir}: test shards must be plain (written without a key); "
                            "the audit encrypts them itself with every key")
    if "test" not in test.splits.counts:
        raise KeyshardError(f"{test_dir}: holds no test split")


def check_image_size(data: dict, manifest, where) -> None:
    """Shards a keyed model is scored on hold images of the size it was trained on: a key's plan
    is compiled for one size, and the model's blocks line up only there."""
    if manifest.image.height != data["image_size"]:
        raise KeyshardError(f"{where}: images are {manifest.image.height}px but the model was "
                            f"trained on {data['image_size']}px")


def check_dataset(state: dict, test_manifest, ckpt_path, test_dir) -> None:
    """The test shards hold the model's task and label the classes it predicts (same class
    count and ignore index)."""
    from keyshard.train.checkpoint import dataset_of

    trained, test = dataset_of(state), as_manifest(test_manifest).dataset
    model_task, test_task = tasks.for_kind(trained["kind"]).name, tasks.for_kind(test.kind).name
    if test_task != model_task:
        raise KeyshardError(f"{test_dir}: holds {test_task} data, but {ckpt_path} is a {model_task} model")
    for field in ("num_classes", "ignore_index"):
        if trained[field] != getattr(test, field):
            raise KeyshardError(f"{test_dir}: its dataset has {field} {getattr(test, field)} but {ckpt_path} was "
                                f"trained with {trained[field]} ({trained['kind']})")


def task_of(manifest) -> tasks.Task:
    """The task of a shard set, from its manifest's dataset kind."""
    return tasks.for_kind(as_manifest(manifest).dataset.kind)


# -- one pass over the split ----------------------------------------------------------------------
def test_batches(source, manifest, batch_size: int = 32, workers: int = 0, split: str = "test"):
    """One pass over a split in manifest order (no shuffling, one rank), streamed and verified."""
    return open_shards(source, split, batch_size=batch_size, workers=workers, shuffle=False, rank=0, world=1,
                       manifest=manifest)


def score_on_split(model, configs: list, source, manifest, device, batch_size: int = 32, workers: int = 0,
                   progress: bool = True, desc: str = "score", split: str = "test", bar=None,
                   keep_per_image: tuple = (), capture=None) -> list[dict]:
    """Scores of (torch plan or None for plain images, pixel divisor) configs on one split, by
    the split's task's scorer (segmentation: ``miou``, ``pixel_acc``, per-image mIoUs ...;
    classification: ``top1_acc``, ``correct``, ``images``).

    Each batch is read and decoded once; every config is applied to it on the device.  ``bar``:
    a tqdm bar to advance (the caller's, spanning several passes) instead of a new one.  The
    configs whose index is in ``keep_per_image`` also keep per-image scores (segmentation's
    ``per_image`` list).  ``capture``: ``(predictions.Capture, {config index: condition name})``
    — the first images' inputs and predictions for ``predictions.png``, taken from this same pass.
    """
    from tqdm import tqdm

    info = as_manifest(manifest).dataset  # class count and ignore index of the split's dataset
    make = tasks.for_kind(info.kind).hook("scorer")
    scorers = [make(device, info.num_classes, info.ignore_index, i in keep_per_image) for i in range(len(configs))]
    batches = test_batches(source, manifest, batch_size, workers, split)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=batches.plan.samples * len(configs), unit="img", desc=desc, disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
    cap, names = capture if capture is not None else (None, {})
    seen = 0  # real images before this batch
    with torch.no_grad():
        for pixels, targets, ids, n_padding in batches:
            real = len(ids) - n_padding  # padding rows (never in a single-rank pass) are not images
            pixels, targets, ids = pixels[:real].to(device), targets[:real].to(device), ids[:real]
            grab = cap is not None and cap.wants(seen)
            if grab:
                cap.add_images(seen, ids, pixels, targets, info.ignore_index)
            for i, ((tplan, divisor), scorer) in enumerate(zip(configs, scorers)):
                x = tplan.encrypt(pixels) if tplan is not None else pixels
                pred = model(normalize_pixels(x, divisor))["out"].argmax(1)
                per_image = scorer.add(pred, targets, ids)
                if grab and i in names:
                    cap.add(names[i], seen, x, divisor, pred, per_image)
            seen += real
            bar.update(real * len(configs))
    if own_bar:
        bar.close()
    return [s.scores() for s in scorers]


# -- keys in chunks -------------------------------------------------------------------------------
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


@dataclass
class Scoring:
    """What one audit scores and with what: the model and test data, the correct key and the
    stream of other keys (``(near-miss distance or None for a random wrong key, key)``, drawn
    lazily), how many there are and where the first random wrong key is in the stream."""

    model: torch.nn.Module
    device: torch.device
    test_dir: str
    manifest: Manifest
    size: int
    batch_size: int
    workers: int
    key: keys.Key
    correct_plan: object  # the correct key's torch plan; dropped after the first pass
    others: object
    n_others: int
    first_wrong: int
    capture: object = None

    def compiled(self, chunk) -> list:
        return [(compile_plan(k.material, self.size, self.size).to_torch(self.device), k.material.divisor)
                for _, k in chunk]

    def score(self, configs, bar, names=None, keep_per_image=()) -> list[dict]:
        capture = (self.capture, names) if self.capture is not None and names else None
        return score_on_split(self.model, configs, self.test_dir, self.manifest, self.device, self.batch_size,
                              self.workers, bar=bar, keep_per_image=keep_per_image, capture=capture)

    def capturing(self, chunk, start: int, offset: int) -> dict:
        """The capture names for a chunk at stream position ``start`` whose configs begin at index
        ``offset``: the first random wrong key, if the chunk holds it."""
        if self.capture is None or not start <= self.first_wrong < start + len(chunk):
            return {}
        self.capture.wrong_fingerprint = chunk[self.first_wrong - start][1].fingerprint
        return {offset + self.first_wrong - start: "wrong"}


def score_keys(run: Scoring, per_pass: int, bar) -> tuple[dict, dict, list]:
    """The correct key's and plain images' scores, and ``(distance, key, scores)`` for every other
    key: pass 1 scores the correct key, plain images and the first keys (at most ``per_pass`` plans
    in all); later passes ``per_pass`` keys each, drawn and compiled just in time."""
    stream = iter(run.others)
    chunk = list(itertools.islice(stream, per_pass - 1))
    configs = [(run.correct_plan, run.key.material.divisor), (None, 255)] + run.compiled(chunk)
    run.correct_plan = None
    names = {0: "correct", 1: "plain", **run.capturing(chunk, 0, 2)}
    scores = run.score(configs, bar, names, keep_per_image=(0, 1))
    del configs
    scored = [(d, k, s) for (d, k), s in zip(chunk, scores[2:])]
    position = len(chunk)
    for chunk in _chunks(stream, per_pass):
        configs = run.compiled(chunk)
        scored += [(d, k, s) for (d, k), s in zip(chunk, run.score(configs, bar, run.capturing(chunk, position, 0)))]
        position += len(chunk)
        del configs  # before the next chunk's plans are compiled
    return scores[0], scores[1], scored


# -- the audit --------------------------------------------------------------------------------------
def audit_header(kind: str, task: tasks.Task, ckpt_path, state: dict, test_dir, test, device) -> dict:
    """What every audit.json starts with: format, kind, task, tool, the checkpoint and the test data.

    Segmentation audits, keyshard's first, carry no ``task`` field (an audit without one is a
    segmentation audit), and their key audits record the checkpoint without ``model_block_size``
    (the key's block size is the model's); every other audit records both."""
    checkpoint = {"path": str(ckpt_path), "sha256": sha256_file(Path(ckpt_path)), "epoch": state["epoch"] + 1,
                  "model": state["model_name"], "model_block_size": state.get("model_block_size"),
                  "data": state["data"], "manifest": state.get("manifest")}
    if kind == "key" and task.name == tasks.DEFAULT:
        del checkpoint["model_block_size"]
    return {
        "format": "keyshard-audit/1", "kind": kind,
        **({"task": task.name} if task.name != tasks.DEFAULT else {}),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "keyshard", "version": __version__}, "libraries": library_versions(),
        "checkpoint": checkpoint, "key": None,
        "test": {"path": str(test_dir), "images": epoch_plan(test_dir, test, "test", 0, 0, shuffle=False).samples,
                 "source_content_sha256": test.source.content_sha256,
                 **task.test_record(test.dataset), **test.provenance.record()},
        "device": str(device), "metrics": task.metrics_note,
    }


def _load(ckpt_path, test_dir, trust):
    """The device, the checkpoint's model and state, the trusted test manifest and its task."""
    from keyshard.manifest import read

    device = pick_device()
    model, state = load_model(ckpt_path, device)
    test = read(test_dir, trust)
    return device, model, state, test, task_of(test)


def run_baseline(ckpt_path: str, test_dir: str, batch_size: int = 32, workers: int = 0,
                 progress: bool = True, trust: str | None = None, capture=None) -> dict:
    """The audit of a model trained on plain images: its scores on plain test images (the no-key
    baseline).  ``capture``: a ``predictions.Capture`` to fill (tasks with prediction figures)."""
    device, model, state, test, task = _load(ckpt_path, test_dir, trust)
    check_task_supports(task, capture=capture)
    check_test_split(test, test_dir)
    check_dataset(state, test, ckpt_path, test_dir)
    scores = score_on_split(model, [(None, 255)], test_dir, test, device, batch_size, workers, progress,
                            desc="baseline", keep_per_image=(0,),
                            capture=(capture, {0: "plain"}) if capture is not None else None)
    audit = {**audit_header("baseline", task, ckpt_path, state, test_dir, test, device),
             "results": {"plain": scores[0]}}
    if capture is not None:
        audit["predictions"] = capture.record()
    return audit


def check_task_supports(task: tasks.Task, near_miss: tuple = (), capture=None) -> None:
    """Near-miss keys and prediction figures only for the tasks that have them."""
    if near_miss and not task.near_miss:
        raise KeyshardError(f"`near_miss`: {task.name} audits score no near-miss keys")
    if capture is not None and not task.predictions:
        raise KeyshardError(f"{task.name} audits draw no prediction figures (`capture`)")


def check_near_miss(key: keys.Key, distances: tuple, count: int, seed: int) -> None:
    """Bad near-miss distances and counts are refused now, not after hours of scoring."""
    if count > MAX_KEYS_PER_DISTANCE:
        raise KeyshardError(f"`near_miss_count` {count}: at most {MAX_KEYS_PER_DISTANCE} keys per distance")
    if len(distances) * count > wrong_keys.MAX_COUNT:
        raise KeyshardError(f"`near_miss`: {len(distances)} distances x {count} keys is more than "
                            f"{wrong_keys.MAX_COUNT} near-miss keys")
    for d in distances:
        near_miss_keys(key, d, count, seed)


def other_keys(key: keys.Key, distances: tuple, count: int, seed: int, wrong):
    """``(distance, key)`` for the near-miss keys, then ``(None, key)`` for the random wrong ones
    (``wrong``, an iterator), drawn lazily, one chunk at a time."""
    for d in distances:
        for k in near_miss_keys(key, d, count, seed):
            yield d, k
    for k in wrong:
        yield None, k


def key_results(task: tasks.Task, correct: dict, plain: dict, scored: list, distances: tuple) -> dict:
    """audit.json's ``results``: the correct key, plain images, each wrong key's row and their
    summary, and (tasks with near-miss keys) one summary with its rows per distance (mean, min,
    max and the task's own fields; no std, as near-miss rows have always been written)."""
    rows = {d: [] for d in (None, *distances)}
    for d, k, scores in scored:
        rows[d].append({"fingerprint": k.fingerprint, **task.key_row(scores)})
    results = {"correct": correct, "plain": plain,
               "wrong": {"summary": task.summary(rows[None]), "keys": rows[None]}}
    if task.near_miss:
        results["near_miss"] = [{"distance": d, **{k: v for k, v in task.summary(rows[d]).items() if k != "std"},
                                 "keys": rows[d]} for d in distances]
    return results


def run_audit(ckpt_path: str, key_path: str, test_dir: str, n_wrong: int = 100, seed: int = 0,
              batch_size: int = 32, ignore_fingerprint: bool = False, randomize_password: bool = False,
              workers: int = 0, progress: bool = True, near_miss: tuple[int, ...] = (),
              near_miss_count: int = 5, trust: str | None = None, keys_per_pass: int | None = None,
              capture=None, ciphertext_only: int = 0) -> dict:
    """The key audit.  ``near_miss``: distances of near-miss keys to score too (``near_miss_count``
    per distance; tasks with near-miss keys).  ``keys_per_pass``: keys scored per pass over the
    test split (default: as many plans as fit in ``PLAN_BUDGET_BYTES``, at most
    ``MAX_KEYS_PER_PASS``); the scores do not depend on it.  ``capture``: a
    ``predictions.Capture`` filled during the same passes with the first test images under the
    correct key, plain images and the first random wrong key (tasks with prediction figures).
    ``ciphertext_only``: N > 0 also estimates the key from the first N test images encrypted with
    it, and nothing else (``evaluate/ciphertext_only.py``), and records what that gives."""
    from tqdm import tqdm

    device, model, state, test, task = _load(ckpt_path, test_dir, trust)
    key = keys.load(key_path)
    status = check_inputs(state, key, test, ckpt_path, key_path, test_dir, ignore_fingerprint)
    near_miss = tuple(dict.fromkeys(near_miss))  # distinct, in the order given
    check_task_supports(task, near_miss, capture)
    check_near_miss(key, near_miss, near_miss_count, seed)
    if ciphertext_only:
        from keyshard.evaluate.ciphertext_only import check_audit_request

        check_audit_request(key, ciphertext_only)
    wrong = wrong_keys.iter_draw(key, n_wrong, seed, randomize_password)  # too many keys: refused here
    first_wrong = len(near_miss) * near_miss_count  # stream position of the first random wrong key
    size = state["data"]["image_size"]
    run = Scoring(model, device, test_dir, test, size, batch_size, workers, key,
                  compile_plan(key.material, size, size).to_torch(device),
                  other_keys(key, near_miss, near_miss_count, seed, wrong), first_wrong + n_wrong, first_wrong,
                  capture)
    per_pass = keys_per_pass or keys_per_pass_for(plan_nbytes(run.correct_plan))
    passes = 1 + math.ceil(max(0, run.n_others - (per_pass - 1)) / per_pass)
    images = epoch_plan(test_dir, test, "test", 0, 0, shuffle=False).samples
    bar = tqdm(total=images * (2 + run.n_others), unit="img",
               desc=f"audit ({2 + run.n_others} keys, {passes} pass(es))", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    correct, plain, scored = score_keys(run, per_pass, bar)
    bar.close()
    audit = {
        **audit_header("key", task, ckpt_path, state, test_dir, test, device),
        "key": {"fingerprint": key.fingerprint, "method": key.method, "block_size": key.block_size,
                "derivation": key.derivation, "fingerprint_check": status},
        "scoring": {"keys_per_pass": per_pass, "passes": passes},
        "wrong_keys": {"count": n_wrong, "seed": seed, "randomize_password": randomize_password,
                       "rule": wrong_keys.rule(key, randomize_password)},
        "results": key_results(task, correct, plain, scored, near_miss),
    }
    if capture is not None:
        audit["predictions"] = capture.record()
    if ciphertext_only:
        from keyshard.evaluate.ciphertext_only import audit_row

        audit["ciphertext_only"] = audit_row(key, model, device, test_dir, test, ciphertext_only,
                                             correct[task.headline], batch_size, workers, progress, seed)
    return audit
