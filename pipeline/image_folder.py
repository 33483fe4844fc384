"""``keyshard encrypt --image-folder DIR``: a torchvision ``ImageFolder`` layout → keyed shards.

One sub-folder per class (sorted names give the class indices, as ``ImageFolder`` does); every
image file in it is a sample.  A sample's id is its path relative to DIR (``cat/0001.jpg``), its
shard members ``<key>.img.npy`` (the keyed image, as for VOC), ``<key>.cls`` (the class index as
ASCII text, the WebDataset convention) and ``<key>.json``.  The manifest's ``dataset`` entry is
``{"kind": "image-folder", "num_classes", "ignore_index": null, "class_names"}``.

Splits: ``--val-fraction F`` draws the test split per class (ids with the smallest
sha256('<seed>|val|<id>')), or ``--splits-from train=FILE,val=FILE`` lists ids; the holdout is
drawn from train exactly as for VOC (``splits.split_ids``).

``ImageFolderSource`` has the interface ``encrypt_job.plan_tasks`` and ``job_identity`` use on
``VocSource``; its refs (``ClassRef``) carry the class index instead of a mask, so everything
after planning — workers, backends, ``--resume``, ``--skip-bad``, manifest, determinism — is the
one encryption job's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from keyshard import params, seeded, shardformat
from keyshard.errors import KeyshardError
from keyshard.pipeline.voc import Blob

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MASK_RESIZE = "none (classification: labels are class indices)"
DEFAULT_VAL_FRACTION = 0.2  # per class, when neither a val fraction nor split files are given


@dataclass(frozen=True)
class ClassRef:
    """One image-folder sample: its image and class index (``process_shard`` writes ``<key>.cls``)."""

    voc_id: str
    image: Blob
    cls: int


def class_names(root: Path) -> list[str]:
    """Sorted class sub-folders of ``root`` (at least 2)."""
    if not root.is_dir():
        raise KeyshardError(f"{root}: not a directory (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise KeyshardError(f"{root}: holds {len(classes)} class folder(s); an ImageFolder layout needs at least 2")
    return classes


def scan(root: Path) -> tuple[list[str], dict[str, int]]:
    """Class names (sorted sub-folders) and {id: class index} of every image file under them."""
    classes = class_names(root)
    labels = {}
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise KeyshardError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            labels[p.relative_to(root).as_posix()] = c
    keys = {}
    for i in labels:
        k = key_of(i)
        if k in keys:
            raise KeyshardError(f"{root}: {keys[k]!r} and {i!r} have the same sample key {k!r}; rename one")
        keys[k] = i
    return classes, labels


def key_of(sample_id: str, replica: int = 0) -> str:
    """WebDataset key of an id: path separators become ``__``, dots are dropped (``shardformat.sample_key``)."""
    return shardformat.sample_key(sample_id.replace("/", "__"), replica)


def _read_list(path: str, labels: dict) -> list[str]:
    try:
        ids = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError):
        raise KeyshardError(f"{path}: split file not found or unreadable") from None
    missing = [i for i in ids if i not in labels]
    if missing:
        raise KeyshardError(f"{path}: lists {missing[0]!r}, which is not an image of the folder "
                            f"({len(missing)} such id(s); ids are paths relative to it, e.g. 'cat/0001.jpg')")
    if len(set(ids)) != len(ids):
        raise KeyshardError(f"{path}: lists an id twice")
    return ids


class ImageFolderSource:
    """An ImageFolder layout as a source of ``encrypt_job`` (ids per split, refs, split hashes)."""

    kind = "dir"
    dataset_kind = "image-folder"  # the manifest's dataset kind (which task its samples are)
    layout_root = "."

    def __init__(self, path: str, splits_from: dict | None, val_fraction: float | None, seed: int):
        self.path = Path(path)
        self.classes, self.labels = scan(self.path)
        self.splits_from = splits_from
        self.val_fraction = val_fraction
        if splits_from:
            self._ids = {name: _read_list(path, self.labels) for name, path in splits_from.items()}
            both = set(self._ids.get("train", ())) & set(self._ids.get("val", ()))
            if both:
                raise KeyshardError(f"{splits_from['val']}: id {min(both)!r} is also in the train list")
            self.rule = "train/test from --splits-from lists"
        else:
            self._ids = self._draw_val(val_fraction, seed)
            self.rule = f"test = per class the round({val_fraction} x n) ids with the smallest sha256('<seed>|val|<id>')"
        self.rule += "; holdout = ids of train with the smallest sha256('<seed>|<id>')"
        self.mask_resize = MASK_RESIZE

    def _draw_val(self, fraction: float, seed: int) -> dict[str, list[str]]:
        """Per class, the round(fraction x n) (at least 1) ids of smallest seeded rank are val."""
        by_class: dict[int, list[str]] = {}
        for i, c in self.labels.items():
            by_class.setdefault(c, []).append(i)
        val = []
        for c, ids in sorted(by_class.items()):
            val += seeded.ranked(ids, seed, tag="val")[:max(1, round(fraction * len(ids)))]
        chosen = set(val)
        return {"train": [i for i in self.labels if i not in chosen], "val": val}

    def split_ids(self, name: str) -> list[str]:
        if name not in self._ids:
            raise KeyshardError(f"no {name} split file given (`splits_from` has no {name}=FILE)")
        ids = self._ids[name]
        if name == "val" and not ids:
            raise KeyshardError(f"{self.splits_from['val']}: the test split is empty")
        return ids

    def split_sha256(self, name: str) -> str:
        if not self.splits_from or name not in self.splits_from:
            raise KeyshardError(f"no {name} list")  # a drawn split: the rule and identity() say it
        return hashlib.sha256(Path(self.splits_from[name]).read_bytes()).hexdigest()

    def split_file_label(self, split: str) -> str:
        name = {"train": "train", "holdout": "train", "test": "val"}[split]
        if self.splits_from and name in self.splits_from:
            return str(self.splits_from[name])
        return f"the `val_fraction` {name} part"

    def ref(self, sample_id: str, split_file: str) -> ClassRef:
        if sample_id not in self.labels:
            raise KeyshardError(f"{split_file}: lists {sample_id!r}, which is not an image of {self.path}")
        p = self.path / sample_id
        return ClassRef(sample_id, Blob(str(p), str(p.resolve())), self.labels[sample_id])

    def identity(self) -> dict:
        """The ``source`` fields beyond VOC's: the split rule's input and a hash of (id, class)."""
        sha = hashlib.sha256()
        for i, c in self.labels.items():
            sha.update(f"{i} {c}\n".encode())
        return {"val_fraction": self.val_fraction, "images_sha256": sha.hexdigest()}


@dataclass(frozen=True)
class ImageFolderDataset:
    """The ``encrypt --image-folder`` options; ``check`` is cheap (class folders only), ``open``
    scans every file (in the main process while the workers start)."""

    root: str
    splits_from: dict | None = None
    val_fraction: float | None = None  # None: DEFAULT_VAL_FRACTION unless splits_from is given

    def check(self) -> tuple[None, dict, dict]:
        """(worker label spec: none, the class is in each ref; manifest ``dataset`` entry; extra ``source`` fields)."""
        params.check_split_rule(self.splits_from, self.val_fraction, required=False)
        names = class_names(Path(self.root))
        return None, {"kind": ImageFolderSource.dataset_kind, "num_classes": len(names), "ignore_index": None,
                      "class_names": names}, {}

    def open(self, seed: int) -> ImageFolderSource:
        import os

        splits_from = None if not self.splits_from else {
            name: os.path.abspath(p) for name, p in self.splits_from.items()}
        fraction = DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction
        return ImageFolderSource(os.path.abspath(self.root), splits_from, None if splits_from else fraction, seed)
