"""FFX, format-preserving encryption of values: where the key's mask is set, v → table[v].

The table is ``pyffx.Integer(password, length=3).encrypt(v)`` for v in 0..255 (codes 0..999),
stored as uint16; the model divides by max(table), as the reference code does.  The password
comes from the key file (``ffx_password``; the paper used one fixed password) or is derived from
the secret.  The key space counts masks only: the attacker is assumed to know the password, the
paper's setting and the worst case; wrong keys keep the correct key's table likewise.  A compiled
key is one base image (0, or 256 where the mask is set) and a 2×256 lookup table: encryption is a
single gather, ``out = lut[base + x]``.  FFX is not affine in the pixel value: it cannot be folded.

Ciphertext-only estimation (``estimate``): codes above 255 occur only where the mask is set, so
with enough blocks the mask is read off the keyed images.  Where it is not set the plain value
is in the clear, so each code is seen next to plain values; a code stands for the value its
neighbours suggest most often, and the Hungarian algorithm (scipy's ``linear_sum_assignment``)
makes the codes-to-values assignment one-to-one.  A second round predicts each masked value from
all its neighbours, decoded with the first round's table.  With the password known (the paper's
fixed password) the table is simply the password's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keyshard import keys
from keyshard.errors import KeyshardError
from keyshard.methods import Estimate, Material
from keyshard.methods.masked import (MASK_SCHEMA, MaskMethod, changed_positions, derive_mask, mask_fraction,
                                     mask_to_json)
from keyshard.transforms import Plan, expand, to_blocks

_NOT_A_CODE = "value is not an FFX code of this key (wrong key or corrupt data)"


@dataclass(frozen=True, eq=False)
class FfxMaterial(Material):
    method = "ffx"
    mask: np.ndarray   # bool, True where the value is replaced by its code
    table: np.ndarray  # uint16 code of each value 0..255

    @property
    def divisor(self) -> int:
        return int(self.table.max())

    def canonical_bytes(self) -> bytes:
        return (b"mask" + np.packbits(self.mask.astype(np.uint8)).tobytes() + b"|"
                + b"table" + self.table.astype("<u2").tobytes())


class FfxPlan(Plan):
    """Forward: ``lut[fwd_base + x]``; inverse: ``inv_lut[inv_base + y]`` (-1 marks impossible codes)."""

    method = "ffx"
    out_dtype = np.uint16

    def __init__(self, height, width, fwd_base, inv_base, lut, inv_lut):
        super().__init__(height, width)
        self.fwd_base, self.inv_base, self.lut, self.inv_lut = fwd_base, inv_base, lut, inv_lut

    def _apply_flat(self, flat, forward):
        if forward:  # uint16 index arithmetic: half the cost of an intp index
            return np.take(self.lut.reshape(-1), self.fwd_base.reshape(-1) + flat)
        out = np.take(self.inv_lut.reshape(-1), self.inv_base.reshape(-1) + flat)
        if (out < 0).any():
            raise ValueError(_NOT_A_CODE)
        return out.astype(np.uint8)

    def _torch_arrays(self):
        # index arithmetic in torch wants int64; torch's uint16 lacks indexing kernels on some devices
        return {"fwd_base": self.fwd_base.astype(np.int64), "inv_base": self.inv_base.astype(np.int64),
                "lut": self.lut.astype(np.int32), "inv_lut": self.inv_lut}

    @staticmethod
    def _torch_flat(t, flat, forward):
        import torch

        if forward:
            return t["lut"].reshape(-1)[t["fwd_base"].reshape(-1) + flat.long()]
        out = t["inv_lut"].reshape(-1)[t["inv_base"].reshape(-1) + flat.long()]
        if bool((out < 0).any()):
            raise ValueError(_NOT_A_CODE)
        return out.to(torch.uint8)


class Ffx(MaskMethod):
    name = "ffx"
    summary = "FFX format-preserving encryption"
    Material = FfxMaterial
    storage_dtype = np.uint16
    takes_password = True
    keyspace_note = " (masks; FFX password assumed known, the paper's setting)"
    material_required = ("mask", "table")
    material_schema = {"mask": MASK_SCHEMA, "table": {
        "description": "FFX: the code of each value 0..255; 256 distinct codes in 0..999.",
        "type": "array", "minItems": 256, "maxItems": 256,
        "items": {"type": "integer", "minimum": 0, "maximum": 999}, "uniqueItems": True}}
    key_fields = {"ffx_password": {
        "description": "FFX only: the password of the FFX table (text; bytes that are not UTF-8 are stored as "
                       "lone surrogates \\udc80..\\udcff). Without it the password is derived from the secret.",
        "type": "string", "minLength": 1, "maxLength": keys.MAX_FFX_PASSWORD_BYTES}}

    def derive(self, key):
        return FfxMaterial(key.block_size, derive_mask(key), keys.ffx_table(key.password))

    def material_from_json(self, block_size, doc, where):
        return FfxMaterial(block_size, self._check_mask(block_size, doc["mask"], where),
                           np.asarray(doc["table"], dtype=np.uint16))

    def material_to_json(self, material):
        return {"mask": mask_to_json(material.mask), "table": material.table.tolist()}

    def compile(self, material, height, width):
        table = material.table.astype(np.uint16)
        lut = np.stack([np.arange(256, dtype=np.uint16), table])
        inv_lut = np.full((2, 1000), -1, dtype=np.int16)
        inv_lut[0, :256] = np.arange(256)
        inv_lut[1, table] = np.arange(256)
        row = expand(material.mask, height, width, material.block_size).astype(np.uint16)
        return FfxPlan(height, width, row * 256, row * 1000, lut, inv_lut)

    def describe(self, material):
        return super().describe(material) + [("pixel divisor", str(material.divisor))]

    def onnx_transform(self, material, height, width):
        """The numpy plan's gather: ``keyed = lut.reshape(-1)[fwd_base + pixels]`` (uint16 codes)."""
        from onnx import TensorProto, helper

        from keyshard.methods.onnx_graph import INPUT, OUTPUT, transform_graph

        plan = self.compile(material, height, width)
        nodes = [helper.make_node("Cast", [INPUT], ["wide"], to=TensorProto.INT32),
                 helper.make_node("Add", ["wide", "base"], ["index"]),
                 helper.make_node("Gather", ["lut", "index"], [OUTPUT], axis=0)]
        consts = {"lut": plan.lut.reshape(-1), "base": plan.fwd_base.astype(np.int32)}
        return transform_graph("keyshard_ffx", nodes, consts, height, width, self.storage_dtype)

    def estimate(self, block_size, images, prior, rng, password=None, progress=None):
        """The mask read off the codes, the table from the codes' neighbours (module doc), or
        the password's table when it is known."""
        mask = _mask_from_codes(images, block_size)
        if password is not None:
            table, notes = keys.ffx_table(password), {"table": "from the known password"}
        else:
            mask_img = expand(mask, *images[0].shape[:2], block_size)
            table, seen = _estimate_table(images, mask_img)
            notes = {"table": "estimated (password unknown)", "codes_seen": seen}
        return Estimate((FfxMaterial(block_size, mask, np.asarray(table, dtype=np.uint16)),),
                        {"mask_positions": int(mask.sum()), **notes})

    def estimate_score(self, estimated, truth):
        """Mask positions right, table entries right, and both together (3M² + 256 entries)."""
        mask, table = mask_fraction(estimated.mask, truth.mask), float(np.mean(estimated.table == truth.table))
        n = truth.mask.size
        return {"key_fraction": (mask * n + table * 256) / (n + 256), "mask_fraction": mask, "table_fraction": table}

    def wrong_material(self, base, secret, vary_password):
        """A random mask; the key's own table, or with ``vary_password`` that of the secret's password."""
        table = keys.ffx_table(keys.Key(self.name, base.block_size, secret).password) if vary_password else base.table
        return FfxMaterial(base.block_size, self.wrong_mask(base, secret), table)

    def wrong_rule(self, base, vary_password):
        return super().wrong_rule(base, vary_password) + ("" if vary_password else ", the key's FFX table")

    def recover(self, block_size, pairs):
        """The mask is where values differ; the code of value v is what is seen wherever v was
        transformed.  Values never seen get unused codes (they cannot matter for the data at hand)."""
        blocks, changed = changed_positions(block_size, pairs)
        table = np.full(256, -1, dtype=np.int64)
        for bp, be in blocks:  # every value at a transformed position, fixed points included
            values, codes = bp[:, changed].reshape(-1), be[:, changed].reshape(-1)
            known = table[values]
            if ((known >= 0) & (known != codes)).any():
                raise KeyshardError("the encrypted samples are not one FFX table applied to the plain ones")
            table[values] = codes
        known = table >= 0
        unused = np.setdiff1d(np.arange(1000), table[known])
        table[~known] = unused[: int((~known).sum())]
        return FfxMaterial(block_size, changed, table.astype(np.uint16)), {"table_entries_known": int(known.sum())}, known

    def compare(self, recovered, truth, determined):
        return {**super().compare(recovered, truth, determined),
                "true_table_equal_where_known": bool(np.array_equal(recovered.table[determined], truth.table[determined]))}


