"""Searching the key space against a stolen model with a few labelled plain images.

The objective is the model's mean cross-entropy on the attacker's labelled images encrypted
with a candidate key (lower is better).  Where the key space is small (NP/FFX at M=2: 924
masks; FFX when the attacker knows the password — the paper's fixed-password setting, the
worst case) every key is tried (``Method.exhaustive``); otherwise a greedy hill-climb proposes
one neighbouring key at a time (``Method.neighbour``: a transposition for SHF, one
selected/unselected swap for NP/FFX) within a budget of model evaluations.
All candidates are applied on the device to the same decoded batch.

The same objective serves classifiers (the logits are N×K, the targets the class indices that
``open_shards`` yields for classification shards); ``run_search`` decides the task once, from the
checkpoint's dataset, and scores the best keys on the test split by top-1 accuracy instead of mIoU.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch
from torch.nn import functional as F

from keyshard import keys, methods, tasks
from keyshard.errors import KeyshardError
from keyshard.shardformat import VOID
from keyshard.transforms import compile_plan, normalize_pixels


class Objective:
    """Mean cross-entropy of the model on fixed labelled images under a candidate key: per pixel
    against masks (segmentation) or per image against class indices (classification)."""

    def __init__(self, model, pixels: torch.Tensor, masks: torch.Tensor, device, ignore_index: int | None = VOID):
        self.model, self.device = model, device
        self.ignore = -100 if ignore_index is None else ignore_index  # the dataset's (VOC: 255)
        self.pixels, self.masks = pixels.to(device), masks.to(device).long()
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, material: methods.Material) -> float:
        h, w = self.pixels.shape[1:3]
        plan = compile_plan(material, h, w).to_torch(self.device)
        logits = self.model(normalize_pixels(plan.encrypt(self.pixels), material.divisor))["out"]
        self.evaluations += 1
        return float(F.cross_entropy(logits.float(), self.masks, ignore_index=self.ignore))


def exhaustive(objective: Objective, candidates, progress=None) -> list[tuple[float, methods.Material]]:
    """Every candidate key, scored; sorted best first."""
    scored = []
    for material in candidates:
        scored.append((objective(material), material))
        if progress:
            progress(1)
    scored.sort(key=lambda t: t[0])
    return scored


def hill_climb(objective: Objective, start: methods.Material, budget: int, seed: int,
               progress=None) -> list[tuple[float, methods.Material]]:
    """Greedy local search from ``start``; returns every improvement found, best first."""
    rng = np.random.default_rng([seed, 17])
    method = methods.get(start.method)
    current, best = start, objective(start)
    history = [(best, start)]
    while objective.evaluations < budget:
        candidate = method.neighbour(current, rng)
        score = objective(candidate)
        if progress:
            progress(1)
        if score < best:
            best, current = score, candidate
            history.append((score, candidate))
    history.sort(key=lambda t: t[0])
    return history


def template_key(method: str, m: int, derivation: str, password: bytes | None = None) -> keys.Key:
    """A public key of ``derivation``'s kind: its wrong keys are random keys of the model's kind."""
    if derivation == keys.DERIVE_EXPLICIT:
        raise KeyshardError(f"the shape of {derivation} keys is not known; give a start key")
    return keys.Key(method, m, b"\0" * 32, reference_seed=0 if str(derivation).startswith("reference") else None,
                    ffx_password=password)


def search(objective: Objective, method: str, m: int, derivation: str, budget: int, exhaustive_limit: int,
           start: methods.Material | None, seed: int, progress=None):
    """Exhaustive when the keys of ``start``'s kind number at most ``exhaustive_limit``, else hill-climbing.

    Candidates have ``start``'s shape (its mask size, FFX table; the caller draws the start with
    ``wrong_keys.draw`` from the true key or a key of the model's derivation, so a recovered or
    imported explicit key is searched with its own shape), or without a start the shape
    ``derivation`` gives (a random key of ``template_key``).
    """
    if start is None:
        start = wrong_key(template_key(method, m, derivation), seed)
    candidates = methods.get(method).exhaustive(start, exhaustive_limit)
    if candidates is not None:
        return "exhaustive", exhaustive(objective, candidates, progress)
    if budget < 2:
        raise KeyshardError("`budget` must allow at least 2 model evaluations")
    return "hill-climb", hill_climb(objective, start, budget, seed, progress)


def wrong_key(template: keys.Key, seed: int) -> methods.Material:
    """A random key of ``template``'s kind (the search's start)."""
    from keyshard.evaluate import wrong_keys

    return wrong_keys.draw(template, 1, seed)[0].material


def run_search(ckpt, labelled_dir, labelled_split: str, n_labelled: int, test_dir, true_key, ffx_password,
               budget: int, exhaustive_limit: int, top: int, seed: int) -> dict:
    """``keyshard attack search``: load the stolen model and the attacker's labelled plain images,
    search, score the best keys on the test split; with the true key, report distances and rank."""
    from tqdm import tqdm

    from keyshard.evaluate.audit import check_dataset, check_image_size, score_on_split, test_batches
    from keyshard.manifest import read
    from keyshard.train.checkpoint import dataset_of, load_model
    from keyshard.train.device import pick_device

    device = pick_device()
    model, state = load_model(ckpt, device)
    data = state["data"]
    if data["plain"]:
        raise KeyshardError(f"{ckpt}: was trained on plain images; there is no key to search for")
    trained = dataset_of(state)
    task = trained["task"]  # the one place the task is decided: loss targets and the test score follow it
    labelled_manifest, test_manifest = read(labelled_dir), read(test_dir)
    for d, doc in ((labelled_dir, labelled_manifest), (test_dir, test_manifest)):
        if not doc.encryption.plain:
            raise KeyshardError(f"{d}: must hold plain shards")
        if doc.dataset.task != task:
            raise KeyshardError(f"{d}: holds {doc.dataset.task} data, but {ckpt} is a {task} model")
        check_dataset(state, doc, ckpt, d)
        check_image_size(data, doc, d)
    method, m = data["method"], data["block_size"]
    truth = keys.load(true_key) if true_key else None
    if truth is not None and (truth.method, truth.block_size) != (method, m):
        raise KeyshardError(f"{true_key}: is {truth.method} M={truth.block_size}, the model {method} M={m}")
    password = ffx_password.encode("utf-8", "surrogateescape") if ffx_password else None
    if methods.get(method).takes_password and password is None and truth is None:
        raise KeyshardError("FFX search needs the password the attacker knows (`ffx_password`) "
                            "or the true key (`true_key`)")
    # the first N labelled images
    pixels, masks, _, _ = next(iter(test_batches(labelled_dir, labelled_manifest, n_labelled, split=labelled_split)))
    objective = Objective(model, pixels, masks, device, trained["ignore_index"])
    # a random start with the model's derivation rule (wrong_keys draws exactly those), keyed
    # with the password the attacker knows
    start = wrong_key(_attacker_template(truth, method, m, data["key_derivation"], password), seed)
    bar = tqdm(unit="key", desc="search", file=sys.stderr)
    mode, ranked = search(objective, method, m, data["key_derivation"], budget, exhaustive_limit, start,
                          seed, progress=bar.update)
    bar.close()
    best = ranked[:top]
    size = data["image_size"]
    configs = [(compile_plan(mat, size, size).to_torch(device), mat.divisor) for _, mat in best]
    headline = tasks.get(task).headline  # test_miou / test_top1_acc, by the audit's one loop
    scores = [{f"test_{headline}": s[headline]}
              for s in score_on_split(model, configs, test_dir, test_manifest, device, progress=False)]
    report = {"mode": mode, "task": task, "method": method, "block_size": m,
              "labelled_images": int(objective.pixels.shape[0]), "evaluations": objective.evaluations,
              "best": [{"labelled_loss": round(loss, 6), **s} for (loss, _), s in zip(best, scores)]}
    if truth is not None:
        _compare_with_truth(report, objective, ranked, best, truth.material)
    return report


def _compare_with_truth(report: dict, objective: Objective, ranked: list, best: list,
                        correct: methods.Material) -> None:
    """Auditors: each best key's distance to the true key, the true key's loss and rank."""
    from keyshard.evaluate.near_miss import distance

    for entry, (_, mat) in zip(report["best"], best):
        entry["distance_to_true_key"] = distance(mat, correct)
    true_loss = objective(correct)
    report["true_key_labelled_loss"] = round(true_loss, 6)
    report["true_key_rank"] = 1 + sum(1 for loss, _ in ranked if loss < true_loss)
    report["true_key_found"] = any(mat.equals(correct) for _, mat in best)


def _attacker_template(truth: keys.Key | None, method: str, m: int, derivation: str,
                       password: bytes | None) -> keys.Key:
    """The true key (auditors) or a public key of the model's derivation, with ``password`` when
    the attacker gives one: the start's kind (mask size, table) follows it."""
    if truth is None:
        return template_key(method, m, derivation, password)
    if password is None or truth.explicit is not None:
        return truth
    return dataclasses.replace(truth, ffx_password=password)
