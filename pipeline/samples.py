"""Turn one VOC image + label map into fixed-size uint8 arrays (plain space), with checks.

Images are decoded and resized with torchvision's uint8 kernels (libjpeg-turbo ``decode_jpeg``
and antialiased bilinear resize): faster than PIL here and within ±1 of its output.  Label maps
are class ids (palette indices), checked from their histogram and resized with nearest neighbour
(PIL); plain PNGs — all of VOC's — are inflated with zlib directly (``label_png.plain_values``),
any other file is decoded by PIL.
Augmentation replicas (random resized crop + horizontal flip) are made here, in plain space,
because they do not commute with a block key.

Start-up cost matters (every ``--jobs`` worker pays it), so this module imports neither torch
nor torchvision at import time, and never imports the ``torchvision`` package at all: that
loads its whole model zoo and ``torch._dynamo`` (~1–2.5 s per process).  Instead the first
sample loads torch and torchvision's compiled image library (``image_stable.so``, found on disk
without importing torchvision) and calls the same operators torchvision's Python wrappers call:

* ``torch.ops.image.decode_jpeg`` ← ``torchvision.io.decode_jpeg(..., mode=ImageReadMode.RGB)``;
* ``torch.nn.functional.interpolate(uint8, bilinear, antialias=True)`` with torchvision's
  memory-format and AVX2 / non-AVX2 choices ← ``transforms.v2.functional.resized_crop``;
* ``_crop_box`` ← ``transforms.RandomResizedCrop.get_params`` (same torch RNG calls, same order).

``tests/test_encrypt_speedpath.py`` checks each against torchvision, bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import math
import os
import platform
import sys
import tempfile
import threading
import warnings

import numpy as np
from PIL import Image

from keyshard import label_png, seeded
from keyshard.pipeline import MAX_PIXELS
from keyshard.shardformat import NUM_CLASSES, VOID, voc_palette
RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB.value (checked by the tests)
CROP_RATIO = (3 / 4, 4 / 3)

_torch = None  # torch, once torchvision's image library is loaded into it
_native_uint8 = None


class BadSample(Exception):
    """One input file is unusable; the message names the file (picklable across workers)."""


def image_library_path() -> str | None:
    """Path of torchvision's compiled image library (``image_stable`` / ``image``), or None.

    Found with the same finder torchvision's ``extension._get_extension_path`` uses, but without
    importing the torchvision package.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    details = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for folder in spec.submodule_search_locations:
        finder = importlib.machinery.FileFinder(folder, details)
        for name in ("image_stable", "image"):
            found = finder.find_spec(name)
            if found is not None and found.origin:
                return found.origin
    return None


def load_torch():
    """torch with ``torch.ops.image`` registered (once per process; ~1 ms beyond ``import torch``)."""
    global _torch, _native_uint8
    if _torch is None:
        import torch

        path = image_library_path()
        try:
            if path is None:
                raise OSError("torchvision's image library not found")
            torch.ops.load_library(path)
        except OSError:
            import torchvision.io  # noqa: F401  (the slow, official way of loading the same library)
        # torchvision.transforms.v2.functional._do_native_uint8_resize_on_cpu(BILINEAR): uint8
        # is interpolated natively on AVX2/AVX512/arm64 CPUs, else through float32 + round.
        _native_uint8 = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                         or platform.machine() in ("aarch64", "arm64"))
        _torch = torch
    return _torch


# -- pixel cap: the size comes from the file's header and is checked before anything decodes ----

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if none comes before the scan.

    Walks the markers as libjpeg's ``next_marker`` does — junk between segments and ``FF``
    fill bytes skipped, ``FF 00`` is not a marker — so it finds the frame header libjpeg would
    use: a header hidden behind junk cannot slip past the cap.  ~2 µs for a camera JPEG.
    """
    n, pos = len(data), 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0:
            return None
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos + 2 >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stuffed byte, TEM, RSTn, SOI
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if pos + 7 > n:
                return None
            return (data[pos + 5] << 8) | data[pos + 6], (data[pos + 3] << 8) | data[pos + 4]
        pos += max(2, (data[pos] << 8) | data[pos + 1])  # libjpeg skips length - 2 bytes (none if < 2)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (always its first), or None if it is no PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def check_pixels(size: tuple[int, int], label: str, what: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise BadSample(f"{label}: {what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                        "(`max_pixels`; read from its header, nothing decoded)")


@contextlib.contextmanager
def _pillow_capped(label: str, what: str, max_pixels: int):
    """Pillow's own decompression-bomb check, made ours: its limit follows ``max_pixels`` and its
    ``DecompressionBombWarning`` / ``Error`` become a BadSample naming the file.

    Needed only where the size could not be read and checked first (formats other than PNG),
    or where ``max_pixels`` is above Pillow's limit.  The warning filter and limit are process
    state: under the threading backend two threads may interleave here, which can at worst
    leave the filter or a raised limit behind in that process.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and max_pixels > saved:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadSample(f"{label}: {what} has more than {max_pixels:,} pixels (`max_pixels`; "
                            "read from its header, nothing decoded)") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_pil(data: bytes, label: str, what: str, max_pixels: int):
    """``(context, image)``: the PIL image opened lazily (header only) with its size checked, and
    the context its decoding must run in (``_pillow_capped``, or nothing when the PNG header
    was checked here already and Pillow's limit is not lower than ours)."""
    size = png_size(data)
    if size is not None:
        check_pixels(size, label, what, max_pixels)
        limit = Image.MAX_IMAGE_PIXELS
        if limit is None or max_pixels <= limit:
            im = Image.open(io.BytesIO(data))
            return contextlib.nullcontext(), im
    with _pillow_capped(label, what, max_pixels):
        im = Image.open(io.BytesIO(data))
        check_pixels(im.size, label, what, max_pixels)
    return _pillow_capped(label, what, max_pixels), im


