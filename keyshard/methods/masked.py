"""What NP and FFX share: a key selects a set of the 3M² block positions (a mask) to transform.

* Derivation: secret keys select the first ``3M²//2`` entries of the ``mask-order`` shuffle
  (exactly half, as the paper states); ``reference_seed`` keys take ``perm > 3M²/2`` of the
  authors' ``torch.randperm`` (one position fewer than half).  An explicit key's mask selects
  however many positions it holds.
* Wrong keys, near-miss keys and the key search keep the mask's size (``mask_size``): wrong
  keys are uniform masks of that size, distance counts selected positions swapped with
  unselected ones, a hill-climbing step swaps one.
* Ciphertext-only estimates of a mask are scored by ``mask_fraction``: the share of the 3M²
  positions an estimate gets right.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from keyshard import keys
from keyshard.keys import CHANNELS, DERIVE_REFERENCE, DERIVE_SECRET
from keyshard.methods import Method

MASK_SCHEMA = {
    "description": "NP/FFX: '1' where the value at that block position is transformed; 3M² characters.",
    "type": "string", "minLength": 3, "maxLength": keys.MAX_BLOCK_LEN, "not": {"pattern": "[^01]"},
    "errorMessage": "must be a string of '0' and '1' characters"}


def rule_mask_size(block_size: int, derivation: str) -> int | None:
    """How many of the 3M² block positions a mask of ``derivation`` selects.

    ``keyshard-shake256/1``: exactly half (``n // 2``).  The reference code's ``perm > n/2``
    selects the values ``floor(n/2) + 1 .. n - 1``: ``n - 1 - n // 2`` positions (one fewer than
    half for even n).  An explicit key's mask is whatever its file holds: None here, ask
    ``mask_size(material)``.  This is the one place that knows these counts.
    """
    n = block_size * block_size * CHANNELS
    if derivation == DERIVE_SECRET:
        return n // 2
    if derivation == DERIVE_REFERENCE:
        return n - 1 - n // 2
    return None


def mask_size(material) -> int:
    """How many positions a mask key selects (what its wrong keys and searches keep)."""
    mask = getattr(material, "mask", None)
    if mask is None:
        raise ValueError(f"{material.method} keys have no mask")
    return int(mask.sum())


def derive_mask(key) -> np.ndarray:
    """The mask of a secret or reference-seed key (module doc)."""
    n = key.block_size * key.block_size * CHANNELS
    if key.reference_seed is not None:
        return keys.reference_permutation(key.reference_seed, n) > n / 2  # rule_mask_size: n - 1 - n // 2
    mask = np.zeros(n, dtype=bool)
    mask[keys.fisher_yates(key.secret, b"mask-order", n)[: rule_mask_size(key.block_size, DERIVE_SECRET)]] = True
    return mask


def mask_from_json(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def mask_to_json(mask: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in mask)


def _log2_comb(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


class MaskMethod(Method):
    """The members NP and FFX share; a subclass adds its transform and what else its key holds.
    Materials have a ``mask`` field; ``dataclasses.replace(base, mask=...)`` keeps the rest."""

    def _check_mask(self, block_size: int, text: str, where: str) -> np.ndarray:
        n = block_size * block_size * CHANNELS
        if len(text) != n:
            from keyshard.errors import KeyshardError

            raise KeyshardError(f"{where}: 'material.mask' must have 3M² = {n} characters, not {len(text)}")
        return mask_from_json(text)

    def keyspace_bits(self, material):
        n, selected = material.block_len, mask_size(material)
        return math.log2(math.comb(n, selected)) if n < 4000 else _log2_comb(n, selected)

    def keyspace_count(self, material):
        return math.comb(material.block_len, mask_size(material))

    def describe(self, material):
        return [("mask", f"{mask_size(material)} of {material.block_len} positions transformed")]

    def wrong_mask(self, base, secret: bytes) -> np.ndarray:
        """The first ``mask_size(base)`` entries of ``secret``'s ``mask-order`` shuffle."""
        mask = np.zeros(base.block_len, dtype=bool)
        mask[keys.fisher_yates(secret, b"mask-order", base.block_len)[:mask_size(base)]] = True
        return mask

    def wrong_material(self, base, secret, vary_password):
        return dataclasses.replace(base, mask=self.wrong_mask(base, secret))

    def wrong_rule(self, base, vary_password):
        return f"random masks of the key's size ({mask_size(base)} of {base.block_len} positions)"

    def max_distance(self, material):
        selected = mask_size(material)
        return min(selected, material.mask.size - selected)

    def distance(self, a, b):
        return int((a.mask & ~b.mask).sum())

    def near_miss(self, base, d, rng):
        on = rng.choice(np.flatnonzero(base.mask), d, replace=False)
        off = rng.choice(np.flatnonzero(~base.mask), d, replace=False)
        mask = base.mask.copy()
        mask[on], mask[off] = False, True
        return dataclasses.replace(base, mask=mask)

    def neighbour(self, material, rng):
        mask = material.mask.copy()
        mask[rng.choice(np.flatnonzero(mask))] = False
        mask[rng.choice(np.flatnonzero(~material.mask))] = True
        return dataclasses.replace(material, mask=mask)

    def exhaustive(self, start, limit):
        n, k = start.block_len, mask_size(start)
        if math.comb(n, k) > limit:
            return None
        return (dataclasses.replace(start, mask=_mask_of(n, combo)) for combo in itertools.combinations(range(n), k))

    def compare(self, recovered, truth, determined):
        return {"true_mask_equal": bool(np.array_equal(recovered.mask, truth.mask))}


def mask_fraction(estimated: np.ndarray, truth: np.ndarray) -> float:
    """The share of block positions whose bit an estimated mask gets right."""
    return float(np.mean(estimated == truth))


def _mask_of(n: int, positions) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[list(positions)] = True
    return mask


def changed_positions(block_size: int, pairs: list) -> tuple[list, np.ndarray]:
    """The pairs as (plain, encrypted) int64 block arrays, and where any value differs."""
    from keyshard.transforms import to_blocks

    blocks = [(to_blocks(p, block_size).astype(np.int64), to_blocks(e, block_size).astype(np.int64))
              for _, p, e in pairs]
    changed = np.zeros(block_size * block_size * CHANNELS, dtype=bool)
    for bp, be in blocks:
        changed |= (bp != be).any(axis=0)
    return blocks, changed
