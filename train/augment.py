"""Key-safe train-time augmentation: moves of whole blocks, which commute with any block key.

A block key acts identically on every M×M block and does not care where the block is, so
anything that only *moves whole blocks* commutes with it: ``encrypt(move(x)) == move(encrypt(x))``
— for SHF, NP and FFX alike.  Two such moves are offered:

* **block-grid flip**: reverse the order of block columns, keeping each block's content.  For
  M=1 (plain data) this is an ordinary horizontal flip.  A true pixel mirror also reverses the
  positions *inside* each block; it commutes with a key only if the key is itself symmetric
  under that mirror — practically never for a random SHF permutation or NP/FFX mask (the tests
  check both facts), so it is not offered on keyed shards.
* **block-aligned crop**: a SIZE×SIZE window whose offsets are multiples of M (no resize, which
  would mix blocks).

Offline replicas (``encrypt --augment-copies``) remain the way to get resized crops and true flips.
"""

from __future__ import annotations

import numpy as np

from keyshard.keys import CHANNELS


def block_hflip(pixels: np.ndarray, mask: np.ndarray, m: int):
    """Reverse the block columns of (H, W, 3) pixels and an (H, W) mask (a plain flip for M=1)."""
    h, w = mask.shape
    px = pixels.reshape(h, w // m, m, CHANNELS)[:, ::-1].reshape(h, w, CHANNELS)
    mk = mask.reshape(h, w // m, m)[:, ::-1].reshape(h, w)
    return px, mk


def block_crop(pixels: np.ndarray, mask: np.ndarray, m: int, size: int, rng: np.random.Generator):
    """A size×size window at block-aligned offsets."""
    h, w = mask.shape
    top = int(rng.integers(0, (h - size) // m + 1)) * m
    left = int(rng.integers(0, (w - size) // m + 1)) * m
    return pixels[top:top + size, left:left + size], mask[top:top + size, left:left + size]


class KeySafeAugment:
    """Picklable per-sample augmentation for the loader (numpy, in its workers), seeded by
    (seed, epoch, sample key); the loader calls ``set_epoch`` at the start of every epoch."""

    def __init__(self, block_size: int, flip: bool, crop: int | None, seed: int, epoch: int = 0):
        self.m, self.flip, self.crop, self.seed, self.epoch = block_size, flip, crop, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def output_shape(self, shape):
        return (self.crop, self.crop, shape[2]) if self.crop else shape

    def __call__(self, pixels, mask, key):
        rng = np.random.default_rng([self.seed, self.epoch, *key.encode()])
        if self.crop:
            pixels, mask = block_crop(pixels, mask, self.m, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            pixels, mask = block_hflip(pixels, mask, self.m)
        return np.ascontiguousarray(pixels), np.ascontiguousarray(mask)
