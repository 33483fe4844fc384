"""Near-miss keys: keys at a chosen distance from the correct one, to see whether the model's
accuracy falls off a cliff (good) or degrades smoothly (a hill-climbing attack can find the key).

Distance: for SHF, the number of transpositions separating two permutations (k disjoint
transpositions of the correct permutation are at distance k); for NP/FFX, the number of
selected positions swapped with unselected ones (the mask keeps its size; FFX keeps its table);
each method defines its own (``Method.distance`` / ``near_miss``).  Keys are built from the
correct key's material, so explicit keys (recovered or imported) get near-miss keys of their
own shape too.
"""

from __future__ import annotations


import numpy as np

from keyshard import keys, methods, seeded
from keyshard.errors import KeyshardError

# The most near-miss keys per distance (``evaluate --near-miss-keys``): "several keys per
# distance", each built at once (at M=256 an SHF key is a 196,608-entry permutation).
MAX_KEYS_PER_DISTANCE = 100


def max_distance(material: methods.Material) -> int:
    """The largest distance a key of this kind can have from ``material``."""
    return methods.get(material.method).max_distance(material)


def distance(a: methods.Material, b: methods.Material) -> int:
    """The method's distance: transpositions (SHF), swapped selected positions (NP/FFX), ..."""
    return methods.get(a.method).distance(a, b)


def near_miss_keys(correct: keys.Key, d: int, count: int, seed: int) -> list[keys.Key]:
    """``count`` distinct explicit keys at distance exactly ``d`` from ``correct``, from ``seed``."""
    base, method = correct.material, methods.get(correct.method)
    limit = method.max_distance(base)
    if not 1 <= d <= limit:
        raise KeyshardError(f"`near_miss` distance {d} is outside 1..{limit} for {correct.method} M={base.block_size}")
    rng = np.random.default_rng([seed, d, 99])
    out, seen = [], set()
    for attempt in range(count * 50):
        if len(out) == count:
            break
        material = method.near_miss(base, d, rng)
        ident = material.canonical_bytes()
        if ident in seen:
            continue
        seen.add(ident)
        secret = seeded.public_secret("near-miss", seed, d, attempt)
        out.append(keys.Key(correct.method, base.block_size, secret, explicit=material))
    if len(out) < count:
        raise KeyshardError(f"only {len(out)} distinct keys exist at distance {d}; ask for fewer `near_miss_count`")
    return out
