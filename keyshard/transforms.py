"""Block-wise transforms compiled into one vectorised operation per image (numpy and torch).

An image is H×W×3 integers, H and W multiples of the block size M.  Each M×M block is flattened
in (row-in-block, column-in-block, channel) order to a vector of 3M² values and the same key is
applied to every block.  Rather than cutting blocks at run time, a key is compiled once per image
size into a *plan* over the whole flattened image:

* SHF: a flat gather index, ``out = x.reshape(-1)[idx]``;
* NP: a 0/255 image, ``out = x ^ xor`` (equal to ``255 - v`` where the key bit is set);
* FFX: a base image (0, or 256 where the key bit is set) and a 2×256 table, ``out = lut[base + x]``.

Each method's plan class lives in its module (``keyshard/methods/``) and subclasses :class:`Plan`
here; each has an exact inverse.  The numpy and torch paths use the same compiled arrays, so
their outputs are bit-identical.
"""

from __future__ import annotations

import numpy as np

from keyshard.errors import KeyshardError
from keyshard.keys import CHANNELS


def check_divisible(height: int, width: int, block_size: int, what: str = "image") -> None:
    if height % block_size or width % block_size:
        raise KeyshardError(
            f"block size {block_size} does not divide the {what} size {height}x{width}"
        )


def block_index(y, x, c, m: int):
    """THE block flattening order: pixel (y, x), channel c → index k in its block's 3M² vector,
    (row-in-block, column-in-block, channel).  Used by the transforms and by ``protect``."""
    return ((y % m) * m + (x % m)) * CHANNELS + c


def block_coords(k, m: int):
    """Inverse of ``block_index`` inside one block: k → (row-in-block, column-in-block, channel)."""
    row, rem = np.divmod(k, m * CHANNELS)
    col, ch = np.divmod(rem, CHANNELS)
    return row, col, ch


def patch_positions(size: int, m: int):
    """For each (channel, row, col) of an S×S patch, channel first as in a conv weight: the
    arrays c, y, x and k, the in-block index ``block_index(y, x, c, m)`` (what ``protect`` folds)."""
    c, y, x = np.meshgrid(np.arange(CHANNELS), np.arange(size), np.arange(size), indexing="ij")
    return c, y, x, block_index(y, x, c, m)


def to_blocks(x: np.ndarray, m: int) -> np.ndarray:
    """(H, W, 3) → (blocks, 3M²) in the flattening order above (what known-plaintext attacks read)."""
    h, w, _ = x.shape
    return x.reshape(h // m, m, w // m, m, CHANNELS).transpose(0, 2, 1, 3, 4).reshape(-1, m * m * CHANNELS)


def block_positions(height: int, width: int, m: int):
    """For each flat image position: its block origin (y0, x0) and index k inside the block."""
    y = np.arange(height).reshape(-1, 1, 1)
    x = np.arange(width).reshape(1, -1, 1)
    c = np.arange(CHANNELS).reshape(1, 1, -1)
    return y - y % m, x - x % m, block_index(y, x, c, m)


def expand(values: np.ndarray, height: int, width: int, m: int) -> np.ndarray:
    """Repeat a per-block vector (length 3M²) over every block of an H×W×3 image."""
    _, _, k = block_positions(height, width, m)
    return values[k]


class Plan:
    """A key compiled for one image size; ``encrypt``/``decrypt`` work on (..., H, W, 3) arrays.

    Each method has its own plan class (``keyshard/methods/``): it holds the compiled arrays and
    implements ``_apply_flat`` (numpy, one flattened image), ``_torch_arrays`` (the arrays to put
    on a device) and ``_torch_flat`` (the same operation on a (B, H·W·3) tensor, bit-identical).
    ``out_dtype`` is what ``encrypt`` returns (and ``decrypt`` takes).
    """

    method: str = ""
    out_dtype = np.uint8

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, CHANNELS)

    def _check(self, x: np.ndarray, dtype) -> None:
        if x.shape[-3:] != self.shape:
            raise ValueError(f"expected (..., {self.height}, {self.width}, 3), got {x.shape}")
        if x.dtype != dtype:
            raise ValueError(f"expected {np.dtype(dtype).name} values, got {x.dtype}")

    def encrypt(self, x: np.ndarray) -> np.ndarray:
        """uint8 image(s) → encrypted image(s) (``out_dtype``: uint8, or uint16 codes for FFX)."""
        self._check(x, np.uint8)
        return self._apply(x, forward=True)

    def decrypt(self, y: np.ndarray) -> np.ndarray:
        """Exact inverse of ``encrypt``; raises ValueError on values no key of the method could produce."""
        self._check(y, self.out_dtype)
        return self._apply(y, forward=False)

    def _apply(self, x: np.ndarray, forward: bool) -> np.ndarray:
        batch = x.shape[:-3]
        rows = x.reshape(-1, self.height * self.width * CHANNELS)
        # one 1-D take per image: numpy's 1-D take is ~3x faster than 2-D fancy indexing
        if len(rows) == 1:
            return self._apply_flat(rows[0], forward).reshape(batch + self.shape)
        return np.stack([self._apply_flat(row, forward) for row in rows]).reshape(batch + self.shape)

    def _apply_flat(self, flat: np.ndarray, forward: bool) -> np.ndarray:
        raise NotImplementedError

    def _torch_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def _torch_flat(t: dict, flat, forward: bool):
        raise NotImplementedError

    def to_torch(self, device=None) -> "TorchPlan":
        return TorchPlan.from_plan(self, device)


