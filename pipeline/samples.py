"""Turn one VOC image + label map into fixed-size uint8 arrays (plain space), with checks.

Images are decoded and resized by the core (``keyshard/images.py``: torchvision's uint8
kernels, the pixel cap), which ``preview`` and prediction share.  Label maps are class ids
(palette indices), checked from their histogram and resized with nearest neighbour (PIL); plain
PNGs — all of VOC's — are inflated with zlib directly (``label_png.plain_values``), any other
file is decoded by PIL.  Augmentation replicas (random resized crop + horizontal flip) are made
here, in plain space, because they do not commute with a block key:

* ``_crop_box`` ← ``transforms.RandomResizedCrop.get_params`` (same torch RNG calls, same order).

``tests/test_encrypt_speedpath.py`` checks it against torchvision for many seeds.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image

from keyshard import label_png, seeded
from keyshard.images import (MAX_PIXELS, BadSample, decode_rgb, load_image, load_torch, open_capped,
                             resize_bilinear)
from keyshard.shardformat import NUM_CLASSES, VOID, voc_palette

CROP_RATIO = (3 / 4, 4 / 3)


_VOC_PALETTE = bytes(voc_palette())
_GRAY_PALETTE = bytes(v for i in range(256) for v in (i, i, i))
_CHECKED_ENTRIES = (*range(NUM_CLASSES), VOID)


def _palette_mismatch(im: Image.Image) -> str | None:
    """Why a palette label map's colours are not VOC's, or None.

    The class of a pixel is its palette *index*; the palette only colours it.  A mask whose
    palette is not VOC's was (usually) re-quantised from a colour image, so its indices are
    not class ids.  Entries 0..20 and 255 (those present) must be the VOC colour map's, or all
    gray (index i = colour (i, i, i): an index map saved as a palette PNG).  Costs ~0.1 µs.
    """
    pal = im.palette
    raw = pal.palette if pal is not None and pal.mode == "RGB" and isinstance(pal.palette, bytes) \
        else bytes(im.getpalette("RGB") or b"")
    head, tail = raw[:3 * NUM_CLASSES], raw[3 * VOID:3 * VOID + 3]
    for ref in (_VOC_PALETTE, _GRAY_PALETTE):
        if head == ref[:len(head)] and tail == ref[3 * VOID:3 * VOID + len(tail)]:
            return None
    for i in _CHECKED_ENTRIES:
        got = tuple(raw[3 * i:3 * i + 3])
        if len(got) == 3 and got != tuple(_VOC_PALETTE[3 * i:3 * i + 3]):
            return f"index {i} is {got}, VOC's is {tuple(_VOC_PALETTE[3 * i:3 * i + 3])}"
    return "its last entry is cut short"


def decode_label_map(data: bytes, label: str, max_pixels: int = MAX_PIXELS, voc: bool = True) -> Image.Image:
    """Palette/grayscale PNG → loaded PIL image of class ids; anything else is a BadSample.

    Values are checked with one wrap-around pass: ``(v - 21) mod 256`` maps the valid ids 0..20
    and 255 to 234..255 and every invalid value to 0..233, so one ``min`` decides (~20 µs).
    A palette PNG must carry the VOC palette (see ``_palette_mismatch``).  Its size is checked
    against ``max_pixels`` from the header, as images are.

    ``voc=False`` (folder datasets): no palette or value check here — a palette PNG is read as
    its indices, and the caller maps and range-checks the values (``folders.LabelSpec``).
    """
    try:
        ctx, im = open_capped(data, label, "label map", max_pixels)
        values = label_png.plain_values(data) if im.format == "PNG" and im.mode in ("P", "L") else None
        if values is None:
            with ctx:
                im.load()
    except (OSError, ValueError, SyntaxError):
        raise BadSample(f"{label}: cannot decode label map (corrupt or truncated)") from None
    if im.mode not in ("P", "L"):
        raise BadSample(f"{label}: label map must be a palette or grayscale PNG, got mode {im.mode}")
    if not voc:
        return im if values is None else Image.fromarray(np.ascontiguousarray(values), "L")
    if im.mode == "P" and (why := _palette_mismatch(im)):
        raise BadSample(f"{label}: label map's palette is not the VOC colour map ({why}); its indices "
                        "would not be class ids — save class ids with the VOC palette or as grayscale")
    arr = np.asarray(im) if values is None else values
    if arr.size and (arr - np.uint8(NUM_CLASSES)).min() < VOID - NUM_CLASSES:
        bad = [int(v) for v in np.unique(arr) if NUM_CLASSES <= v < VOID]
        raise BadSample(f"{label}: label map has values {bad[:5]} outside 0..20 and 255")
    return im if values is None else Image.fromarray(np.ascontiguousarray(values), "L")


def replica_seed(seed: int, voc_id: str, replica: int) -> int:
    """Seed of one augmentation replica: depends only on (seed, id, replica), never on workers."""
    digest = seeded.public_secret("augment", seed, voc_id, replica)
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _crop_box(torch, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """``torchvision.transforms.RandomResizedCrop.get_params`` (torchvision 0.29), line for line.

    It draws from torch's global RNG, so the calls, their order and dtypes must stay exactly
    these; ``tests/test_encrypt_speedpath.py`` compares it with torchvision for many seeds.
    """
    area = height * width

    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))

        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w

    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def crop_params(height: int, width: int, seed: int, scale: tuple[float, float]):
    """torchvision's RandomResizedCrop parameters + a flip bit, from a private seeded RNG."""
    torch = load_torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = _crop_box(torch, height, width, scale, CROP_RATIO)
        flip = bool(torch.rand(1).item() < 0.5)
    return top, left, h, w, flip


