"""NP, negative/positive transformation: where the key's mask is set, v → 255 − v.

The key is a mask over the 3M² block positions (exactly half of them for keys derived from a
secret: C(3M², 3M²/2) keys, 924 at M=2).  For integers 255 − v equals v XOR 255, so a compiled
key is one 0/255 image and encryption is a single XOR (its own inverse).

Ciphertext-only estimation (``estimate``): in plain images every position of a block rises and
falls with its neighbours of the same channel, so in keyed images a flipped position is
anti-correlated with the unflipped ones.  Per channel, the signs of the leading eigenvector of
the positions' correlation matrix split them into the two sets.  In photographs the three
channels also move together, which fixes their relative polarity; in images with saturated,
independently coloured objects they need not, so all four relative polarities stay candidates,
the one the cross-channel correlations favour first.  Which set is the mask cannot be told from
the data (encrypting with the complement of the mask gives the negative image,
E_m̄(x) = E_m(255 − x)), so each candidate's complement is kept too; the image prior's colours
order each pair.  A model (``attack ciphertext-only --checkpoint``) picks among all eight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keyshard.methods import Estimate, Fold, Material
from keyshard.methods.masked import (MASK_SCHEMA, MaskMethod, changed_positions, derive_mask, mask_fraction,
                                     mask_to_json)
from keyshard.keys import CHANNELS
from keyshard.transforms import IMAGENET_MEAN, IMAGENET_STD, Plan, block_coords, expand, patch_positions, to_blocks


@dataclass(frozen=True, eq=False)
class NpMaterial(Material):
    method = "np"
    mask: np.ndarray  # bool, True where the value is flipped

    def canonical_bytes(self) -> bytes:
        return b"mask" + np.packbits(self.mask.astype(np.uint8)).tobytes()


class NpPlan(Plan):
    """A uint8 0/255 image: ``out = x ^ xor`` both ways."""

    method = "np"

    def __init__(self, height: int, width: int, xor: np.ndarray):
        super().__init__(height, width)
        self.xor = xor

    def _apply_flat(self, flat, forward):
        return flat ^ self.xor.reshape(-1)

    def _torch_arrays(self):
        return {"xor": self.xor}

    @staticmethod
    def _torch_flat(t, flat, forward):
        import torch

        return torch.bitwise_xor(flat, t["xor"].reshape(-1))


class Np(MaskMethod):
    name = "np"
    summary = "negative/positive flipping"
    Material = NpMaterial
    material_required = ("mask",)
    material_schema = {"mask": MASK_SCHEMA}

    def derive(self, key):
        return NpMaterial(key.block_size, derive_mask(key))

    def material_from_json(self, block_size, doc, where):
        return NpMaterial(block_size, self._check_mask(block_size, doc["mask"], where))

    def material_to_json(self, material):
        return {"mask": mask_to_json(material.mask)}

    def compile(self, material, height, width):
        mask_img = expand(material.mask, height, width, material.block_size)
        return NpPlan(height, width, np.where(mask_img, 255, 0).astype(np.uint8))

    def recover(self, block_size, pairs):
        """Position k is flipped iff its encrypted value differs (v ≠ 255 − v): one pair suffices."""
        _, changed = changed_positions(block_size, pairs)
        return NpMaterial(block_size, changed), {}, np.ones(changed.size, dtype=bool)

    def estimate(self, block_size, images, prior, rng, password=None, progress=None):
        """Eight candidate masks from keyed images alone (module doc): each channel's flips up to
        sign, under the four relative polarities of the channels, and their complements; the
        polarity the cross-channel correlations favour first, each complement pair ordered by
        how photo-like the decrypted colours are."""
        z = _standardised_blocks(images, block_size)
        columns = _channel_columns(block_size)
        signs = [np.where(_leading_vector(z, cols) < 0, -1.0, 1.0) for cols in columns]
        agreement = _polarity_agreement(z, columns, signs)
        h, w = images[0].shape[:2]
        pairs = []  # (fit, [(colour distance, candidate), its complement's]) per relative polarity
        for flips in ((1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1)):
            mask = np.empty(CHANNELS * block_size * block_size, dtype=bool)
            for cols, sign, flip in zip(columns, signs, flips):
                mask[cols] = sign * flip < 0
            fit = sum(agreement[a, b] * flips[a] * flips[b] for a, b in ((0, 1), (0, 2), (1, 2)))
            pair = [(prior.colour_distance([self.compile(c, h, w).decrypt(x) for x in images[:16]]), c)
                    for c in (NpMaterial(block_size, mask), NpMaterial(block_size, ~mask))]
            pairs.append((fit, sorted(pair, key=lambda t: t[0])))
        pairs.sort(key=lambda t: -t[0])  # stable: equal fits keep their order, each pair stays together
        ranked = [t for _, pair in pairs for t in pair]
        return Estimate(tuple(c for _, c in ranked), {
            "candidates": "each channel's flips under the four relative polarities of the channels, and their "
                          "complements (the data cannot tell a mask from its complement)",
            "chosen_by": "cross-channel correlation, then the colour prior",
            "polarity_agreement": [round(f, 3) for f, _ in pairs],
            "colour_distance": [round(d, 3) for d, _ in ranked]})

    def estimate_score(self, estimated, truth):
        """Positions right, and right up to complement (what the data alone can give)."""
        right = mask_fraction(estimated.mask, truth.mask)
        return {"key_fraction": right, "key_fraction_up_to_complement": max(right, 1.0 - right)}

    def fold(self, material, size):
        """Each value stays in place; where flipped, ``a = −1`` and ``offset = (1 − 2·mean[c]) / std[c]``."""
        c, y, x, k = patch_positions(size, material.block_size)
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        flip = material.mask[k]
        return Fold((c, y, x), np.where(flip, -1.0, 1.0), np.where(flip, (1 - 2 * mean[c]) / std[c], 0.0))

    def onnx_transform(self, material, height, width):
        """One BitwiseXor with the plan's 0/255 image (broadcast over the batch)."""
        from onnx import helper

        from keyshard.methods.onnx_graph import INPUT, OUTPUT, transform_graph

        xor = self.compile(material, height, width).xor
        nodes = [helper.make_node("BitwiseXor", [INPUT, "xor"], [OUTPUT])]
        return transform_graph("keyshard_np", nodes, {"xor": xor}, height, width, np.uint8)


