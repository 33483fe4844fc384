"""Readers for PASCAL VOC 2012: an extracted directory or the official tar, read in place.

Both give the same thing: the ids of a segmentation split file and, per id, a small picklable
*reference* that a worker process turns into the JPEG and PNG bytes.  For the tar, a reference is
(offset, size) of the member data, so workers seek into the tar without re-scanning or
extracting it, and member names are never used as file-system paths.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from keyshard.errors import KeyshardError
from keyshard.shardformat import sample_key

SPLIT_DIR = "ImageSets/Segmentation"
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"


@dataclass(frozen=True)
class Blob:
    """Where one file's bytes live: a path, or (tar path, data offset, size)."""

    label: str  # what error messages call it
    path: str
    offset: int | None = None
    size: int | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise KeyshardError(f"{self.label}: tar is truncated (member data cut short)")
        return data


@dataclass(frozen=True)
class SampleRef:
    voc_id: str
    image: Blob
    mask: Blob


class VocSource:
    """A VOC2012 layout; ``open`` picks the directory or tar reader from the path.

    ``layout_root`` is where the layout sits inside ``path`` (``VOCdevkit/VOC2012``, ``VOC2012``
    or ``.``), recorded in the manifest's ``source.root``.
    """

    kind = "?"
    dataset_kind = "voc"  # the manifest's dataset kind (which task its samples are)
    layout_root = "."

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def open(path: str | os.PathLike) -> "VocSource":
        path = Path(path)
        if path.is_file():
            return VocTar(path)
        if path.is_dir():
            return VocDir(path)
        raise KeyshardError(f"{path}: VOC dataset not found (expected a VOC2012 directory or tar)")

    def split_ids(self, name: str) -> list[str]:
        """Ids listed in ``ImageSets/Segmentation/<name>.txt``, in file order, unique.

        ``train`` and ``val`` are also checked against each other (when the other file is there):
        an id in both would land in train and test, and two ids with the same sample key (ids
        differing only in dots, or an id that spells another id's augmentation replica
        ``<key>_a<r>``) would overwrite each other in the shards.  Either is refused, naming both.
        """
        ids = self._read_ids(name)
        other = {"train": "val", "val": "train"}.get(name)
        if other is not None:
            try:
                other_ids = self._read_ids(other)
            except KeyshardError:  # missing or bad: reported when that split is used
                other_ids = []
            self._check_disjoint(name, ids, other, other_ids)
        return ids

    def _split_label(self, name: str) -> str:
        return self.describe(f"{SPLIT_DIR}/{name}.txt")

    def _read_ids(self, name: str) -> list[str]:
        data = self.split_bytes(name)
        where = self._split_label(name)
        try:
            ids = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise KeyshardError(f"{where}: not a text file") from None
        if not ids:
            raise KeyshardError(f"{where}: lists no ids (empty split file)")
        seen = set()
        for i in ids:
            if i in seen:
                raise KeyshardError(f"{where}: lists id {i!r} twice")
            seen.add(i)
            if "/" in i or "\\" in i or i.startswith(".") or not i.isprintable():
                raise KeyshardError(f"{where}: invalid id {i!r}")
        return ids

    def _check_disjoint(self, name: str, ids: list[str], other: str, other_ids: list[str]) -> None:
        both = set(ids) & set(other_ids)
        if both:
            first = min(both)
            raise KeyshardError(
                f"{self._split_label(name)}: id {first!r} is also listed in {other}.txt "
                f"({len(both)} id(s) in both; an id in two splits would be trained and tested on)")
        owner = {}  # sample key -> (id, split file)
        for split, listed in ((name, ids), (other, other_ids)):
            for i in listed:
                k = sample_key(i)
                if k in owner:
                    j, where = owner[k]
                    raise KeyshardError(
                        f"{self._split_label(split)}: ids {j!r} ({where}.txt) and {i!r} ({split}.txt) "
                        f"have the same sample key {k!r} (keys are ids without dots)")
                owner[k] = (i, split)
        for k, (i, split) in owner.items():
            base, sep, r = k.rpartition("_a")
            if sep and r.isdigit() and r[0] != "0" and base in owner:
                j, where = owner[base]
                raise KeyshardError(
                    f"{self._split_label(split)}: id {i!r} has the sample key of replica {r} of id {j!r} "
                    f"({where}.txt) under `augment_copies`; rename one of them")

    def split_sha256(self, name: str) -> str:
        return hashlib.sha256(self.split_bytes(name)).hexdigest()

    def ref(self, voc_id: str, split_file: str) -> SampleRef:
        """Reference to the image and mask of an id; a missing file is a KeyshardError."""
        image = self._blob(f"{IMAGE_DIR}/{voc_id}.jpg", voc_id, split_file)
        mask = self._blob(f"{MASK_DIR}/{voc_id}.png", voc_id, split_file)
        return SampleRef(voc_id, image, mask)

    # implemented by the readers
    def split_bytes(self, name: str) -> bytes: ...
    def describe(self, rel: str) -> str: ...
    def _blob(self, rel: str, voc_id: str, split_file: str) -> Blob: ...