def fit(img, mask: Image.Image, size: int, augment_seed: int | None = None, crop_scale=(0.08, 1.0)):
    """Resize (or random-resized-crop + flip) a decoded sample to ``size``×``size`` numpy arrays."""
    h, w = img.shape[-2:]
    if augment_seed is None:
        top, left, ch, cw, flip = 0, 0, h, w, False
    else:
        top, left, ch, cw, flip = crop_params(h, w, augment_seed, crop_scale)
    # get_params always returns a box inside the image, so the crop is a plain slice (torchvision
    # pads only boxes that stick out)
    img = resize_bilinear(img[..., top:top + ch, left:left + cw], size)
    mask = mask.resize((size, size), Image.NEAREST, box=(left, top, left + cw, top + ch))
    if flip:
        img, mask = img.flip(-1), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.permute(1, 2, 0).contiguous().numpy(), np.asarray(mask)


def prepare(image_bytes: bytes, mask_bytes: bytes, size: int, image_label: str, mask_label: str,
            augment_seed: int | None = None, crop_scale=(0.08, 1.0), max_pixels: int = MAX_PIXELS, labels=None):
    """Decode, check and resize one sample to ``size``×``size``.

    With ``augment_seed`` the sample is a random resized crop (+ flip) instead of a plain resize.
    Image and label map larger than ``max_pixels`` (from their headers) are BadSamples.
    ``labels`` (``folders.LabelSpec``, folder datasets): map the label values through its table
    and check them against its class count and ignore index instead of VOC's checks.
    Returns (image HxWx3 uint8, mask HxW uint8, original (height, width)).
    """
    img = decode_rgb(image_bytes, image_label, max_pixels)
    mask = decode_label_map(mask_bytes, mask_label, max_pixels, voc=labels is None)
    if labels is not None:
        mask = Image.fromarray(np.ascontiguousarray(labels.apply(np.asarray(mask), mask_label)), "L")
    h, w = img.shape[-2:]
    if mask.size != (w, h):
        raise BadSample(f"{mask_label}: label map is {mask.size[0]}x{mask.size[1]} but its image is {w}x{h}")
    img, mask = fit(img, mask, size, augment_seed, crop_scale)
    return img, mask, (int(h), int(w))


def prepare_image(image_bytes: bytes, size: int, image_label: str, augment_seed: int | None = None,
                  crop_scale=(0.08, 1.0), max_pixels: int = MAX_PIXELS):
    """``prepare`` for a sample without a label map (classification): (image HxWx3 uint8, (height, width))."""
    if augment_seed is None:
        return load_image(image_bytes, size, image_label, max_pixels)
    img = decode_rgb(image_bytes, image_label, max_pixels)
    h, w = img.shape[-2:]
    img, _ = fit(img, Image.new("L", (int(w), int(h))), size, augment_seed, crop_scale)
    return img, (int(h), int(w))


# -- one source sample, as each task reads it (``Task.sample_reader``) -------------------------------

def read_segmentation(ref, augment_seed: int | None, options, labels):
    """One VOC or folder-dataset ref, an image and its label map: ``(image, mask, orig_size,
    input_row, key_id)``.  The input row is the manifest's record of the inputs (id, image
    sha256, label map sha256); ``options`` are the job's (size, crop scale, pixel limit)."""
    image_bytes, mask_bytes = ref.image.read(), ref.mask.read()
    img, mask, orig = prepare(image_bytes, mask_bytes, options.size, ref.image.label, ref.mask.label, augment_seed,
                              options.crop_scale, options.max_pixels, labels=labels)
    row = [ref.voc_id, hashlib.sha256(image_bytes).hexdigest(), hashlib.sha256(mask_bytes).hexdigest()]
    return img, mask, orig, row, ref.voc_id


def read_classification(ref, augment_seed: int | None, options, labels):
    """One image-folder ref (``image_folder.ClassRef``), an image and its class index: ``(image,
    class, orig_size, input_row, key_id)``.  The id is a path, so "/" becomes "__" in its key."""
    image_bytes = ref.image.read()
    img, orig = prepare_image(image_bytes, options.size, ref.image.label, augment_seed, options.crop_scale,
                              options.max_pixels)
    row = [ref.voc_id, hashlib.sha256(image_bytes).hexdigest(), str(ref.cls)]
    return img, ref.cls, orig, row, ref.voc_id.replace("/", "__")