def decode_rgb(data: bytes, label: str, max_pixels: int = MAX_PIXELS):
    """Image bytes → uint8 CHW RGB tensor; a corrupt, truncated or too large file is a BadSample.

    JPEGs go through torchvision's libjpeg-turbo decoder (it raises on truncated data).  Other
    formats fall back to PIL (``_pil_rgb``).  Width × height is read from the header and checked
    against ``max_pixels`` before anything is decoded (a 5 KB JPEG can claim 50000 × 50000).
    """
    torch = load_torch()
    try:
        if data[:2] == b"\xff\xd8":
            size = jpeg_size(data)
            if size is None:
                raise BadSample(f"{label}: cannot decode image (no JPEG frame header before its data)")
            check_pixels(size, label, "image", max_pixels)
            return _decode_jpeg(torch, data, label)
        ctx, im = _open_pil(data, label, "image", max_pixels)
        with ctx, im:
            return torch.from_numpy(_pil_rgb(im, label)).permute(2, 0, 1)
    except (RuntimeError, ValueError, OSError, SyntaxError):
        raise BadSample(f"{label}: cannot decode image (corrupt or truncated)") from None


_c_stderr = (None, None)  # (pid, unnamed file that fd 2 points at while libjpeg runs); never shared by a fork


def _decode_jpeg(torch, data: bytes, label: str):
    """torchvision's ``decode_jpeg``, with libjpeg's warnings turned into keyshard's own lines.

    libjpeg prints recoverable damage ("Corrupt JPEG data: 3 extraneous bytes before marker
    0xda", "premature end of data segment") straight to fd 2 from C, without the file's name.
    In a process's main thread (``--jobs 1``, loky and multiprocessing workers) fd 2 points at
    an unnamed temporary file while libjpeg runs (~3 µs: five system calls); what it printed
    becomes a ``keyshard: warning: <file>: ...`` line when the image decoded, or part of the
    BadSample when it did not.  Other threads (threading backend, dask workers) cannot swap a
    process-wide descriptor safely and let libjpeg print as it does.
    """
    global _c_stderr
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if threading.current_thread() is not threading.main_thread():
        return torch.ops.image.decode_jpeg(tensor, RGB_MODE, False)
    try:
        if _c_stderr[0] != os.getpid():
            _c_stderr = (os.getpid(), tempfile.TemporaryFile())
        fd = _c_stderr[1].fileno()
        saved = os.dup(2)
    except OSError:  # no fd 2, or no temporary directory: decode without catching
        return torch.ops.image.decode_jpeg(tensor, RGB_MODE, False)
    try:
        os.dup2(fd, 2)
        try:
            out, error = torch.ops.image.decode_jpeg(tensor, RGB_MODE, False), None
        except RuntimeError as exc:
            out, error = None, exc
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    said = ""
    printed = os.lseek(fd, 0, os.SEEK_CUR)
    if printed:
        os.lseek(fd, 0, os.SEEK_SET)
        said = "; ".join(line.strip() for line in os.read(fd, min(printed, 2048)).decode("utf-8", "replace")
                         .splitlines() if line.strip())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
    if error is not None:
        if said:
            raise BadSample(f"{label}: cannot decode image (corrupt or truncated: {said})")
        raise error
    if said:
        print(f"keyshard: warning: {label}: {said} (libjpeg; decoded anyway)", file=sys.stderr, flush=True)
    return out


def _pil_rgb(im: Image.Image, label: str) -> np.ndarray:
    """A PIL image as H×W×3 uint8 RGB.

    16-bit grayscale (``I;16*``, or ``I`` from a PNG) keeps its top 8 bits — 65535 → 255 and
    257·k → k, what Pillow itself does for 16-bit RGB PNGs — where ``convert("RGB")`` would
    clip every value above 255 to white.  32-bit integer and float images have no agreed range
    and are refused.
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N") or (mode == "I" and im.format == "PNG"):
        gray = (np.asarray(im) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("I", "F") or mode.startswith("I;"):
        raise BadSample(f"{label}: {mode} image (32-bit integer or float) has no 8-bit range; "
                        "convert it to 8- or 16-bit RGB or grayscale")
    return np.array(im.convert("RGB"))


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
        ctx, im = _open_pil(data, label, "label map", max_pixels)
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


def resize_bilinear(img, size: int):
    """uint8 CHW → ``size``×``size``, antialiased bilinear: torchvision v2 ``resize_image``.

    Same steps as torchvision for a CPU uint8 image: identity at equal size; a channels-last
    single image is re-strided so the output stays channels-last; native uint8 kernel on
    AVX2/AVX512/arm64, else float32 + round.
    """
    torch = load_torch()
    c, h, w = img.shape
    if (h, w) == (size, size):
        return img
    x = img.reshape(-1, c, h, w)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 1 and x.numel() != strides[0]:
        x = x.as_strided((1, c, h, w), [x.numel(), *strides[1:]])
    if _native_uint8:
        x = torch.nn.functional.interpolate(x, size=[size, size], mode="bilinear", align_corners=False,
                                            antialias=True)
    else:
        x = torch.nn.functional.interpolate(x.to(dtype=torch.float32), size=[size, size], mode="bilinear",
                                            align_corners=False, antialias=True).round_().to(dtype=torch.uint8)
    return x.reshape(c, size, size)


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
    img = decode_rgb(image_bytes, image_label, max_pixels)
    h, w = img.shape[-2:]
    img, _ = fit(img, Image.new("L", (int(w), int(h))), size, augment_seed, crop_scale)
    return img, (int(h), int(w))
