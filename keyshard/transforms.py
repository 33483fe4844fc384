"""Block-wise transforms compiled into one vectorised operation per image (numpy and torch).

An image is H×W×3 integers, H and W multiples of the block size M.  Each M×M block is flattened
in (row-in-block, column-in-block, channel) order to a vector of 3M² values and the same key is
applied to every block.  Rather than cutting blocks at run time, a key is compiled once per image
size into a *plan* over the whole flattened image:

* SHF: a flat gather index, ``out = x.reshape(-1)[idx]``;
* NP: a 0/255 image, ``out = x ^ xor`` (equal to ``255 - v`` where the key bit is set);
* FFX: a base image (0, or 256 where the key bit is set) and a 2×256 table, ``out = lut[base + x]``.

Each has an exact inverse.  The numpy and torch paths use the same compiled arrays, so their
outputs are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keyshard.errors import KeyshardError
from keyshard.keys import CHANNELS, KeyMaterial


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


def _block_positions(height: int, width: int, m: int):
    """For each flat image position: its block origin (y0, x0) and index k inside the block."""
    y = np.arange(height).reshape(-1, 1, 1)
    x = np.arange(width).reshape(1, -1, 1)
    c = np.arange(CHANNELS).reshape(1, 1, -1)
    return y - y % m, x - x % m, block_index(y, x, c, m)


def _expand(values: np.ndarray, height: int, width: int, m: int) -> np.ndarray:
    """Repeat a per-block vector (length 3M²) over every block of an H×W×3 image."""
    _, _, k = _block_positions(height, width, m)
    return values[k]


@dataclass(frozen=True)
class Plan:
    """A key compiled for one image size; ``encrypt``/``decrypt`` work on (..., H, W, 3) arrays."""

    method: str
    height: int
    width: int
    gather: np.ndarray | None = None      # SHF forward flat index
    scatter: np.ndarray | None = None     # SHF inverse flat index
    xor: np.ndarray | None = None         # NP: uint8 0/255 image
    fwd_base: np.ndarray | None = None    # FFX: uint16 0/256 per position (selects the lut row)
    inv_base: np.ndarray | None = None    # FFX: uint16 0/1000 per position (row of inv_lut)
    lut: np.ndarray | None = None         # FFX forward: 2×256 uint16 (identity row, table row)
    inv_lut: np.ndarray | None = None     # FFX inverse: 2×1000 int16, -1 marks impossible codes

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, CHANNELS)

    @property
    def out_dtype(self):
        return np.uint16 if self.method == "ffx" else np.uint8

    def _check(self, x: np.ndarray, dtype) -> None:
        if x.shape[-3:] != self.shape:
            raise ValueError(f"expected (..., {self.height}, {self.width}, 3), got {x.shape}")
        if x.dtype != dtype:
            raise ValueError(f"expected {np.dtype(dtype).name} values, got {x.dtype}")

    def encrypt(self, x: np.ndarray) -> np.ndarray:
        """uint8 image(s) → encrypted image(s) (uint8, or uint16 codes for FFX)."""
        self._check(x, np.uint8)
        return self._apply(x, forward=True)

    def decrypt(self, y: np.ndarray) -> np.ndarray:
        """Exact inverse of ``encrypt``; raises ValueError on FFX codes no key could produce."""
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
        if self.method == "shf":
            return np.take(flat, self.gather if forward else self.scatter)
        if self.method == "np":
            return flat ^ self.xor.reshape(-1)
        if forward:  # uint16 index arithmetic: half the cost of an intp index
            return np.take(self.lut.reshape(-1), self.fwd_base.reshape(-1) + flat)
        out = np.take(self.inv_lut.reshape(-1), self.inv_base.reshape(-1) + flat)
        if (out < 0).any():
            raise ValueError("value is not an FFX code of this key (wrong key or corrupt data)")
        return out.astype(np.uint8)

    def to_torch(self, device=None) -> "TorchPlan":
        return TorchPlan.from_plan(self, device)


def compile_plan(material: KeyMaterial, height: int, width: int) -> Plan:
    """Compile key material for H×W×3 images (H, W multiples of the block size)."""
    m = material.block_size
    check_divisible(height, width, m)
    if material.method == "shf":
        y0, x0, k = _block_positions(height, width, m)
        r, col, ch = block_coords(material.perm[k], m)  # out[k] = in[perm[k]] within the block
        gather = (((y0 + r) * width + (x0 + col)) * CHANNELS + ch).reshape(-1).astype(np.intp)
        scatter = np.empty_like(gather)
        scatter[gather] = np.arange(gather.size, dtype=np.intp)
        return Plan("shf", height, width, gather=gather, scatter=scatter)
    mask_img = _expand(material.mask, height, width, m)
    if material.method == "np":
        return Plan("np", height, width, xor=np.where(mask_img, 255, 0).astype(np.uint8))
    table = material.table.astype(np.uint16)
    lut = np.stack([np.arange(256, dtype=np.uint16), table])
    inv_lut = np.full((2, 1000), -1, dtype=np.int16)
    inv_lut[0, :256] = np.arange(256)
    inv_lut[1, table] = np.arange(256)
    row = mask_img.astype(np.uint16)
    return Plan("ffx", height, width, fwd_base=row * 256, inv_base=row * 1000, lut=lut, inv_lut=inv_lut)


class TorchPlan:
    """The same compiled plan as tensors on a device; operates on (B, H, W, 3) integer tensors."""

    def __init__(self, method, height, width, tensors):
        self.method, self.height, self.width = method, height, width
        self.t = tensors

    @classmethod
    def from_plan(cls, plan: Plan, device=None) -> "TorchPlan":
        import torch

        names = ("gather", "scatter", "xor", "fwd_base", "inv_base", "lut", "inv_lut")
        tensors = {}
        for name in names:
            arr = getattr(plan, name)
            if arr is None:
                continue
            if name in ("gather", "scatter", "fwd_base", "inv_base"):
                arr = arr.astype(np.int64)  # index arithmetic in torch wants int64
            elif arr.dtype == np.uint16:  # torch's uint16 lacks indexing kernels on some devices
                arr = arr.astype(np.int32)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        return cls(plan.method, plan.height, plan.width, tensors)

    def encrypt(self, x):
        """uint8 (B,H,W,3) → uint8 (SHF/NP) or int32 codes (FFX), bit-identical to numpy."""
        return self._apply(x, forward=True)

    def decrypt(self, y):
        return self._apply(y, forward=False)

    def _apply(self, x, forward: bool):
        import torch

        shape = x.shape
        flat = x.reshape(shape[0], -1)
        t = self.t
        if self.method == "shf":  # torch.gather is ~8x faster than advanced indexing on CPU
            index = t["gather"] if forward else t["scatter"]
            out = torch.gather(flat, 1, index.expand(flat.shape[0], -1))
        elif self.method == "np":
            out = torch.bitwise_xor(flat, t["xor"].reshape(-1))
        elif forward:
            out = t["lut"].reshape(-1)[t["fwd_base"].reshape(-1) + flat.long()]
        else:
            out = t["inv_lut"].reshape(-1)[t["inv_base"].reshape(-1) + flat.long()]
            if bool((out < 0).any()):
                raise ValueError("value is not an FFX code of this key (wrong key or corrupt data)")
            out = out.to(torch.uint8)
        return out.reshape(shape)


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
