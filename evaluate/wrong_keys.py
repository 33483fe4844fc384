"""Random wrong keys for the audit: reproducible from a seed, never the correct key, all distinct.

Wrong keys follow the correct key's own material, whatever kind of key it is (derived from a
secret, from a ``reference_seed``, or explicit — recovered by an attack or imported): same
method and block size, and the method's ``wrong_material`` draws the rest by the key's own rules:

* SHF: a uniformly random permutation of the same 3M² positions;
* NP/FFX: a uniformly random mask selecting as many positions as the correct key's mask
  (``methods.masked.mask_size``: half of 3M² for secret keys, one fewer for reference-seed keys,
  whatever an explicit key holds);
* FFX: the correct key's own table — the paper's setting, protection by the mask alone (the
  worst case).  ``randomize_password`` gives each wrong key the table of its own random password
  (for methods whose keys take a password).

Candidate ``index`` uses the secret ``sha256("keyshard-wrong-key/1|<seed>|<index>")`` and the
documented ``keyshard-shake256/1`` shuffles (``keys.fisher_yates``): the SHF permutation is that
secret's, a mask selects the first ``mask_size`` entries of its ``mask-order`` shuffle, and a
randomized FFX password is that secret's derived password.  So for a secret-derived correct key
the wrong keys' material is exactly what those secrets derive; for every kind they are uniform over
the masks/permutations of the correct key's shape, identical on every machine and library
version, and depend on the correct key only through the candidates they must skip.  Each is
returned as an explicit key whose fingerprint is keyed by its secret.
"""

from __future__ import annotations

import hashlib

from keyshard import keys, methods, seeded
from keyshard.errors import KeyshardError


def _secret(seed: int, index: int) -> bytes:
    return seeded.public_secret("wrong-key", seed, index)


def rule(correct: keys.Key, randomize_password: bool = False) -> str:
    """What the wrong keys of ``correct`` are, in words (the audit's ``wrong_keys.rule``).

    With ``randomize_password`` the FFX part is left out: the audit records that flag beside the
    rule and the report appends "random FFX passwords".
    """
    return methods.get(correct.method).wrong_rule(correct.material, randomize_password)


# The most wrong keys one audit may ask for (``evaluate --wrong-keys``, ``demo --wrong-keys``).
# Above it an audit is hours of model time per thousand test images on any machine; the keys
# themselves are drawn and scored a chunk at a time (``iter_draw``), so memory does not grow.
MAX_COUNT = 10_000


def draw(correct: keys.Key, count: int, seed: int, randomize_password: bool = False,
         max_tries_factor: int = 50) -> list[keys.Key]:
    """``count`` keys ≠ ``correct`` and ≠ each other, following its material, drawn from ``seed``."""
    return list(iter_draw(correct, count, seed, randomize_password, max_tries_factor))


def iter_draw(correct: keys.Key, count: int, seed: int, randomize_password: bool = False,
              max_tries_factor: int = 50):
    """``draw`` one key at a time: the same keys in the same order, and only a 32-byte digest of
    each kept to check distinctness, so memory stays flat whatever ``count`` (at M=256 one SHF
    key is a 196,608-entry permutation).  Refusals (too many keys) happen here, before the first
    key is made."""
    base = correct.material
    if count > MAX_COUNT:
        raise KeyshardError(f"`wrong_keys={count}`: at most {MAX_COUNT} wrong keys per audit")
    vary_table = randomize_password and methods.get(correct.method).takes_password
    if not vary_table:  # otherwise the table varies too and the space is far larger
        space = correct.keyspace_count()
        if space is not None and count > space - 1:
            raise KeyshardError(f"`wrong_keys={count}` exceeds the {space - 1} other keys of "
                                f"{correct.method} M={correct.block_size}")
    return _draw(correct, count, seed, vary_table, max_tries_factor)


def _digest(material: methods.Material) -> bytes:
    return hashlib.sha256(material.canonical_bytes()).digest()


def _draw(correct: keys.Key, count: int, seed: int, vary_table: bool, max_tries_factor: int):
    base, method = correct.material, methods.get(correct.method)
    taken = {_digest(base)}
    made = 0
    index = 0
    while made < count:
        if index > count * max_tries_factor:
            raise KeyshardError(f"could not draw {count} distinct wrong keys")
        secret = _secret(seed, index)
        index += 1
        material = method.wrong_material(base, secret, vary_table)
        ident = _digest(material)
        if ident in taken:
            continue
        taken.add(ident)
        made += 1
        yield keys.Key(method=correct.method, block_size=base.block_size, secret=secret, explicit=material)
