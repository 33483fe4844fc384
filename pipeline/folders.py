"""``keyshard encrypt --image-dir DIR --mask-dir DIR``: any segmentation dataset as two folders.

Images and masks pair by file stem (``a.jpg`` ↔ ``a.png``; the folders are read flat, hidden
files skipped).  A mask is a single-channel PNG of label values (a palette PNG is read as its
indices, whatever its colours).  Labels become class ids through a 256-entry lookup table built
once from ``--label-map`` (JSON raw id → class id or the ignore index; values it does not list
stay as they are) or ``--reduce-zero-label`` (ADE20K: 0 → ignore, v → v − 1); after it every
value must be below K or the ignore index, else the mask is a bad sample naming the file.

Splits: ``--splits-from train=FILE,val=FILE`` (one id = stem per line) or ``--val-fraction F``
(the round(F·n) ids with the smallest sha256('<seed>|val|<id>')).  The val part is the ``test``
split and ``holdout`` is drawn from train exactly as for VOC (``splits.split_ids``).

``FolderSource`` has the interface ``encrypt_job.plan_tasks`` and ``job_identity`` use on
``VocSource`` (ids per split, references to the files, split hashes), so everything after
planning — workers, resume, manifest, determinism — is the VOC job's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keyshard import params, seeded
from keyshard.errors import KeyshardError
from keyshard.pipeline.voc import Blob, SampleRef, VocSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png",)
MAX_SEG_CLASSES = 255  # masks are 8-bit: ids 0..254 plus an ignore value


@dataclass(frozen=True)
class LabelSpec:
    """What a worker does to a decoded mask: ``lut`` (256 uint8 bytes) then the range check.

    Picklable and small; ``None`` in the worker means VOC (its own checks, bytes unchanged)."""

    num_classes: int
    ignore_index: int | None
    lut: bytes | None = None  # None: identity
    how: str = ""  # for error messages: " (after `label_map`)" etc.

    def apply(self, arr: np.ndarray, label: str) -> np.ndarray:
        from keyshard.pipeline.samples import BadSample

        if self.lut is not None:
            arr = np.frombuffer(self.lut, np.uint8)[arr]
        k, v = self.num_classes, self.ignore_index
        if arr.size and int(arr.max()) >= k:
            values = np.unique(arr)
            bad = [int(x) for x in values if x >= k and x != v]
            if bad:
                allowed = f"0..{k - 1}" + (f" and the ignore index {v}" if v is not None else "")
                raise BadSample(f"{label}: label map has values {bad[:5]}{self.how} outside {allowed} "
                                f"(`num_classes={k}`)")
        return arr


def build_lut(num_classes: int, ignore_index: int | None, label_map: str | None,
              reduce_zero_label: bool) -> tuple[bytes | None, str, dict]:
    """(lookup table or None, how it was made for messages, record for the manifest)."""
    params.exactly_one({"`label_map`": label_map, "`reduce_zero_label`": reduce_zero_label}, required=False)
    if reduce_zero_label:
        if ignore_index is None:
            raise KeyshardError("`reduce_zero_label` needs an ignore index")
        lut = np.arange(256, dtype=np.int64) - 1
        lut[0] = ignore_index
        lut[ignore_index] = ignore_index  # already ignored pixels stay ignored
        return bytes(lut.astype(np.uint8)), " (after `reduce_zero_label`)", {"reduce_zero_label": True}
    if not label_map:
        return None, "", {}
    p = Path(label_map)
    try:
        raw = p.read_bytes()
        doc = json.loads(raw)
    except OSError:
        raise KeyshardError(f"{p}: label map file not found or unreadable") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyshardError(f"{p}: not JSON (expected an object raw id → class id, e.g. {{\"7\": 0}})") from None
    if not isinstance(doc, dict) or not doc:
        raise KeyshardError(f"{p}: expected a non-empty JSON object raw id → class id, e.g. {{\"7\": 0}}")
    lut = np.arange(256, dtype=np.uint8)
    for k, v in doc.items():
        try:
            src = int(k)
        except ValueError:
            src = -1
        if not 0 <= src <= 255 or str(src) != k.strip():
            raise KeyshardError(f"{p}: key {k!r} is not a raw label value 0..255")
        if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v < num_classes or v == ignore_index):
            allowed = f"0..{num_classes - 1}" + (f" or the ignore index {ignore_index}" if ignore_index is not None else "")
            raise KeyshardError(f"{p}: {k!r} maps to {v!r}, not a class id {allowed}")
        lut[src] = v
    return bytes(lut), " (after `label_map`)", {"label_map_sha256": hashlib.sha256(raw).hexdigest()}


def read_class_names(path: str | None, num_classes: int) -> list[str]:
    """K names from a text file (one per line) or a JSON list; default ``class_0``…"""
    if not path:
        return [f"class_{i}" for i in range(num_classes)]
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise KeyshardError(f"{p}: class names file not found or not UTF-8 text") from None
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise KeyshardError(f"{p}: expected one class name per line or a JSON list of strings")
    if len(names) != num_classes:
        raise KeyshardError(f"{p}: lists {len(names)} class names but `num_classes` is {num_classes}")
    return names


def _listing(folder: Path, extensions: tuple[str, ...], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise KeyshardError(f"{folder}: {what} directory not found")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in extensions:
            continue
        if p.stem in out:
            raise KeyshardError(f"{p}: two {what}s with the stem {p.stem!r} ({out[p.stem].name} and {p.name})")
        out[p.stem] = p
    if not out:
        raise KeyshardError(f"{folder}: holds no {what} files ({', '.join(extensions)})")
    return out


class FolderSource(VocSource):
    """Two flat folders paired by stem; same interface as ``VocSource`` for the encryption job."""

    kind = "folders"
    dataset_kind = "folders"  # the manifest's dataset kind (which task its samples are)

    def __init__(self, image_dir, mask_dir, splits_from: dict | None = None, val_fraction: float | None = None,
                 seed: int = 0):
        self.path = Path(image_dir)
        self.mask_dir = Path(mask_dir)
        self.layout_root = "."
        images = _listing(self.path, IMAGE_EXTENSIONS, "image")
        masks = _listing(self.mask_dir, MASK_EXTENSIONS, "mask")
        for stem, p in images.items():
            if stem not in masks:
                raise KeyshardError(f"{p}: has no mask {stem}.png in {self.mask_dir}")
        for stem, p in masks.items():
            if stem not in images:
                raise KeyshardError(f"{p}: has no image named {stem}.* in {self.path}")
        self.images, self.masks = images, masks
        self.splits_from = splits_from
        self._lists: dict[str, bytes] = {}
        if splits_from is None:
            ids = sorted(images)
            n_val = max(1, round(len(ids) * val_fraction))
            ranked = seeded.ranked(ids, seed, tag="val")
            val = sorted(ranked[:n_val])
            train = sorted(ranked[n_val:])
            self._lists = {"train": "".join(f"{i}\n" for i in train).encode(),
                           "val": "".join(f"{i}\n" for i in val).encode()}
            self.rule = (f"test = the round({val_fraction} x n) ids with the smallest sha256('<seed>|val|<id>'); "
                         "holdout = ids of the rest with the smallest sha256('<seed>|<id>')")
        else:
            self.rule = ("test = the ids of --splits-from val; holdout = ids of --splits-from train with the "
                         "smallest sha256('<seed>|<id>')")

    def _split_label(self, name: str) -> str:
        if self.splits_from is not None and name in self.splits_from:
            return str(self.splits_from[name])
        return f"the `val_fraction` {name} part"

    def describe(self, rel: str) -> str:
        return rel

    def split_bytes(self, name: str) -> bytes:
        if self.splits_from is None:
            return self._lists[name]
        if name not in self.splits_from:
            raise KeyshardError(f"no {name} split file given (`splits_from` has no {name}=FILE)")
        p = Path(self.splits_from[name])
        try:
            return p.read_bytes()
        except OSError:
            raise KeyshardError(f"{p}: split file not found or unreadable") from None

    def split_file_label(self, split: str) -> str:
        return self._split_label({"train": "train", "holdout": "train", "test": "val"}[split])

    def ref(self, sample_id: str, split_file: str) -> SampleRef:
        if sample_id not in self.images:
            raise KeyshardError(f"{split_file}: lists id {sample_id!r}, but {self.path} has no image/mask pair "
                                "with that stem")
        image, mask = self.images[sample_id], self.masks[sample_id]
        return SampleRef(sample_id, Blob(str(image), str(image.resolve())), Blob(str(mask), str(mask.resolve())))

    def identity(self) -> dict:
        """The ``source`` fields beyond VOC's: the mask folder and a hash of the pairing."""
        sha = hashlib.sha256()
        for stem in sorted(self.images):
            sha.update(f"{stem} {self.images[stem].name} {self.masks[stem].name}\n".encode())
        return {"mask_path": str(self.mask_dir.resolve()), "pairs_sha256": sha.hexdigest()}


