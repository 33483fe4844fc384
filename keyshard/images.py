"""Decoding and resizing images as ``encrypt`` does: what the encryption job, ``preview`` and
prediction share, so a picture shown or predicted on is the picture the shards hold.

Images are decoded and resized with torchvision's uint8 kernels (libjpeg-turbo ``decode_jpeg``
and antialiased bilinear resize): faster than PIL here and within ±1 of its output.  Every
file's width × height is read from its header and checked against ``max_pixels`` before
anything is decoded (a 5 KB JPEG can claim 50000 × 50000).

Start-up cost matters (every ``encrypt --jobs`` worker pays it), so this module imports neither
torch nor torchvision at import time, and never imports the ``torchvision`` package at all: that
loads its whole model zoo and ``torch._dynamo`` (~1–2.5 s per process).  Instead the first
image loads torch and torchvision's compiled image library (``image_stable.so``, found on disk
without importing torchvision) and calls the same operators torchvision's Python wrappers call:

* ``torch.ops.image.decode_jpeg`` ← ``torchvision.io.decode_jpeg(..., mode=ImageReadMode.RGB)``;
* ``torch.nn.functional.interpolate(uint8, bilinear, antialias=True)`` with torchvision's
  memory-format and AVX2 / non-AVX2 choices ← ``transforms.v2.functional.resized_crop``.

``tests/test_encrypt_speedpath.py`` checks each against torchvision, bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import os
import platform
import sys
import tempfile
import threading
import warnings

import numpy as np
from PIL import Image

# Largest image or label map (width × height, read from the file's header before anything is
# decoded) that ``encrypt`` accepts: Pillow's own default ``Image.MAX_IMAGE_PIXELS``
# (1024³ // 4 // 3, about 9500 × 9500).  ``encrypt --max-pixels`` changes it.
MAX_PIXELS = 89_478_485

RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB.value (checked by the tests)
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


def open_capped(data: bytes, label: str, what: str, max_pixels: int):
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
        ctx, im = open_capped(data, label, "image", max_pixels)
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


def stored_pixels(img, size: int):
    """A decoded 3×H×W uint8 image → ``size``×``size``×3 uint8 (a tensor) as ``encrypt`` stores it."""
    return resize_bilinear(img, size).permute(1, 2, 0).contiguous()


def load_image(data: bytes, size: int, label: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes → (``size``×``size``×3 uint8 RGB as ``encrypt`` stores it, original (height, width)):
    ``decode_rgb`` then ``stored_pixels``; a bad file is a BadSample naming ``label``."""
    img = decode_rgb(data, label, max_pixels)
    h, w = img.shape[-2:]
    return stored_pixels(img, size).numpy(), (int(h), int(w))
