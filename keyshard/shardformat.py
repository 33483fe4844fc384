"""The shard format shared by the encryption job, the trainer, the evaluator and ``verify``.

``<out>/<split>-<NNNNNN>.tar`` in WebDataset convention; per sample ``<key>.img.npy``,
``<key>.json`` and ``<key>.mask.png``.  Writing is deterministic (sorted members, USTAR headers —
a pax header only for a name USTAR cannot hold —, fixed mtime/owner/mode, fixed encoders) so the same input gives byte-identical shards, and the sha256
is computed while writing instead of re-reading the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from keyshard import label_png
from keyshard.errors import KeyshardError
from keyshard.sources import READ_CHUNK


NUM_CLASSES = 21  # VOC: background + 20 object classes
VOID = 255  # label of unlabelled pixels (object borders) in masks; ignored by losses and metrics
VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")


def dataset_info(manifest: dict) -> dict:
    """What a shard set's labels mean: ``{"kind", "task", "num_classes", "ignore_index",
    "class_names"}`` from the manifest's ``dataset`` entry.  Manifests written before that entry
    existed are PASCAL VOC (21 classes, 255 = void).  Everything downstream (loss, metrics,
    models, plots) takes the class count and ignore index from here, never from a constant."""
    from keyshard import tasks  # the kind → task rule is the task registry's (tasks.for_kind)

    info = manifest.get("dataset")
    if info is None:
        return {"kind": "voc", "task": tasks.for_kind("voc").name, "num_classes": NUM_CLASSES, "ignore_index": VOID,
                "class_names": list(VOC_CLASS_NAMES)}
    return {"kind": info["kind"], "task": tasks.for_kind(info["kind"]).name, "num_classes": info["num_classes"],
            "ignore_index": info.get("ignore_index"), "class_names": list(info["class_names"])}


def voc_dataset() -> dict:
    """The manifest's ``dataset`` entry of PASCAL VOC."""
    return {"kind": "voc", "num_classes": NUM_CLASSES, "ignore_index": VOID, "class_names": list(VOC_CLASS_NAMES)}


MTIME = 0  # fixed member mtime: shards must not depend on when they were written


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 entries, flattened RGB): the bits of index i are
    dealt out to R, G, B from the top bit down (1 → dark red, 2 → dark green, 255 → cream)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(voc_id: str, replica: int = 0) -> str:
    """WebDataset key: the VOC id without dots; augmentation replicas get ``_a<r>``."""
    base = voc_id.replace(".", "")
    return base if replica == 0 else f"{base}_a{replica}"


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, copy: bool = True) -> np.ndarray:
    """An ``.npy`` member as an array.  ``copy=False``: a read-only view of ``data`` itself (format
    1.0, which ``encode_npy`` writes; anything else is read the copying way), for readers that copy
    it into a batch anyway — numpy's own reader copies the bytes twice (measured with
    ``benchmarks/bench_loader.py``)."""
    if not copy:
        f = io.BytesIO(data)
        if np.lib.format.read_magic(f) == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            if not dtype.hasobject:
                flat = np.frombuffer(data, dtype, count=math.prod(shape), offset=f.tell())
                return flat.reshape(shape, order="F" if fortran_order else "C")
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def encode_mask(mask: np.ndarray) -> bytes:
    """8-bit grayscale PNG, rows unfiltered (``label_png``: any PNG reader opens it)."""
    return label_png.encode(mask)


def decode_mask(data: bytes) -> np.ndarray:
    """A shard's label map: keyshard's own PNGs by zlib alone, any other PNG by Pillow."""
    values = label_png.plain_values(data)
    return values if values is not None else np.asarray(Image.open(io.BytesIO(data)))


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that hashes and counts every byte written."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


@dataclass
class ShardStats:
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Deterministic WebDataset tar writer (USTAR, fixed mtime/owner/mode, members in order).

    Written in ``PAX_FORMAT``, which gives exactly the USTAR header for an ASCII name of at most
    100 bytes (every VOC id) and adds a POSIX pax extended header only for a longer or non-ASCII
    name (USTAR alone cannot store a long id: its name field is 100 bytes and ours hold no ``/``
    to split on).  ``tarfile``, webdataset and GNU/BSD tar read both.

    Uses ``tarfile`` in plain write mode rather than ``webdataset.TarWriter``: the latter always
    opens a ``w|`` stream that re-buffers every member in 10 KB slices, which cost ~0.2 ms per
    256² sample here.  The member layout is the same WebDataset convention (``<key>.<ext>``,
    a sample's files adjacent and sorted by extension).
    """

    def __init__(self, fileobj):
        self._hf = _HashingFile(fileobj)
        self._tar = tarfile.open(fileobj=self._hf, mode="w", format=tarfile.PAX_FORMAT)
        self._tar.copybufsize = 1 << 24  # copy each member in one piece
        self.samples = 0

    def write(self, sample: dict) -> None:
        """``sample``: ``__key__`` plus bytes per extension (e.g. ``img.npy``, ``json``)."""
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> ShardStats:
        self._tar.close()
        return ShardStats(self.samples, self._hf.size, self._hf.sha.hexdigest())


TAR_READ_CHUNK = READ_CHUNK  # tarfile's read size, 64 KiB: its default 10 KB costs many calls, 1 MiB made it
# re-copy up to 2 MB of buffer per small read (benchmarks/bench_loader.py); a verifying Stream hands over
# chunks of exactly this size without copying them


def iter_tar_samples(fileobj):
    """Group a shard's members into (key, {ext: bytes}) samples, reading front to back.

    ``fileobj`` is a path or anything with ``read`` (a remote stream); plain ``tarfile`` in
    stream mode, so no seeking and no webdataset needed.
    """
    if isinstance(fileobj, (str, bytes)) or hasattr(fileobj, "__fspath__"):
        with open(fileobj, "rb") as f:
            yield from iter_tar_samples(f)
        return
    with tarfile.open(fileobj=fileobj, mode="r|", bufsize=TAR_READ_CHUNK) as tf:
        current, key = {}, None
        for member in tf:
            if not member.isfile():
                continue
            base, _, ext = member.name.partition(".")
            if key is not None and base != key:
                yield key, current
                current = {}
            key = base
            current[ext] = tf.extractfile(member).read()
        if key is not None:
            yield key, current


def stream_shard(location: str, expected: dict | None = None, verify: bool = True):
    """Yield one shard's samples from a path or URL; at its end check the manifest's record.

    ``expected`` is the shard's manifest entry (``samples``, ``bytes``, ``sha256``).  With
    ``verify`` the bytes are hashed while they stream and compared at the shard's end; the
    sample count is always compared.  Any problem is one ``KeyshardError`` naming the shard.
    """
    from keyshard.sources import Stream

    with Stream(location, hash_bytes=verify and expected is not None,
                size=expected["bytes"] if expected is not None else None) as stream:
        count = 0
        try:
            for sample in iter_tar_samples(stream):
                count += 1
                yield sample
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise KeyshardError(f"{location}: not a readable shard ({exc}); run `keyshard verify`") from None
        size, sha = stream.finish()
    if expected is None:
        return
    if sha is not None and (size != expected["bytes"] or sha != expected["sha256"]):
        raise KeyshardError(f"{location}: corrupt — its bytes differ from the manifest's sha256 "
                            f"({size} bytes read, manifest says {expected['bytes']})")
    if count != expected["samples"]:
        raise KeyshardError(f"{location}: {count} samples, manifest says {expected['samples']}")
