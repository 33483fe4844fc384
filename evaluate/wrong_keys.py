"""Random wrong keys for the audit: reproducible from a seed, never the correct key, all distinct.

Wrong keys follow the correct key's derivation rule (a ``reference_seed`` key gets
reference-style masks with 3M²/2 − 1 positions; a secret key gets exactly-half masks), have its
method and block size, and — for FFX — keep its password and vary only the mask, as in the
paper (the worst case: protection by the mask alone).  ``randomize_password`` varies it too.
"""

from __future__ import annotations

import hashlib

import numpy as np

from keyshard import keys
from keyshard.errors import KeyshardError


def _secret(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"keyshard-wrong-key/1|{seed}|{index}".encode()).digest()


def draw(correct: keys.Key, count: int, seed: int, randomize_password: bool = False,
         max_tries_factor: int = 50) -> list[keys.Key]:
    """``count`` keys ≠ ``correct`` and ≠ each other, drawn from ``seed`` only."""
    space = correct.keyspace_count()
    if space is not None and count > space - 1:
        raise KeyshardError(f"--wrong-keys {count} exceeds the {space - 1} other keys of "
                            f"{correct.method} M={correct.block_size}")
    reference = correct.reference_seed is not None
    rng = np.random.default_rng([seed, 4242])
    password = None
    if correct.method == "ffx" and not randomize_password:
        password = correct.password
    taken = {correct.material.canonical_bytes()}
    out: list[keys.Key] = []
    index = 0
    while len(out) < count:
        if index > count * max_tries_factor:
            raise KeyshardError(f"could not draw {count} distinct wrong keys")
        candidate = keys.Key(
            method=correct.method, block_size=correct.block_size, secret=_secret(seed, index),
            reference_seed=int(rng.integers(0, 2**62)) if reference else None,
            ffx_password=password if correct.method == "ffx" else None)
        index += 1
        ident = candidate.material.canonical_bytes()
        if ident in taken:
            continue
        taken.add(ident)
        out.append(candidate)
    return out
