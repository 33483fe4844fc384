"""Turn one VOC image + label map into fixed-size uint8 arrays (plain space), with checks.

Images are decoded and resized with torchvision's uint8 kernels (``decode_jpeg`` and
antialiased bilinear ``resize``): faster than PIL here and within ±1 of its output.  Label maps
stay in PIL (palette indices), checked from their histogram and resized with nearest neighbour.  Augmentation replicas (random resized crop + horizontal flip) are made here, in
plain space, because they do not commute with a block key.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

NUM_CLASSES = 21
VOID = 255


class BadSample(Exception):
    """One input file is unusable; the message names the file (picklable across workers)."""


def decode_rgb(data: bytes, label: str) -> torch.Tensor:
    """Image bytes → uint8 CHW RGB tensor; a corrupt or truncated file is a BadSample.

    JPEGs go through torchvision's libjpeg-turbo decoder (it raises on truncated data; its
    deprecation notice in favour of torchcodec is silenced: torchvision is pinned).  Other
    formats fall back to PIL.
    """
    try:
        if data[:2] == b"\xff\xd8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB)
        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except (RuntimeError, ValueError, OSError, SyntaxError):
        raise BadSample(f"{label}: cannot decode image (corrupt or truncated)") from None


def decode_label_map(data: bytes, label: str) -> Image.Image:
    """Palette/grayscale PNG → loaded PIL image of class ids; anything else is a BadSample.

    Values are checked with one wrap-around pass: ``(v - 21) mod 256`` maps the valid ids 0..20
    and 255 to 234..255 and every invalid value to 0..233, so one ``min`` decides (~20 µs).
    """
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (OSError, ValueError, SyntaxError):
        raise BadSample(f"{label}: cannot decode label map (corrupt or truncated)") from None
    if im.mode not in ("P", "L"):
        raise BadSample(f"{label}: label map must be a palette or grayscale PNG, got mode {im.mode}")
    arr = np.asarray(im)
    if arr.size and (arr - np.uint8(NUM_CLASSES)).min() < VOID - NUM_CLASSES:
        bad = [int(v) for v in np.unique(arr) if NUM_CLASSES <= v < VOID]
        raise BadSample(f"{label}: label map has values {bad[:5]} outside 0..20 and 255")
    return im


def replica_seed(seed: int, voc_id: str, replica: int) -> int:
    """Seed of one augmentation replica: depends only on (seed, id, replica), never on workers."""
    digest = hashlib.sha256(f"keyshard-augment/1|{seed}|{voc_id}|{replica}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def crop_params(height: int, width: int, seed: int, scale: tuple[float, float]):
    """torchvision's RandomResizedCrop parameters + a flip bit, from a private seeded RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(
            torch.empty(1, height, width), scale=scale, ratio=(3 / 4, 4 / 3))
        flip = bool(torch.rand(1).item() < 0.5)
    return top, left, h, w, flip


def prepare(image_bytes: bytes, mask_bytes: bytes, size: int, image_label: str, mask_label: str,
            augment_seed: int | None = None, crop_scale=(0.08, 1.0)):
    """Decode, check and resize one sample to ``size``×``size``.

    With ``augment_seed`` the sample is a random resized crop (+ flip) instead of a plain resize.
    Returns (image HxWx3 uint8, mask HxW uint8, original (height, width)).
    """
    img = decode_rgb(image_bytes, image_label)
    mask = decode_label_map(mask_bytes, mask_label)
    h, w = img.shape[-2:]
    if mask.size != (w, h):
        raise BadSample(f"{mask_label}: label map is {mask.size[0]}x{mask.size[1]} but its image is {w}x{h}")
    if augment_seed is None:
        top, left, ch, cw, flip = 0, 0, h, w, False
    else:
        top, left, ch, cw, flip = crop_params(h, w, augment_seed, crop_scale)
    img = F.resized_crop(img, top, left, ch, cw, [size, size],
                         interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = mask.resize((size, size), Image.NEAREST, box=(left, top, left + cw, top + ch))
    if flip:
        img, mask = F.horizontal_flip(img), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.permute(1, 2, 0).contiguous().numpy(), np.asarray(mask), (int(h), int(w))