def _channel_columns(m: int) -> list[np.ndarray]:
    """The block positions of each channel, in the flattening order of ``keyshard.transforms``."""
    channel = block_coords(np.arange(CHANNELS * m * m), m)[2]
    return [np.flatnonzero(channel == c) for c in range(CHANNELS)]


def _standardised_blocks(images, m: int) -> list[np.ndarray]:
    """Every image's blocks as rows, each position standardised over all blocks of all images."""
    blocks = [to_blocks(x, m).astype(np.float32) for x in images]
    count = sum(len(b) for b in blocks)
    mean = sum(b.sum(0, dtype=np.float64) for b in blocks) / count
    var = sum(((b - mean) ** 2).sum(0, dtype=np.float64) for b in blocks) / count
    scale = 1.0 / np.sqrt(np.maximum(var, 1e-9))
    return [((b - mean) * scale).astype(np.float32) for b in blocks]


def _leading_vector(z: list[np.ndarray], cols: np.ndarray, iterations: int = 60) -> np.ndarray:
    """The leading eigenvector of the correlation matrix of the positions ``cols``, by power
    iteration over the standardised blocks (never forming the matrix)."""
    zs = [zi[:, cols] for zi in z]
    v = sum((zi.T @ zi[:, 0]).astype(np.float64) for zi in zs)  # the first position's correlations: a
    for _ in range(iterations):                                  # start never orthogonal to the answer
        v /= np.linalg.norm(v) or 1.0
        v = sum((zi.T @ (zi @ v.astype(np.float32))).astype(np.float64) for zi in zs)
    return v if v.sum() >= 0 else -v


def _polarity_agreement(z: list[np.ndarray], columns: list[np.ndarray], signs: list[np.ndarray]) -> np.ndarray:
    """agreement[a, b]: how strongly channel a's positions (``columns[a]``), each turned by its
    sign, move with channel b's (the correlation of the two channels' sign-corrected block sums)."""
    sums = [np.concatenate([zi[:, c] @ s.astype(np.float32) for zi in z]).astype(np.float64)
            for c, s in zip(columns, signs)]
    return np.array([[float(np.mean(a * b)) for b in sums] for a in sums])


METHOD = Np()