def _mask_from_codes(images, m: int) -> np.ndarray:
    """The positions where some keyed value is above 255: only a code can be."""
    seen = np.zeros(m * m * 3, dtype=bool)
    for x in images:
        seen |= (to_blocks(x, m) > 255).any(axis=0)
    return seen


def _neighbour_means(img: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel and channel: the sum and count of its known 4-neighbours' values."""
    v, k = np.where(known, img, 0.0), known.astype(np.float64)
    total, count = np.zeros_like(v), np.zeros_like(v)
    for src, dst in (((slice(None, -1),), (slice(1, None),)), ((slice(1, None),), (slice(None, -1),)),
                     ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                     ((slice(None), slice(1, None)), (slice(None), slice(None, -1)))):
        total[dst] += v[src]
        count[dst] += k[src]
    return total, count


_VALUES = np.arange(256)
# What P(neighbours suggest u | value v) is before the images say otherwise: 1e5 pseudo-observations
# per value, spread as 0.001 + exp(-|u - v| / 4) (heavy tails: an edge or texture can suggest
# anything); the images' own clear values add to it.  On scikit-image's photos
# (benchmarks/bench_ciphertext_only.py, FFX M=2, pixels exact from 1 / 4 / 16 / 64 images) this
# gave 92.7 / 99.9 / 99.5 / 100 %, against 95.8 / 99.9 / 99.3 / 98.9 % for the kernel alone.
_KERNEL = 1e-3 + np.exp(-np.abs(_VALUES[:, None] - _VALUES[None, :]) / 4.0)
_KERNEL *= 1e5 / _KERNEL.sum(1, keepdims=True)


def _neighbour_counts(images, mask_img, row, decoded):
    """(codes × 256, 256 × 256) counts of what the neighbours suggest (their rounded mean): beside
    each code at a masked position, and beside each plain value at an unmasked one.  Neighbours
    are the plain values only (``decoded`` None), or every value, codes decoded with ``decoded``."""
    beside_codes, beside_values = np.zeros((len(decoded) if decoded is not None else row.max() + 1, 256)), \
        np.zeros((256, 256))
    for x in images:
        if decoded is None:
            img, known = x.astype(np.float64), ~mask_img
        else:
            img, known = np.where(mask_img, decoded[row[np.minimum(x, 999)]], x).astype(np.float64), \
                np.ones_like(mask_img)
        total, count = _neighbour_means(img, known)
        guess = np.clip(np.rint(total / np.maximum(count, 1)), 0, 255).astype(np.int64)
        at_codes, at_values = mask_img & (count > 0), ~mask_img & (count > 0)
        np.add.at(beside_codes, (row[x[at_codes]], guess[at_codes]), 1)
        np.add.at(beside_values, (x[at_values].astype(np.int64), guess[at_values]), 1)
    return beside_codes, beside_values


def _estimate_table(images, mask_img: np.ndarray, rounds: int = 2) -> tuple[np.ndarray, int]:
    """The code of each value 0..255 (module doc) and how many distinct codes were seen.

    A code stands for the value v that best explains what its neighbours suggest, by the
    likelihood P(suggested u | value v) learnt from the same images where values are in the clear
    (unmasked positions), so no assumption about the images is needed."""
    from scipy.optimize import linear_sum_assignment  # scipy only when estimating: start-up matters

    codes = np.unique(np.concatenate([x[mask_img] for x in images]))
    if len(codes) > 256:
        raise KeyshardError(f"{len(codes)} distinct codes at the masked positions: not one FFX table")
    row = np.full(1000, -1)
    row[codes] = np.arange(len(codes))
    decoded = None
    for _ in range(rounds):
        beside_codes, beside_values = _neighbour_counts(images, mask_img, row, decoded)
        likelihood = (beside_values + _KERNEL) / (beside_values.sum(1, keepdims=True) + _KERNEL.sum(1, keepdims=True))
        r, c = linear_sum_assignment(-beside_codes @ np.log(likelihood).T)
        decoded = np.zeros(len(codes), dtype=np.int64)
        decoded[r] = c
    table = np.full(256, -1, dtype=np.int64)
    table[decoded] = codes
    unused = np.setdiff1d(np.arange(1000), codes)  # values never seen: the smallest unused codes
    table[table < 0] = unused[: int((table < 0).sum())]
    return table.astype(np.uint16), len(codes)


METHOD = Ffx()
