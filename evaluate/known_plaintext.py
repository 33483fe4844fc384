"""Known-plaintext key recovery: plain + encrypted samples of the same ids give the key away.

Every block of every image is transformed by the same position-wise map, so each pair of blocks
is an equation; each method solves its own (``Method.recover``):

* SHF: encrypted position k holds plain position perm[k].  Each position gets a signature — a
  polynomial hash of its values over all blocks seen so far — and perm[k] is the plain position
  with the same signature.  Positions whose values never differ (flat images) stay tied until
  more pairs separate them.
* NP: position k is flipped iff its encrypted value differs from the plain one (v ≠ 255 − v for
  integers), so one pair suffices.
* FFX: the mask is where values differ; the table entry of value v is the code seen wherever v
  was transformed.  Values that never occur stay unknown and get unused codes (they cannot
  matter for the data at hand).

The result is an explicit key (DESIGN.md): the material plus a fresh secret that keys only its
fingerprint.  ``pairs_needed`` is the smallest number of pairs (in sorted-id order) whose
recovered key re-encrypts *every* pair exactly.
"""

from __future__ import annotations

import secrets

import numpy as np

from keyshard import keys, methods, sources
from keyshard.errors import KeyshardError
from keyshard.manifest import Manifest, read
from keyshard.shardformat import decode_npy, stream_shard
from keyshard.transforms import compile_plan


def read_pixels(source, manifest: Manifest) -> dict[str, np.ndarray]:
    """Every sample's pixels by key, each shard streamed (local or URL) and checked."""
    out = {}
    for shard in manifest.shards:
        for key, files in stream_shard(sources.join(source, shard.file), shard.entry()):
            out[key] = decode_npy(files["img.npy"])
    return out


def matched_pairs(plain_dir, enc_dir) -> tuple[Manifest, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(encrypted manifest, [(key, plain, encrypted)]) for the sample keys both hold; refuses mismatches."""
    plain_manifest, enc_manifest = read(plain_dir), read(enc_dir)
    if not plain_manifest.encryption.plain:
        raise KeyshardError(f"{plain_dir}: is not plain (its manifest names a key); give the plain shards as `plain_dir`")
    if enc_manifest.encryption.plain:
        raise KeyshardError(f"{enc_dir}: holds plain shards; give the encrypted ones as `enc_dir`")
    if plain_manifest.image.shape != enc_manifest.image.shape:
        raise KeyshardError(f"{plain_dir}: image size differs from {enc_dir}")
    plain, enc = read_pixels(plain_dir, plain_manifest), read_pixels(enc_dir, enc_manifest)
    common = sorted(set(plain) & set(enc))
    if not common:
        raise KeyshardError(f"{plain_dir}: no sample ids in common with {enc_dir}")
    return enc_manifest, [(k, plain[k], enc[k]) for k in common]


def recover_material(method: str, m: int, pairs: list) -> tuple[methods.Material, dict, np.ndarray]:
    """Key material from (key, plain, encrypted) pairs, a summary, and a boolean array of what
    the data determine (SHF: positions that are not tied; NP: all; FFX: table values seen)."""
    return methods.get(method).recover(m, pairs)


def reproduces(material: methods.Material, pairs: list) -> int:
    """How many pairs the material re-encrypts exactly."""
    h, w, _ = pairs[0][1].shape
    plan = compile_plan(material, h, w)
    return sum(bool(np.array_equal(plan.encrypt(p), e)) for _, p, e in pairs)


def attack(plain_dir, enc_dir) -> tuple[keys.Key, dict, np.ndarray]:
    """The recovered explicit key, a report, and what the pairs used determine (see recover_material)."""
    enc_manifest, pairs = matched_pairs(plain_dir, enc_dir)
    method, m = enc_manifest.encryption.method, enc_manifest.encryption.block_size
    needed, k = None, 1
    while True:  # double the prefix until its key reproduces every pair
        material, info, determined = recover_material(method, m, pairs[:k])
        if reproduces(material, pairs) == len(pairs):
            needed = k
            break
        if k >= len(pairs):
            break
        k = min(2 * k, len(pairs))
    if needed is None:
        raise KeyshardError(f"{enc_dir}: no key of method {method} M={m} reproduces these pairs")
    lo = needed // 2 + 1 if needed > 1 else 1
    for j in range(lo, needed):  # the smallest prefix that works
        candidate, cinfo, cdetermined = recover_material(method, m, pairs[:j])
        if reproduces(candidate, pairs) == len(pairs):
            material, info, determined, needed = candidate, cinfo, cdetermined, j
            break
    key = keys.Key(method=method, block_size=m, secret=secrets.token_bytes(32), explicit=material)
    report = {"method": method, "block_size": m, "pairs_available": len(pairs), "pairs_needed": needed,
              "reproduced": len(pairs), "encrypted_key_fingerprint": enc_manifest.encryption.key_fingerprint,
              "recovered_key_fingerprint": key.fingerprint, **info}
    return key, report, determined
