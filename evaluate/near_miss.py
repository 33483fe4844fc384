"""Near-miss keys: keys at a chosen distance from the correct one, to see whether the model's
accuracy falls off a cliff (good) or degrades smoothly (a hill-climbing attack can find the key).

Distance: for SHF, the number of transpositions separating two permutations (k disjoint
transpositions of the correct permutation are at distance k); for NP/FFX, the number of
selected positions swapped with unselected ones (the mask keeps its size, ``keys.mask_size``;
FFX keeps its table).  Keys are built from the correct key's material, so explicit keys
(recovered or imported) get near-miss keys of their own shape too.
"""

from __future__ import annotations

import hashlib

import numpy as np

from keyshard import keys
from keyshard.errors import KeyshardError
from keyshard.keys import KeyMaterial

# The most near-miss keys per distance (``evaluate --near-miss-keys``): "several keys per
# distance", each built at once (at M=256 an SHF key is a 196,608-entry permutation).
MAX_KEYS_PER_DISTANCE = 100


def max_distance(material: KeyMaterial) -> int:
    if material.method == "shf":
        return material.perm.size // 2
    selected = keys.mask_size(material)
    return min(selected, material.mask.size - selected)


def distance(a: KeyMaterial, b: KeyMaterial) -> int:
    """Transposition distance (SHF) or number of swapped selected positions (NP/FFX)."""
    if a.method == "shf":
        relative = a.perm[np.argsort(b.perm)]  # a ∘ b⁻¹; n − cycles = minimal transpositions
        seen = np.zeros(relative.size, dtype=bool)
        cycles = 0
        for start in range(relative.size):
            if not seen[start]:
                cycles += 1
                j = start
                while not seen[j]:
                    seen[j] = True
                    j = relative[j]
        return relative.size - cycles
    return int((a.mask & ~b.mask).sum())


def near_miss_keys(correct: keys.Key, d: int, count: int, seed: int) -> list[keys.Key]:
    """``count`` distinct explicit keys at distance exactly ``d`` from ``correct``, from ``seed``."""
    base = correct.material
    limit = max_distance(base)
    if not 1 <= d <= limit:
        raise KeyshardError(f"--near-miss distance {d} is outside 1..{limit} for {base.method} M={base.block_size}")
    rng = np.random.default_rng([seed, d, 99])
    out, seen = [], set()
    for attempt in range(count * 50):
        if len(out) == count:
            break
        if base.method == "shf":
            a, b = rng.choice(base.perm.size, 2 * d, replace=False).reshape(2, d)
            perm = base.perm.copy()
            perm[a], perm[b] = base.perm[b], base.perm[a]
            material = KeyMaterial("shf", base.block_size, perm=perm)
        else:
            on = rng.choice(np.flatnonzero(base.mask), d, replace=False)
            off = rng.choice(np.flatnonzero(~base.mask), d, replace=False)
            mask = base.mask.copy()
            mask[on], mask[off] = False, True
            material = KeyMaterial(base.method, base.block_size, mask=mask, table=base.table)
        ident = material.canonical_bytes()
        if ident in seen:
            continue
        seen.add(ident)
        secret = hashlib.sha256(f"keyshard-near-miss/1|{seed}|{d}|{attempt}".encode()).digest()
        out.append(keys.Key(base.method, base.block_size, secret, explicit=material))
    if len(out) < count:
        raise KeyshardError(f"only {len(out)} distinct keys exist at distance {d}; ask for fewer --near-miss-keys")
    return out
