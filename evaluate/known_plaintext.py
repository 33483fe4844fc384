"""Known-plaintext key recovery: plain + encrypted samples of the same ids give the key away.

Every block of every image is transformed by the same position-wise map, so each pair of blocks
is an equation:

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

from keyshard import keys, sources
from keyshard.errors import KeyshardError
from keyshard.keys import CHANNELS, KeyMaterial
from keyshard.pipeline.manifest import load as load_manifest
from keyshard.shardformat import decode_npy, stream_shard
from keyshard.transforms import compile_plan

_P = np.uint64(1099511628211)  # FNV prime: multiplier of the per-position rolling hash


def read_pixels(source, manifest: dict) -> dict[str, np.ndarray]:
    """Every sample's pixels by key, each shard streamed (local or URL) and checked."""
    out = {}
    for shard in manifest["shards"]:
        for key, files in stream_shard(sources.join(source, shard["file"]), shard):
            out[key] = decode_npy(files["img.npy"])
    return out


def to_blocks(x: np.ndarray, m: int) -> np.ndarray:
    """(H, W, 3) → (blocks, 3M²) in the transforms' (row, column, channel) order."""
    h, w, _ = x.shape
    return x.reshape(h // m, m, w // m, m, CHANNELS).transpose(0, 2, 1, 3, 4).reshape(-1, m * m * CHANNELS)


def matched_pairs(plain_dir, enc_dir) -> tuple[dict, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(encrypted manifest, [(key, plain, encrypted)]) for the sample keys both hold; refuses mismatches."""
    plain_doc, enc_doc = load_manifest(plain_dir), load_manifest(enc_dir)
    if not plain_doc["encryption"]["plain"]:
        raise KeyshardError(f"{plain_dir}: is not plain (its manifest names a key); give the plain shards as --plain")
    if enc_doc["encryption"]["plain"]:
        raise KeyshardError(f"{enc_dir}: holds plain shards; give the encrypted ones as --encrypted")
    if plain_doc["image"]["height"] != enc_doc["image"]["height"] or plain_doc["image"]["width"] != enc_doc["image"]["width"]:
        raise KeyshardError(f"{plain_dir}: image size differs from {enc_dir}")
    plain, enc = read_pixels(plain_dir, plain_doc), read_pixels(enc_dir, enc_doc)
    common = sorted(set(plain) & set(enc))
    if not common:
        raise KeyshardError(f"{plain_dir}: no sample ids in common with {enc_dir}")
    return enc_doc, [(k, plain[k], enc[k]) for k in common]


def recover_material(method: str, m: int, pairs: list) -> tuple[KeyMaterial, dict, np.ndarray]:
    """Key material from (key, plain, encrypted) pairs, a summary, and a boolean array of what
    the data determine: SHF positions that are not tied, NP positions (all), FFX table values seen."""
    n = m * m * CHANNELS
    if method == "shf":
        sig_p = np.zeros(n, dtype=np.uint64)
        sig_e = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for _, plain, enc in pairs:
                for blocks, sig in ((to_blocks(plain, m), sig_p), (to_blocks(enc, m), sig_e)):
                    for row in blocks.astype(np.uint64):  # sig = sig * P + value, mod 2**64
                        sig *= _P
                        sig += row + np.uint64(1)
        order_p = np.argsort(sig_p, kind="stable")
        order_e = np.argsort(sig_e, kind="stable")
        if not np.array_equal(sig_p[order_p], sig_e[order_e]):
            raise KeyshardError("the encrypted samples are not a pixel shuffle of the plain ones "
                                "(different images, replicas or method)")
        perm = np.empty(n, dtype=np.int64)
        perm[order_e] = order_p  # equal signatures matched in index order; ties are arbitrary
        _, inverse, counts = np.unique(sig_e, return_inverse=True, return_counts=True)
        determined = counts[inverse] == 1
        return KeyMaterial("shf", m, perm=perm), {"tied_positions": int((~determined).sum())}, determined
    blocks = [(to_blocks(p, m).astype(np.int64), to_blocks(e, m).astype(np.int64)) for _, p, e in pairs]
    changed = np.zeros(n, dtype=bool)
    for bp, be in blocks:
        changed |= (bp != be).any(axis=0)
    table = np.full(256, -1, dtype=np.int64)
    if method == "ffx":  # second pass: every value at a transformed position, fixed points included
        for bp, be in blocks:
            values, codes = bp[:, changed].reshape(-1), be[:, changed].reshape(-1)
            known = table[values]
            if ((known >= 0) & (known != codes)).any():
                raise KeyshardError("the encrypted samples are not one FFX table applied to the plain ones")
            table[values] = codes
    if method == "np":
        return KeyMaterial("np", m, mask=changed), {}, np.ones(n, dtype=bool)
    known = table >= 0
    unused = np.setdiff1d(np.arange(1000), table[known])
    table[~known] = unused[: int((~known).sum())]
    material = KeyMaterial("ffx", m, mask=changed, table=table.astype(np.uint16))
    return material, {"table_entries_known": int(known.sum())}, known


def reproduces(material: KeyMaterial, pairs: list) -> int:
    """How many pairs the material re-encrypts exactly."""
    h, w, _ = pairs[0][1].shape
    plan = compile_plan(material, h, w)
    return sum(bool(np.array_equal(plan.encrypt(p), e)) for _, p, e in pairs)


def attack(plain_dir, enc_dir) -> tuple[keys.Key, dict, np.ndarray]:
    """The recovered explicit key, a report, and what the pairs used determine (see recover_material)."""
    enc_doc, pairs = matched_pairs(plain_dir, enc_dir)
    method, m = enc_doc["encryption"]["method"], enc_doc["encryption"]["block_size"]
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
              "reproduced": len(pairs), "encrypted_key_fingerprint": enc_doc["encryption"]["key_fingerprint"],
              "recovered_key_fingerprint": key.fingerprint, **info}
    return key, report, determined
