"""Searching the key space against a stolen model with a few labelled plain images.

The objective is the model's mean cross-entropy on the attacker's labelled images encrypted
with a candidate key (lower is better).  Where the key space is small (NP/FFX at M=2: 924
masks; FFX when the attacker knows the password — the paper's fixed-password setting, the
worst case) every key is tried; otherwise a greedy hill-climb proposes one transposition (SHF)
or one selected/unselected swap (NP/FFX) at a time within a budget of model evaluations.
All candidates are applied on the device to the same decoded batch.

The same objective serves classifiers (the logits are N×K, the targets the class indices that
``open_shards`` yields for classification shards); ``run_search`` decides the task once, from the
checkpoint's dataset, and scores the best keys on the test split by top-1 accuracy instead of mIoU.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import torch
from torch.nn import functional as F

from keyshard import keys
from keyshard.errors import KeyshardError
from keyshard.keys import KeyMaterial
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
    def __call__(self, material: KeyMaterial) -> float:
        h, w = self.pixels.shape[1:3]
        plan = compile_plan(material, h, w).to_torch(self.device)
        logits = self.model(normalize_pixels(plan.encrypt(self.pixels), material.divisor))["out"]
        self.evaluations += 1
        return float(F.cross_entropy(logits.float(), self.masks, ignore_index=self.ignore))


def exhaustive(objective: Objective, method: str, m: int, selected: int, table: np.ndarray | None,
               progress=None) -> list[tuple[float, KeyMaterial]]:
    """Every mask with ``selected`` positions, scored; sorted best first."""
    n = 3 * m * m
    scored = []
    for combo in itertools.combinations(range(n), selected):
        mask = np.zeros(n, dtype=bool)
        mask[list(combo)] = True
        material = KeyMaterial(method, m, mask=mask, table=table)
        scored.append((objective(material), material))
        if progress:
            progress(1)
    scored.sort(key=lambda t: t[0])
    return scored


def hill_climb(objective: Objective, start: KeyMaterial, budget: int, seed: int,
               progress=None) -> list[tuple[float, KeyMaterial]]:
    """Greedy local search from ``start``; returns every improvement found, best first."""
    rng = np.random.default_rng([seed, 17])
    current, best = start, objective(start)
    history = [(best, start)]
    while objective.evaluations < budget:
        if current.method == "shf":
            i, j = rng.choice(current.perm.size, 2, replace=False)
            perm = current.perm.copy()
            perm[i], perm[j] = perm[j], perm[i]
            candidate = KeyMaterial("shf", current.block_size, perm=perm)
        else:
            mask = current.mask.copy()
            mask[rng.choice(np.flatnonzero(mask))] = False
            mask[rng.choice(np.flatnonzero(~current.mask))] = True
            candidate = KeyMaterial(current.method, current.block_size, mask=mask, table=current.table)
        score = objective(candidate)
        if progress:
            progress(1)
        if score < best:
            best, current = score, candidate
            history.append((score, candidate))
    history.sort(key=lambda t: t[0])
    return history


def search(objective: Objective, method: str, m: int, derivation: str, table: np.ndarray | None,
           budget: int, exhaustive_limit: int, start: KeyMaterial | None, seed: int, progress=None):
    """Exhaustive when the mask space is at most ``exhaustive_limit``, else hill-climbing.

    Masks have the size of ``start``'s (``keys.mask_size``; the caller draws the start with
    ``wrong_keys.draw`` from the true key or a key of the model's derivation, so a recovered or
    imported explicit key is searched with its own mask size), or without a start the size
    ``derivation`` selects (``keys.rule_mask_size``).
    """
    n = 3 * m * m
    if method != "shf":
        k = keys.mask_size(start) if start is not None else keys.rule_mask_size(m, derivation)
        if k is None:
            raise KeyshardError(f"the mask size of {derivation} keys is not known; give a start key")
        if math.comb(n, k) <= exhaustive_limit:
            return "exhaustive", exhaustive(objective, method, m, k, table, progress)
    if budget < 2:
        raise KeyshardError("--budget must allow at least 2 model evaluations")
    return "hill-climb", hill_climb(objective, start, budget, seed, progress)


def run_search(ckpt, labelled_dir, labelled_split: str, n_labelled: int, test_dir, true_key, ffx_password,
               budget: int, exhaustive_limit: int, top: int, seed: int) -> dict:
    """``keyshard attack search``: load the stolen model and the attacker's labelled plain images,
    search, score the best keys on the test split; with the true key, report distances and rank."""
    from tqdm import tqdm

    from keyshard.evaluate import wrong_keys
    from keyshard.evaluate.audit import check_dataset, score_on_split, test_batches
    from keyshard.evaluate.near_miss import distance
    from keyshard.pipeline.manifest import load as load_manifest
    from keyshard.evaluate.classify_audit import score_classifier
    from keyshard.shardformat import dataset_info
    from keyshard.train.checkpoint import dataset_of, load_model
    from keyshard.train.device import pick_device

    device = pick_device()
    model, state = load_model(ckpt, device)
    data = state["data"]
    if data["plain"]:
        raise KeyshardError(f"{ckpt}: was trained on plain images; there is no key to search for")
    trained = dataset_of(state)
    task = trained["task"]  # the one place the task is decided: loss targets and the test score follow it
    labelled_doc, test_doc = load_manifest(labelled_dir), load_manifest(test_dir)
    for d, doc in ((labelled_dir, labelled_doc), (test_dir, test_doc)):
        if not doc["encryption"]["plain"]:
            raise KeyshardError(f"{d}: must hold plain shards")
        if dataset_info(doc)["task"] != task:
            raise KeyshardError(f"{d}: holds {dataset_info(doc)['task']} data, but {ckpt} is a {task} model")
        check_dataset(state, doc, ckpt, d)
        if doc["image"]["height"] != data["image_size"]:
            raise KeyshardError(f"{d}: images are {doc['image']['height']}px, the model's {data['image_size']}px")
    method, m = data["method"], data["block_size"]
    truth = keys.load(true_key) if true_key else None
    if truth is not None and (truth.method, truth.block_size) != (method, m):
        raise KeyshardError(f"{true_key}: is {truth.method} M={truth.block_size}, the model {method} M={m}")
    table = None
    if method == "ffx":
        if ffx_password is None and truth is None:
            raise KeyshardError("FFX search needs the password the attacker knows: --ffx-password, "
                                "--ffx-password-file or $KEYSHARD_FFX_PASSWORD (or --key)")
        table = keys.ffx_table(ffx_password.encode("utf-8", "surrogateescape")) if ffx_password else truth.material.table
    # the first N labelled images
    pixels, masks, _, _ = next(iter(test_batches(labelled_dir, labelled_doc, n_labelled, split=labelled_split)))
    objective = Objective(model, pixels, masks, device, trained["ignore_index"])
    # a random start with the model's derivation rule (wrong_keys draws exactly those)
    template = truth or keys.Key(method, m, b"\0" * 32,
                                 reference_seed=0 if str(data["key_derivation"]).startswith("reference") else None,
                                 ffx_password=ffx_password.encode("utf-8", "surrogateescape") if ffx_password else None)
    start = wrong_keys.draw(template, 1, seed)[0].material
    if table is not None:
        start = keys.KeyMaterial(method, m, mask=start.mask, table=table)
    bar = tqdm(unit="key", desc="search", file=sys.stderr)
    mode, ranked = search(objective, method, m, data["key_derivation"], table, budget, exhaustive_limit, start,
                          seed, progress=bar.update)
    bar.close()
    best = ranked[:top]
    size = data["image_size"]
    configs = [(compile_plan(mat, size, size).to_torch(device), mat.divisor) for _, mat in best]
    if task == "classification":
        scores = [{"test_top1_acc": s["top1_acc"]} for s in score_classifier(model, configs, test_dir, test_doc, device)]
    else:
        scores = [{"test_miou": s["miou"]} for s in score_on_split(model, configs, test_dir, test_doc, device,
                                                                   progress=False)]
    report = {"mode": mode, "task": task, "method": method, "block_size": m,
              "labelled_images": int(objective.pixels.shape[0]), "evaluations": objective.evaluations,
              "best": [{"labelled_loss": round(loss, 6), **s} for (loss, _), s in zip(best, scores)]}
    if truth is not None:
        correct = truth.material
        for entry, (_, mat) in zip(report["best"], best):
            entry["distance_to_true_key"] = distance(mat, correct)
        true_loss = objective(correct)
        report["true_key_labelled_loss"] = round(true_loss, 6)
        report["true_key_rank"] = 1 + sum(1 for loss, _ in ranked if loss < true_loss)
        report["true_key_found"] = any(mat.equals(correct) for _, mat in best)
    return report
