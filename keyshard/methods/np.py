"""NP, negative/positive transformation: where the key's mask is set, v → 255 − v.

The key is a mask over the 3M² block positions (exactly half of them for keys derived from a
secret: C(3M², 3M²/2) keys, 924 at M=2).  For integers 255 − v equals v XOR 255, so a compiled
key is one 0/255 image and encryption is a single XOR (its own inverse).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keyshard.methods import Fold, Material
from keyshard.methods.masked import MASK_SCHEMA, MaskMethod, changed_positions, derive_mask, mask_to_json
from keyshard.transforms import IMAGENET_MEAN, IMAGENET_STD, Plan, expand, patch_positions


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


METHOD = Np()
