"""A small synthetic dataset in the exact VOC2012 layout, so the chain runs without the 2 GB tar.

Each image is a noisy grey texture with one to three filled shapes.  A shape's class (1..20)
fixes its colour and its outline form, so a small network can learn to segment it; masks are VOC
palette PNGs with a 255 (void) border around every object, like the real annotations.  Image
sizes vary (like VOC's ~500×375) so the resize path is exercised.
"""

from __future__ import annotations

import colorsys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from keyshard.errors import KeyshardError
from keyshard.shardformat import voc_palette

VOC_TRAIN, VOC_VAL = 1464, 1449
TAR_NAME = "VOCtrainval_11-May-2012.tar"


def class_colour(c: int) -> np.ndarray:
    """Distinct, saturated colour per class 1..20 (10 hues × 2 brightness levels); classes above
    20 (``--classes``) take further brightness levels."""
    hue = ((c - 1) % 10) / 10
    value = 0.95 if c <= 10 else 0.55 if c <= 20 else (0.8, 0.4, 0.7, 0.3)[((c - 21) // 10) % 4]
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, value)) * 255


def _draw_sample(rng: np.random.Generator, width: int, height: int, classes: int = 21):
    base = rng.integers(90, 170)
    img = np.clip(base + rng.normal(0, 18, (height, width, 1)) + rng.normal(0, 6, (height, width, 3)), 0, 255)
    mask = Image.new("L", (width, height), 0)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(1, classes))
        w = int(rng.integers(width // 4, width // 2 + 1))
        h = int(rng.integers(height // 4, height // 2 + 1))
        x0 = int(rng.integers(0, width - w))
        y0 = int(rng.integers(0, height - h))
        objects.append((c, (x0, y0, x0 + w, y0 + h)))
    for c, box in objects:  # later objects occlude earlier ones
        layer = Image.new("L", (width, height), 0)
        d = ImageDraw.Draw(layer)
        x0, y0, x1, y1 = box
        if c % 3 == 0:
            d.ellipse(box, fill=1)
        elif c % 3 == 1:
            d.rectangle(box, fill=1)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=1)
        inside = np.asarray(layer, dtype=bool)
        colour = class_colour(c) + rng.normal(0, 10, (height, width, 3))
        img[inside] = np.clip(colour[inside], 0, 255)
        m = np.asarray(mask).copy()
        m[inside] = c
        mask = Image.fromarray(m, "L")
    # void (255) band along every object boundary, as in VOC annotations
    m = np.asarray(mask)
    edge = np.zeros_like(m, dtype=bool)
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[:, :-1] |= m[:, 1:] != m[:, :-1]
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    edge[:-1, :] |= m[1:, :] != m[:-1, :]
    m = np.where(edge, 255, m).astype(np.uint8)
    return img.astype(np.uint8), m


def make_toy_voc(out: str | Path, images: int = 60, seed: int = 0, voc_sizes: bool = False,
                 make_tar: bool = False, min_side: int = 48, max_side: int = 96,
                 progress: bool = True, classes: int = 21) -> Path:
    """Write ``out/VOCdevkit/VOC2012`` (and optionally the official-layout tar) and return the root.

    ``images`` are split about evenly into train.txt/val.txt; ``voc_sizes`` instead writes
    exactly VOC2012's 1464 train and 1449 val ids.  ``classes`` K: objects of classes 1..K-1 on
    background 0 (VOC: 21); with K ≠ 21 encrypt it as a folder dataset (``--image-dir
    .../JPEGImages --mask-dir .../SegmentationClass --num-classes K``).
    """
    if not 2 <= classes <= 255:
        raise KeyshardError(f"`classes` {classes} must be 2..255 (masks are 8-bit, 255 is void)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeyshardError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    n_train, n_val = (VOC_TRAIN, VOC_VAL) if voc_sizes else ((images + 1) // 2, images // 2)
    if n_train < 2 or n_val < 1:
        raise KeyshardError("`images` must be at least 3 (train.txt needs 2 ids, val.txt 1)")
    root = out / "VOCdevkit" / "VOC2012"
    try:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyshardError(f"{out}: cannot create directory ({exc.strerror})") from None
    rng = np.random.default_rng(seed)
    ids = [f"{2007 + i % 6}_{i:06d}" for i in range(n_train + n_val)]
    palette = voc_palette()
    for voc_id in tqdm(ids, desc="toy-voc", unit="img", disable=not progress):
        w = int(rng.integers(min_side, max_side + 1))
        h = int(rng.integers(min_side, max_side + 1))
        img, mask = _draw_sample(rng, w, h, classes)
        Image.fromarray(img).save(root / "JPEGImages" / f"{voc_id}.jpg", quality=92)
        pm = Image.fromarray(mask, "P")
        pm.putpalette(palette)
        pm.save(root / "SegmentationClass" / f"{voc_id}.png")
    seg = root / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_text("".join(f"{i}\n" for i in sorted(ids[:n_train])))
    (seg / "val.txt").write_text("".join(f"{i}\n" for i in sorted(ids[n_train:])))
    (seg / "trainval.txt").write_text("".join(f"{i}\n" for i in sorted(ids)))
    if make_tar:
        write_voc_tar(out / "VOCdevkit", out / TAR_NAME)
    return root


def write_voc_tar(devkit: Path, tar_path: Path) -> None:
    """Pack ``VOCdevkit/`` as the official tar does (members start with ``VOCdevkit/VOC2012/``)."""
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for p in sorted(devkit.rglob("*")):
            tf.add(p, arcname=str(Path("VOCdevkit") / p.relative_to(devkit)), recursive=False)
    tmp.replace(tar_path)
