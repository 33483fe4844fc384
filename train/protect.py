"""``keyshard protect``: fold a key into a block-aligned model trained on plain images.

The stem is ``y = W · x + b`` over each S×S×3 patch of the normalised input.  With a key, the
normalised encrypted input at patch position p is an affine function of one plain normalised
value: ``x'_p = a_p · x_src(p) + c_p`` —

* SHF: src(p) is where the key takes p's value from (same block, in-block position perm[k]);
  values keep their 0..255 scale but may change channel, so ``a_p = std[c_src] / std[c_p]`` and
  ``c_p = (mean[c_src] − mean[c_p]) / std[c_p]``;
* NP: src(p) = p; where the key flips, ``v → 255 − v`` gives ``a_p = −1`` and
  ``c_p = (1 − 2·mean[c_p]) / std[c_p]``; elsewhere ``a_p = 1, c_p = 0``.

Choosing ``W'_p = W_src(p) / a_p`` and ``b' = b − Σ_p W'_p · c_p`` makes the protected stem give
exactly the plain stem's output on encrypted input, so the whole model's outputs agree up to
float rounding.  FFX is not affine in the pixel value and is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from keyshard.errors import KeyshardError
from keyshard.keys import CHANNELS, KeyMaterial
from keyshard.transforms import IMAGENET_MEAN, IMAGENET_STD, block_coords, block_index


def _patch_maps(material: KeyMaterial, s: int):
    """For each (channel, row, col) of an S×S patch: its source (c, y, x) and the affine (a, c)."""
    m = material.block_size
    c, y, x = np.meshgrid(np.arange(CHANNELS), np.arange(s), np.arange(s), indexing="ij")
    k = block_index(y, x, c, m)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    if material.method == "shf":
        r, col, ch = block_coords(material.perm[k], m)
        sy, sx, sc = y - y % m + r, x - x % m + col, ch
        a = std[sc] / std[c]
        off = (mean[sc] - mean[c]) / std[c]
        return (sc, sy, sx), a, off
    flip = material.mask[k]
    a = np.where(flip, -1.0, 1.0)
    off = np.where(flip, (1 - 2 * mean[c]) / std[c], 0.0)
    return (c, y, x), a, off


def protect_model(model: torch.nn.Module, material: KeyMaterial) -> torch.nn.Module:
    """Rewrite the stem of a BlockAlignedSegNet in place so it expects key-encrypted input."""
    if material.method == "ffx":
        raise KeyshardError("FFX is not linear in the pixel value, so it cannot be folded into the weights; "
                            "fine-tune on FFX-encrypted shards instead (keyshard train --weights PLAIN.pt)")
    stride = getattr(model, "stride", None)
    if stride is None or not hasattr(model, "stem"):
        raise KeyshardError("protect needs a block_aligned model (its stem sees whole blocks)")
    if stride % material.block_size:
        raise KeyshardError(f"the model's stem stride {stride} is not a multiple of the key's block size "
                            f"{material.block_size}")
    (sc, sy, sx), a, off = _patch_maps(material, stride)
    with torch.no_grad():
        w = model.stem.weight.double()                      # (D, 3, S, S)
        new_w = w[:, torch.from_numpy(sc), torch.from_numpy(sy), torch.from_numpy(sx)] / torch.from_numpy(a)
        new_b = model.stem.bias.double() - (new_w * torch.from_numpy(off)).sum(dim=(1, 2, 3))
        model.stem.weight.copy_(new_w.to(model.stem.weight.dtype))
        model.stem.bias.copy_(new_b.to(model.stem.bias.dtype))
    return model
