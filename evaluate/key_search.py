"""Searching the key space against a stolen model with a few labelled plain images.

The objective is the model's mean cross-entropy on the attacker's labelled images encrypted
with a candidate key (lower is better).  Where the key space is small (NP/FFX at M=2: 924
masks; FFX when the attacker knows the password — the paper's fixed-password setting, the
worst case) every key is tried; otherwise a greedy hill-climb proposes one transposition (SHF)
or one selected/unselected swap (NP/FFX) at a time within a budget of model evaluations.
All candidates are applied on the device to the same decoded batch.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch.nn import functional as F

from keyshard import keys
from keyshard.errors import KeyshardError
from keyshard.keys import KeyMaterial
from keyshard.shardformat import VOID
from keyshard.transforms import compile_plan, normalize_pixels


class Objective:
    """Mean cross-entropy of the model on fixed labelled pixels under a candidate key."""

    def __init__(self, model, pixels: torch.Tensor, masks: torch.Tensor, device):
        self.model, self.device = model, device
        self.pixels, self.masks = pixels.to(device), masks.to(device).long()
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, material: KeyMaterial) -> float:
        h, w = self.pixels.shape[1:3]
        plan = compile_plan(material, h, w).to_torch(self.device)
        logits = self.model(normalize_pixels(plan.encrypt(self.pixels), material.divisor))["out"]
        self.evaluations += 1
        return float(F.cross_entropy(logits.float(), self.masks, ignore_index=VOID))


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
