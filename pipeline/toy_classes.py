"""A small synthetic classification set in torchvision's ``ImageFolder`` layout.

``OUT/<class name>/<n>.png``: each image is a noisy grey texture with one large filled shape;
the class fixes the shape's colour family and outline (so a small network learns it on the CPU
in minutes), position, size and shade vary per image.  PNG (lossless), sizes vary a little so
encrypt's resize path is exercised.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from keyshard.errors import KeyshardError

MAX_CLASSES = 100


def class_name(c: int) -> str:
    return f"class_{c:03d}"


def _draw(rng: np.random.Generator, c: int, classes: int, width: int, height: int) -> np.ndarray:
    base = rng.integers(90, 170)
    img = np.clip(base + rng.normal(0, 18, (height, width, 1)) + rng.normal(0, 6, (height, width, 3)), 0, 255)
    layer = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(layer)
    w = int(rng.integers(width // 2, 3 * width // 4 + 1))
    h = int(rng.integers(height // 2, 3 * height // 4 + 1))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    box = (x0, y0, x0 + w - 1, y0 + h - 1)
    form = c % 3
    if form == 0:
        d.ellipse(box, fill=1)
    elif form == 1:
        d.rectangle(box, fill=1)
    else:
        d.polygon([((box[0] + box[2]) // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=1)
    hue = (c / max(classes, 1) + rng.normal(0, 0.01)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, rng.uniform(0.6, 0.95))) * 255
    inside = np.asarray(layer, dtype=bool)
    img[inside] = np.clip(colour + rng.normal(0, 10, (int(inside.sum()), 3)), 0, 255)
    return img.astype(np.uint8)


def make_toy_classes(out: str | Path, classes: int = 4, images: int = 120, seed: int = 0,
                     min_side: int = 40, max_side: int = 56) -> Path:
    """Write ``images`` images in total (dealt round-robin over ``classes`` sub-folders)."""
    out = Path(out)
    if not 2 <= classes <= MAX_CLASSES:
        raise KeyshardError(f"`classes` {classes} must be in 2..{MAX_CLASSES}")
    if images < 2 * classes:
        raise KeyshardError(f"`images` {images}: need at least 2 per class ({2 * classes})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeyshardError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    rng = np.random.default_rng(seed)
    try:
        for c in range(classes):
            (out / class_name(c)).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyshardError(f"{out}: cannot create directory ({exc.strerror})") from None
    for i in range(images):
        c = i % classes
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        Image.fromarray(_draw(rng, c, classes, w, h)).save(out / class_name(c) / f"{i:06d}.png")
    return out