class VocDir(VocSource):
    kind = "dir"

    def __init__(self, path: Path):
        super().__init__(path)
        found = [rel for rel in (".", "VOC2012", "VOCdevkit/VOC2012") if (path / rel / SPLIT_DIR).is_dir()]
        if not found:
            raise KeyshardError(
                f"{path}: not a VOC2012 layout (no {SPLIT_DIR}/ here, in VOC2012/ or in VOCdevkit/VOC2012/)")
        if len(found) > 1:
            raise KeyshardError(f"{path}: holds more than one VOC2012 layout ({', '.join(found)}); "
                                "give the one to use")
        self.layout_root = found[0]
        self.root = path if found[0] == "." else path / found[0]

    def describe(self, rel: str) -> str:
        return str(self.root / rel)

    def split_bytes(self, name: str) -> bytes:
        p = self.root / SPLIT_DIR / f"{name}.txt"
        try:
            return p.read_bytes()
        except OSError:
            raise KeyshardError(f"{p}: split file not found or unreadable") from None

    def _blob(self, rel: str, voc_id: str, split_file: str) -> Blob:
        p = self.root / rel
        if not p.is_file():
            raise KeyshardError(f"{p}: missing, but id {voc_id} is listed in {split_file}")
        return Blob(str(p), str(p))


_MARKERS = (f"{SPLIT_DIR}/train.txt", f"{SPLIT_DIR}/val.txt")


def _unsafe_name(name: str) -> bool:
    """A member name that is absolute or climbs out with ``..`` (never counts as input)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[0].isalpha() and name[1] == ":")


class VocTar(VocSource):
    """The official ``VOCtrainval_11-May-2012.tar`` (uncompressed), indexed once, never extracted."""

    kind = "tar"

    def __init__(self, path: Path):
        super().__init__(path)
        file_size = path.stat().st_size
        self.members: dict[str, tarfile.TarInfo] = {}
        unsafe = 0
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    if _unsafe_name(m.name):  # never part of the dataset, whatever it holds
                        unsafe += 1
                        continue
                    self.members[m.name] = m
        except tarfile.ReadError as exc:
            hint = "compressed tars are not supported; use the uncompressed tar" if "compress" in str(exc) or "magic" in str(exc) else "truncated or not a tar"
            raise KeyshardError(f"{path}: cannot read tar ({hint})") from None
        except EOFError:
            raise KeyshardError(f"{path}: tar is truncated") from None
        for m in self.members.values():
            if m.offset_data + m.size > file_size:
                raise KeyshardError(f"{path}: tar is truncated ({m.name} is cut short)")
        # A layout root is a directory holding ImageSets/Segmentation/{train,val}.txt.  Exactly
        # one is accepted: with two, which one is "the" dataset is not ours to guess.
        prefixes = sorted({n[: -len(marker)] for n in self.members for marker in _MARKERS
                           if n.endswith(marker) and (len(n) == len(marker) or n[-len(marker) - 1] == "/")})
        if not prefixes:
            ignored = f"; {unsafe} member(s) with '..' or absolute names ignored" if unsafe else ""
            raise KeyshardError(f"{path}: tar holds no VOC2012 layout (no {_MARKERS[0]}{ignored})")
        if len(prefixes) > 1:
            roots = ", ".join(repr(p.rstrip("/") or ".") for p in prefixes[:4])
            raise KeyshardError(f"{path}: tar holds {len(prefixes)} VOC2012 layouts ({roots}); "
                                "refusing to guess which one to read")
        self.prefix = prefixes[0]
        self.layout_root = self.prefix.rstrip("/") or "."

    def describe(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}"

    def _member(self, rel: str) -> tarfile.TarInfo | None:
        return self.members.get(self.prefix + rel)

    def split_bytes(self, name: str) -> bytes:
        rel = f"{SPLIT_DIR}/{name}.txt"
        m = self._member(rel)
        if m is None:
            raise KeyshardError(f"{self.describe(rel)}: split file not found in tar")
        return Blob(self.describe(rel), str(self.path), m.offset_data, m.size).read()

    def _blob(self, rel: str, voc_id: str, split_file: str) -> Blob:
        m = self._member(rel)
        if m is None:
            raise KeyshardError(f"{self.describe(rel)}: missing, but id {voc_id} is listed in {split_file}")
        return Blob(self.describe(rel), str(self.path), m.offset_data, m.size)
