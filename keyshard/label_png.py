"""Label-map PNGs with zlib alone: 8-bit, one zlib stream, every row unfiltered.

Such a PNG's inflated rows *are* the label values, so writing one is a ``zlib.compress`` and
reading one a pre-sized ``zlib.decompress`` — no per-row filter search or undo.  Label maps are
flat regions, where PNG's row filters buy nothing: at 256² the shard masks written this way are
~20 % smaller than Pillow's (which tries every filter on every row of an 8-bit grayscale image)
and take 0.06 ms instead of 0.19 ms (``benchmarks/bench_encrypt.py``, stage ``mask encode``).
Any other PNG goes to Pillow, so unusual or damaged files meet Pillow's checks and messages.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVEL = 1  # flat regions: level 1 is ~2.5x faster than 6, and masks stay ~1 KB at 256²
_PNG_CHUNK = struct.Struct(">I4s")
_PNG_CRC = struct.Struct(">I")
_PNG_IHDR = struct.Struct(">IIBBBBB")


def plain_values(data: bytes) -> np.ndarray | None:
    """The pixel values of a plain label-map PNG, inflated with zlib alone; None for any other PNG.

    "Plain": chunks IHDR, PLTE (palette images only), IDAT..., IEND and nothing else, every CRC
    right, 8-bit grayscale or palette, not interlaced, one complete zlib stream of exactly
    height × (width + 1) bytes, and every row stored unfiltered — what libpng and Pillow write
    for palette images (VOC's SegmentationClass, toy-voc) and what ``encode`` writes (shards).  Then the rows *are* the values, and
    this costs about half of Pillow's decode (one pre-sized ``zlib.decompress``, no row loop).
    Anything else returns None and Pillow decodes the file as before, so damaged or unusual
    files meet exactly the old checks and messages (``tests/test_encrypt_speedpath.py``
    compares both on mutated files).
    """
    if data[:8] != SIGNATURE:
        return None
    view, n, pos = memoryview(data), len(data), 8
    header, palette, idat = None, False, []
    while True:
        if pos + 12 > n:
            return None
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        end = pos + 8 + length
        if end + 4 > n:
            return None
        body = view[pos + 8:end]
        if zlib.crc32(body, zlib.crc32(kind)) != _PNG_CRC.unpack_from(data, end)[0]:
            return None
        pos = end + 4
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            header = _PNG_IHDR.unpack(body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind == b"PLTE" and not idat and not palette and length % 3 == 0 and 3 <= length <= 768:
            palette = True
        else:  # anything else, or IHDR / PLTE again or after the image data
            return None
    width, height, depth, color, compression, filtering, interlace = header
    if (pos != n or not idat or depth != 8 or compression or filtering or interlace or not width or not height
            or (color, palette) not in ((0, False), (3, True))):
        return None
    size = height * (width + 1)
    try:
        raw = zlib.decompress(idat[0] if len(idat) == 1 else b"".join(idat), 15, size)
    except zlib.error:
        return None
    if len(raw) != size:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
    return None if rows[:, 0].any() else rows[:, 1:]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return _PNG_CHUNK.pack(len(body), kind) + body + _PNG_CRC.pack(zlib.crc32(body, zlib.crc32(kind)))


def encode(values: np.ndarray) -> bytes:
    """An H×W uint8 label map as an 8-bit grayscale PNG (IHDR, one IDAT, IEND; rows unfiltered).

    Deterministic for a given zlib build (``zlib.ZLIB_RUNTIME_VERSION`` is in the job identity)."""
    if values.dtype != np.uint8 or values.ndim != 2:
        raise ValueError(f"label map must be an H×W uint8 array, got {values.dtype} {values.shape}")
    height, width = values.shape
    rows = np.zeros((height, width + 1), np.uint8)  # column 0: filter type 0 (none) on every row
    rows[:, 1:] = values
    return (SIGNATURE + _chunk(b"IHDR", _PNG_IHDR.pack(width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows.data, LEVEL)) + _chunk(b"IEND", b""))
