"""Writing manifest.json: what a shard directory holds and how it was made; ``verify`` checks it.

Reading it is the core's (``keyshard/manifest.py``: ``keyshard.read_manifest`` and the schema);
this module builds the manifest of a finished encryption job and writes it last, atomically.

The manifest carries the key *fingerprint* (a keyed HMAC), never the secret, password or
permutation.  ``source.content_sha256`` is a checksum of exactly the inputs used: SHA-256 over
the sorted lines ``"<id> <sha256(jpeg)> <sha256(png)>\\n"`` of every sample written, followed
by the SHA-256 of each split file — the same value for an extracted directory and for its tar.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

import numpy as np

from keyshard import __version__, methods
from keyshard.errors import KeyshardError
from keyshard.fsutil import write_json_atomic
from keyshard.manifest import FORMAT, MANIFEST, Manifest, as_manifest, read, validate


def content_checksum(records: list[dict], split_files: dict) -> str:
    lines = sorted({" ".join(entry) for r in records for entry in r["inputs"]})
    sha = hashlib.sha256()
    for line in lines:
        sha.update((line + "\n").encode())
    for name in sorted(split_files):
        sha.update(f"{name} {split_files[name]}\n".encode())
    return sha.hexdigest()


def build(identity: dict, key, options, records: list[dict], counts: dict, command: list[str],
          dataset: dict | None = None, split_rule: str | None = None) -> dict:
    """The manifest of a finished job; ``identity`` is the job's resume identity (encrypt_job).
    ``dataset``: the ``dataset`` entry (kind, num_classes, ignore_index, class_names); VOC's
    when not given."""
    from keyshard.shardformat import voc_dataset
    split_files = identity["source"]["split_files"]
    material = key.material if key is not None else None
    return {
        "format": FORMAT,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "keyshard", "version": __version__},
        "libraries": identity["libraries"],
        "command": list(command),
        "source": {**identity["source"], "content_sha256": content_checksum(records, split_files)},
        "dataset": dict(dataset) if dataset is not None else voc_dataset(),
        "splits": {
            "seed": options.split_seed,
            "rule": split_rule or "holdout = ids of train.txt with the smallest sha256('<seed>|<id>'); test = val.txt",
            "counts": counts,
        },
        "encryption": {
            "plain": key is None,
            "method": None if key is None else key.method,
            "block_size": None if key is None else key.block_size,
            "key_fingerprint": None if key is None else key.fingerprint,
            "key_derivation": None if key is None else key.derivation,
            "pixel_divisor": 255 if material is None else material.divisor,
            "dtype": "uint8" if key is None else np.dtype(methods.get(key.method).storage_dtype).name,
        },
        "image": {"height": options.size, "width": options.size, "channels": 3,
                  "resize": "bilinear, antialiased (torchvision uint8 kernel)",
                  "mask_resize": "nearest (PIL convention)", "max_pixels": options.max_pixels},
        "augmentation": {
            "copies": options.augment_copies, "seed": options.augment_seed,
            "crop_scale": list(options.crop_scale), "crop_ratio": [3 / 4, 4 / 3], "hflip_p": 0.5,
            "replica_seed": "sha256('keyshard-augment/1|<seed>|<id>|<replica>')[:8]",
        },
        "shards": [{k: r[k] for k in ("file", "split", "replica", "samples", "bytes", "sha256")} for r in records],
        "failed": [f for r in records for f in r["failed"]],
    }


def write(out: Path, doc: dict) -> None:
    """Schema-check ``doc`` and write it atomically as ``out/manifest.json``: the job's last step."""
    validate(doc, str(out / MANIFEST))
    write_json_atomic(out / MANIFEST, doc, tmp_dir=out / ".keyshard-partial" / "tmp")


def verify(source: str | Path, progress: bool = True, doc: Manifest | dict | None = None) -> list[str]:
    """Re-read every shard (local or remote), re-hash it and recount its samples against the
    manifest (``doc``, e.g. one whose signature was checked, or read from ``source``); return
    one line per problem (empty = OK)."""
    from tqdm import tqdm

    from keyshard import sources
    from keyshard.shardformat import stream_shard

    manifest = read(source) if doc is None else as_manifest(doc)
    problems = []
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        location = sources.join(source, shard.file)
        try:
            for _ in stream_shard(location, shard.entry(), verify=True):
                pass
        except KeyshardError as exc:
            problems.append(str(exc))
    if not sources.is_url(source):
        listed = {s.file for s in manifest.shards}
        for extra in sorted(p.name for p in Path(source).glob("*.tar") if p.name not in listed):
            problems.append(f"{Path(source) / extra}: shard not listed in the manifest")
    return problems
