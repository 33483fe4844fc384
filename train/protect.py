"""``keyshard protect``: fold a key into a block-aligned model trained on plain images.

The stem is ``y = W · x + b`` over each S×S×3 patch of the normalised input.  When a key is a
per-value affine map, the normalised encrypted input at patch position p is an affine function
of one plain normalised value, ``x'_p = a_p · x_src(p) + c_p``; the method says which
(``Method.fold``, a ``methods.Fold`` of source positions, scales and offsets) —

* SHF: src(p) is where the key takes p's value from (same block, in-block position perm[k]);
  values keep their 0..255 scale but may change channel, so ``a_p = std[c_src] / std[c_p]`` and
  ``c_p = (mean[c_src] − mean[c_p]) / std[c_p]``;
* NP: src(p) = p; where the key flips, ``v → 255 − v`` gives ``a_p = −1`` and
  ``c_p = (1 − 2·mean[c_p]) / std[c_p]``; elsewhere ``a_p = 1, c_p = 0``.

Choosing ``W'_p = W_src(p) / a_p`` and ``b' = b − Σ_p W'_p · c_p`` makes the protected stem give
exactly the plain stem's output on encrypted input, so the whole model's outputs agree up to
float rounding.  A method whose ``fold`` is None (FFX: not affine in the pixel value) is refused.
"""

from __future__ import annotations

import torch

from keyshard import methods
from keyshard.errors import KeyshardError


def protect_model(model: torch.nn.Module, material: methods.Material) -> torch.nn.Module:
    """Rewrite the stem of a BlockAlignedSegNet in place so it expects key-encrypted input."""
    method = methods.get(material.method)
    if method.fold(material, material.block_size) is None:
        name = material.method.upper()
        raise KeyshardError(f"{name} is not linear in the pixel value, so it cannot be folded into the weights; "
                            f"fine-tune on {name}-encrypted shards instead (keyshard train --weights PLAIN.pt)")
    stride = getattr(model, "stride", None)
    if stride is None or not hasattr(model, "stem"):
        raise KeyshardError("protect needs a block_aligned model (its stem sees whole blocks)")
    if stride % material.block_size:
        raise KeyshardError(f"the model's stem stride {stride} is not a multiple of the key's block size "
                            f"{material.block_size}")
    (sc, sy, sx), a, off = method.fold(material, stride)
    with torch.no_grad():
        w = model.stem.weight.double()                      # (D, 3, S, S)
        new_w = w[:, torch.from_numpy(sc), torch.from_numpy(sy), torch.from_numpy(sx)] / torch.from_numpy(a)
        new_b = model.stem.bias.double() - (new_w * torch.from_numpy(off)).sum(dim=(1, 2, 3))
        model.stem.weight.copy_(new_w.to(model.stem.weight.dtype))
        model.stem.bias.copy_(new_b.to(model.stem.bias.dtype))
    return model
