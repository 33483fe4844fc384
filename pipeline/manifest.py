"""manifest.json: what a shard directory holds and how it was made; ``verify`` checks it.

The manifest carries the key *fingerprint* (a keyed HMAC), never the secret, password or
permutation.  ``source.content_sha256`` is a checksum of exactly the inputs used: SHA-256 over
the sorted lines ``"<id> <sha256(jpeg)> <sha256(png)>\\n"`` of every sample written, followed
by the SHA-256 of each split file — the same value for an extracted directory and for its tar.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import zlib
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from keyshard import __version__, methods
from keyshard.errors import KeyshardError
from keyshard.fsutil import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "keyshard-manifest/1"
_LIBRARIES = ("numpy", "torch", "torchvision", "pillow", "webdataset", "pyffx", "joblib")


def library_versions() -> dict:
    """What the output bytes depend on besides keyshard (zlib: the shard masks' compression)."""
    out = {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def schema() -> dict:
    """``manifests/manifest.schema.json`` with the method and dtype enums of the registered methods
    (for the built-ins that is the file as written; a test checks it)."""
    doc = json.loads(resources.files("keyshard.manifests").joinpath("manifest.schema.json").read_text())
    enc = doc["properties"]["encryption"]["properties"]
    enc["method"]["enum"] = [*methods.names(), None]
    enc["dtype"]["enum"] = list(dict.fromkeys(["uint8"] + [np.dtype(methods.get(n).storage_dtype).name
                                                          for n in methods.names()]))
    return doc


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


def validate(doc: dict, where: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(doc, schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise KeyshardError(f"{where}: manifest does not match the schema at {path}: {exc.message}") from None


def write(out: Path, doc: dict) -> None:
    validate(doc, str(out / MANIFEST))
    write_json_atomic(out / MANIFEST, doc, tmp_dir=out / ".keyshard-partial" / "tmp")


def load_bytes(source: str | Path) -> tuple[dict, bytes]:
    """Read and schema-check ``manifest.json`` of a shard directory or URL base; also its exact bytes
    (what a signature covers).  One clear error if it is not there."""
    from keyshard import sources

    path = _location(source)
    raw = sources.read_bytes(path)
    return parse(raw, path), raw


def _location(source) -> str:
    """Where ``manifest.json`` of ``source`` is; for a directory, one clear error if it is not there."""
    from keyshard import sources

    path = sources.join(source, MANIFEST)
    if not sources.is_url(source):
        if not Path(source).is_dir():
            raise KeyshardError(f"{source}: not a directory of shards")
        if not Path(path).exists():
            raise KeyshardError(f"{path}: missing — the directory is not a finished keyshard dataset")
    return path


def parse(raw: bytes, path: str) -> dict:
    """A manifest from its bytes, schema-checked; one clear error naming ``path`` otherwise."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyshardError(f"{path}: not JSON") from None
    if not isinstance(doc, dict):
        raise KeyshardError(f"{path}: not a JSON object")
    validate(doc, path)
    return doc


def load(source: str | Path) -> dict:
    """The manifest of a shard directory or URL base (``keyshard.read_manifest``)."""
    return load_bytes(source)[0]


def load_trusted(source: str | Path, trust: str | Path | None = None) -> tuple[dict, dict]:
    """The manifest and its provenance (``keyshard.signing.manifest_provenance``: sha256, whether
    a signature was verified, signer fingerprint).  With ``trust`` (a public-key file) the
    signature is checked over the exact bytes *before* they are parsed, and the manifest returned
    is parsed from those same bytes: a tampered manifest is refused as a bad signature."""
    from keyshard import signing, sources

    if trust is None:
        doc, raw = load_bytes(source)
        return doc, signing.manifest_provenance(source, raw, None)
    signing.load_public(trust)  # a bad --trust file fails before anything is fetched
    path = _location(source)
    raw = sources.read_bytes(path)
    provenance = signing.manifest_provenance(source, raw, trust)
    return parse(raw, path), provenance


def verify(source: str | Path, progress: bool = True, doc: dict | None = None) -> list[str]:
    """Re-read every shard (local or remote), re-hash it and recount its samples against the
    manifest (``doc``, e.g. one whose signature was checked, or read from ``source``); return
    one line per problem (empty = OK)."""
    from tqdm import tqdm

    from keyshard import sources
    from keyshard.shardformat import stream_shard

    doc = load(source) if doc is None else doc
    problems = []
    for shard in tqdm(doc["shards"], desc="verify", unit="shard", disable=not progress):
        location = sources.join(source, shard["file"])
        try:
            for _ in stream_shard(location, shard, verify=True):
                pass
        except KeyshardError as exc:
            problems.append(str(exc))
    if not sources.is_url(source):
        listed = {s["file"] for s in doc["shards"]}
        for extra in sorted(p.name for p in Path(source).glob("*.tar") if p.name not in listed):
            problems.append(f"{Path(source) / extra}: shard not listed in the manifest")
    return problems