def compile_plan(material, height: int, width: int) -> Plan:
    """Compile key material for H×W×3 images (H, W multiples of the block size)."""
    from keyshard import methods

    check_divisible(height, width, material.block_size)
    return methods.get(material.method).compile(material, height, width)


class TorchPlan:
    """The same compiled plan as tensors on a device; operates on (B, H, W, 3) integer tensors."""

    def __init__(self, plan: Plan, tensors: dict):
        self.plan, self.method, self.height, self.width = plan, plan.method, plan.height, plan.width
        self.t = tensors

    @classmethod
    def from_plan(cls, plan: Plan, device=None) -> "TorchPlan":
        import torch

        tensors = {name: torch.from_numpy(np.ascontiguousarray(arr)).to(device)
                   for name, arr in plan._torch_arrays().items()}
        return cls(plan, tensors)

    def encrypt(self, x):
        """uint8 (B,H,W,3) → uint8, or int32 codes (FFX), bit-identical to numpy."""
        return self._apply(x, forward=True)

    def decrypt(self, y):
        return self._apply(y, forward=False)

    def _apply(self, x, forward: bool):
        shape = x.shape
        return self.plan._torch_flat(self.t, x.reshape(shape[0], -1), forward).reshape(shape)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(pixels, divisor: int):
    """(B, H, W, 3) integer tensor → normalised float (B, 3, H, W) model input.

    ``x = v / divisor`` (255, or max(table) for FFX), then ImageNet mean/std — normalisation
    comes after the key transform, exactly as in the reference code.  Works for plain and
    encrypted pixels alike.
    """
    import torch

    x = pixels.permute(0, 3, 1, 2).float().div_(divisor)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def encrypt_image(array: np.ndarray, key) -> np.ndarray:
    """One-off: encrypt an H×W×3 (or N×H×W×3) uint8 array with a key (a ``Key`` or a key file).

    Compiles the key for the array's size on every call; loops should compile once
    (``compile_plan``) and reuse the plan.
    """
    return _plan_for(array, key).encrypt(np.asarray(array))


def decrypt_image(array: np.ndarray, key) -> np.ndarray:
    """One-off: the exact inverse of ``encrypt_image``."""
    return _plan_for(array, key).decrypt(np.asarray(array))


def _plan_for(array, key) -> Plan:
    from keyshard import keys

    material = (key if isinstance(key, keys.Key) else keys.load(key)).material
    if np.ndim(array) < 3:
        raise KeyshardError(f"expected an H×W×3 image array, got shape {np.shape(array)}")
    return compile_plan(material, np.shape(array)[-3], np.shape(array)[-2])