@dataclass(frozen=True)
class FolderDataset:
    """The ``encrypt --image-dir/--mask-dir`` options, checked once before any work."""

    image_dir: str
    mask_dir: str
    num_classes: int
    ignore_index: int | None = 255
    label_map: str | None = None
    reduce_zero_label: bool = False
    class_names: str | None = None
    splits_from: dict | None = None
    val_fraction: float | None = None

    def check(self) -> tuple[LabelSpec, dict, dict]:
        """(worker label spec, manifest ``dataset`` entry, extra ``source`` fields)."""
        k, v = self.num_classes, self.ignore_index
        if not 1 <= k <= MAX_SEG_CLASSES:
            raise KeyshardError(f"`num_classes` {k} must be 1..{MAX_SEG_CLASSES} (masks are 8-bit)")
        if v is not None and not k <= v <= 255:
            raise KeyshardError(f"`ignore_index` {v} must be {k}..255 (0..{k - 1} are class ids)")
        params.check_split_rule(self.splits_from, self.val_fraction, required=True)
        lut, how, record = build_lut(k, v, self.label_map, self.reduce_zero_label)
        names = read_class_names(self.class_names, k)
        dataset = {"kind": FolderSource.dataset_kind, "num_classes": k, "ignore_index": v, "class_names": names}
        return LabelSpec(k, v, lut, how), dataset, record

    def open(self, seed: int) -> FolderSource:
        import os

        splits_from = None if self.splits_from is None else {
            name: os.path.abspath(p) for name, p in self.splits_from.items()}
        return FolderSource(os.path.abspath(self.image_dir), os.path.abspath(self.mask_dir), splits_from,
                            self.val_fraction, seed)
