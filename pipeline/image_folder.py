"""``keyshard encrypt --image-folder DIR``: a torchvision ``ImageFolder`` layout → keyed shards.

One sub-folder per class (sorted names give the class indices, as ``ImageFolder`` does); every
image file in it is a sample.  A sample's id is its path relative to DIR (``cat/0001.jpg``), its
shard members ``<key>.img.npy`` (the keyed image, as for VOC), ``<key>.cls`` (the class index as
ASCII text, the WebDataset convention) and ``<key>.json``.  The manifest's ``dataset`` entry is
``{"kind": "image-folder", "num_classes", "ignore_index": null, "class_names"}``.

Splits: ``--val-fraction F`` draws the test split per class (ids with the smallest
sha256('<seed>|val|<id>')), or ``--splits-from train=FILE,val=FILE`` lists ids; the holdout is
drawn from train exactly as for VOC (``splits.split_ids``).  Shards are written by joblib workers
in parallel; the bytes depend only on the inputs, key and options.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from keyshard import __version__, shardformat
from keyshard.errors import KeyshardError
from keyshard.fsutil import write_json_atomic  # noqa: F401  (manifest.write uses it)
from keyshard.keys import Key
from keyshard.pipeline import MAX_PIXELS
from keyshard.pipeline import manifest as manifest_mod
from keyshard.pipeline.splits import SPLITS, split_ids

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PARTIAL_DIR = ".keyshard-partial"


@dataclass(frozen=True)
class FolderOptions:
    size: int = 256
    splits: tuple[str, ...] = SPLITS
    shard_size: int = 128
    split_seed: int = 0
    holdout: int | None = None
    val_fraction: float | None = 0.2
    max_pixels: int = MAX_PIXELS
    # fields manifest.build reads (no augmentation replicas for image folders)
    augment_copies: int = 0
    augment_seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)


def scan(root: Path) -> tuple[list[str], dict[str, int]]:
    """Class names (sorted sub-folders) and {id: class index} of every image file under them."""
    if not root.is_dir():
        raise KeyshardError(f"{root}: not a directory (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise KeyshardError(f"{root}: holds {len(classes)} class folder(s); an ImageFolder layout needs at least 2")
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


def key_of(sample_id: str) -> str:
    """WebDataset key of an id: path separators become ``__``, dots are dropped (``shardformat.sample_key``)."""
    return shardformat.sample_key(sample_id.replace("/", "__"))


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


def plan_splits(labels: dict, options: FolderOptions, splits_from: dict | None) -> dict[str, list[str]]:
    if splits_from:
        train = _read_list(splits_from["train"], labels)
        val = _read_list(splits_from["val"], labels) if "val" in splits_from else []
        both = set(train) & set(val)
        if both:
            raise KeyshardError(f"{splits_from['val']}: id {min(both)!r} is also in the train list")
    else:
        f = options.val_fraction
        by_class: dict[int, list[str]] = {}
        for i, c in labels.items():
            by_class.setdefault(c, []).append(i)
        val = []
        for c, ids in sorted(by_class.items()):
            ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{options.split_seed}|val|{i}".encode()).digest())
            val += ranked[:max(1, round(f * len(ids)))] if f > 0 else []
        chosen = set(val)
        train = [i for i in labels if i not in chosen]
    if "test" in options.splits and not val:
        raise KeyshardError("the test split is empty (give --val-fraction > 0 or a val= list)")
    return split_ids(train, val, options.split_seed, options.holdout)


_PLAN = {}


def _plan(material, size):
    if material is None:
        return None
    ident = (hashlib.sha256(material.canonical_bytes()).digest(), size)
    if ident not in _PLAN:
        from keyshard.transforms import compile_plan

        _PLAN.clear()
        _PLAN[ident] = compile_plan(material, size, size)
    return _PLAN[ident]


def write_shard(name: str, split: str, items: list, root: str, material, options: FolderOptions,
                tmp_dir: str, out_dir: str) -> dict:
    """One shard: decode, resize, encrypt and write ``items`` [(id, class)]; atomic rename."""
    from keyshard.pipeline.samples import BadSample, decode_rgb, load_torch, resize_bilinear

    torch = load_torch()
    torch.set_num_threads(1)
    plan = _plan(material, options.size)
    tmp = Path(tmp_dir) / f"{name}.{os.getpid()}"
    inputs = []
    with open(tmp, "wb") as f:
        writer = shardformat.ShardWriter(f)
        for sample_id, cls in items:
            path = Path(root) / sample_id
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise KeyshardError(f"{path}: unreadable ({exc.strerror})") from None
            try:
                img = decode_rgb(data, str(path), options.max_pixels)
            except BadSample as exc:
                raise KeyshardError(str(exc)) from None
            h, w = img.shape[-2:]
            pixels = resize_bilinear(img, options.size).permute(1, 2, 0).contiguous().numpy()
            if plan is not None:
                pixels = plan.encrypt(pixels)
            inputs.append([sample_id, hashlib.sha256(data).hexdigest(), str(cls)])
            meta = {"id": sample_id, "orig_size": [int(h), int(w)], "split": split, "replica": 0, "class": cls}
            writer.write({"__key__": key_of(sample_id), "img.npy": shardformat.encode_npy(pixels),
                          "cls": str(cls).encode(), "json": shardformat.encode_meta(meta)})
        stats = writer.close()
    os.replace(tmp, Path(out_dir) / name)
    return {"file": name, "split": split, "replica": 0, "samples": stats.samples, "bytes": stats.bytes,
            "sha256": stats.sha256, "inputs": inputs, "failed": []}


def run(root: str, out: str, key: Key | None, options: FolderOptions, splits_from: dict | None = None,
        jobs: int = -1, command: list[str] | None = None, progress: bool = True) -> dict:
    from joblib import Parallel, delayed

    from keyshard.pipeline.encrypt_job import _refuse_output

    if key is not None and options.size % key.block_size:
        raise KeyshardError(f"{key.path or 'key'}: block size {key.block_size} does not divide --size {options.size}")
    src = Path(root).absolute()
    classes, labels = scan(src)
    splits = plan_splits(labels, options, splits_from)
    out_path = Path(out)
    _refuse_output(out_path, False)
    partial = out_path / PARTIAL_DIR
    (partial / "tmp").mkdir(parents=True, exist_ok=True)
    tasks, counts = [], {}
    for split in options.splits:
        ids = splits[split]
        counts[split] = len(ids)
        for index, start in enumerate(range(0, len(ids), options.shard_size)):
            tasks.append((shardformat.shard_name(split, index), split,
                          [(i, labels[i]) for i in ids[start:start + options.shard_size]]))
    material = key.material if key is not None else None
    records = Parallel(n_jobs=jobs, batch_size=1)(
        delayed(write_shard)(name, split, items, str(src), material, options, str(partial / "tmp"),
                             str(out_path.absolute())) for name, split, items in tasks)
    split_files = {}
    for name, path in sorted((splits_from or {}).items()):
        split_files[f"{name}.txt"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    identity = {
        "keyshard": __version__, "libraries": manifest_mod.library_versions(),
        "source": {"kind": "dir", "path": str(src), "root": ".", "split_files": split_files},
        "options": json.loads(json.dumps(asdict(options))),
    }
    doc = manifest_mod.build(identity, key, options, records, counts, command or sys.argv)
    doc["splits"]["rule"] = (
        ("train/test from --splits-from lists" if splits_from else
         f"test = per class the round({options.val_fraction} x n) ids with the smallest sha256('<seed>|val|<id>')")
        + "; holdout = ids of train with the smallest sha256('<seed>|<id>')")
    doc["image"]["mask_resize"] = "none (classification: labels are class indices)"
    doc["dataset"] = {"kind": "image-folder", "num_classes": len(classes), "ignore_index": None,
                      "class_names": classes}
    manifest_mod.write(out_path, doc)
    shutil.rmtree(partial, ignore_errors=True)
    return doc
