"""NP, negative/positive transformation: where the key's mask is set, v → 255 − v.

The key is a mask over the 3M² block positions (exactly half of them for keys derived from a
secret: C(3M², 3M²/2) keys, 924 at M=2).  For integers 255 − v equals v XOR 255, so a compiled
key is one 0/255 image and encryption is a single XOR (its own inverse).

Ciphertext-only estimation (``estimate``): in plain photographs every position of a block rises
and falls with the others, so in keyed images a flipped position is anti-correlated with the
unflipped ones.  The signs of the leading eigenvector of the positions' correlation matrix split
them into the two sets.  Which set is the mask cannot be told from the data (encrypting with the
complement of the mask gives the negative image, E_m̄(x) = E_m(255 − x)), so both are kept; the
image prior's colours order them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keyshard.methods import Estimate, Fold, Material
from keyshard.methods.masked import (MASK_SCHEMA, MaskMethod, changed_positions, derive_mask, mask_fraction,
                                     mask_to_json)
from keyshard.transforms import IMAGENET_MEAN, IMAGENET_STD, Plan, expand, patch_positions, to_blocks


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
        """The mask and its complement from keyed images alone (module doc), the one whose
        decrypted images have the more photo-like colours first."""
        lead = _leading_vector(images, block_size)
        pair = (NpMaterial(block_size, lead < 0), NpMaterial(block_size, lead >= 0))
        h, w = images[0].shape[:2]
        distances = [prior.colour_distance([self.compile(c, h, w).decrypt(x) for x in images[:16]]) for c in pair]
        order = (0, 1) if distances[0] <= distances[1] else (1, 0)
        return Estimate(tuple(pair[i] for i in order), {
            "candidates": "the mask and its complement (the data cannot tell them apart)",
            "chosen_by": "colour prior", "colour_distance": [round(distances[i], 3) for i in order]})

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


def _leading_vector(images, m: int, iterations: int = 60) -> np.ndarray:
    """The leading eigenvector of the block positions' correlation matrix, by power iteration
    over the standardised blocks of every image (never forming the 3M² × 3M² matrix)."""
    blocks = [to_blocks(x, m).astype(np.float32) for x in images]
    count = sum(len(b) for b in blocks)
    mean = sum(b.sum(0, dtype=np.float64) for b in blocks) / count
    var = sum(((b - mean) ** 2).sum(0, dtype=np.float64) for b in blocks) / count
    scale = 1.0 / np.sqrt(np.maximum(var, 1e-9))
    z = [((b - mean) * scale).astype(np.float32) for b in blocks]
    v = sum((zi.T @ zi[:, 0]).astype(np.float64) for zi in z)  # position 0's correlations: a start
    for _ in range(iterations):                                   # never orthogonal to the answer
        v /= np.linalg.norm(v) or 1.0
        v = sum((zi.T @ (zi @ v.astype(np.float32))).astype(np.float64) for zi in z)
    return v if v.sum() >= 0 else -v


METHOD = Np()
