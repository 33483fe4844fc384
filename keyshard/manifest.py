"""Reading ``manifest.json``: one schema-checked read per command into frozen records.

A shard directory (or URL base) is described by its ``manifest.json``; every stage reads it
through ``read`` (``keyshard.read_manifest``) and gets a ``Manifest``, whose records say what the
shards hold (``dataset``), how they were encrypted (``encryption``), their size (``image``),
their files (``shards``), splits, source and augmentation, and where the manifest comes from
(``provenance``: its sha256 and whether a signature was verified).  ``Manifest.raw`` is the JSON
as read, for what the records leave out.

Why records and not the dict: the rules of reading live here once (manifests written before the
``dataset`` entry are PASCAL VOC; the schema check; a signature checked over the exact bytes
before they are parsed), and a caller writes ``manifest.encryption.pixel_divisor`` instead of
knowing the JSON's nesting.  Writing a manifest is the encryption job's (``pipeline/manifest.py``).
"""

from __future__ import annotations

import json
import platform
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

from keyshard.errors import KeyshardError

MANIFEST = "manifest.json"
FORMAT = "keyshard-manifest/1"
_LIBRARIES = ("numpy", "torch", "torchvision", "pillow", "webdataset", "pyffx", "joblib")


@dataclass(frozen=True)
class Dataset:
    """What the labels mean.  ``task`` is ``segmentation`` or ``classification`` (kind
    ``image-folder``); ``ignore_index`` is the label no loss or metric counts (None: none)."""

    kind: str
    task: str
    num_classes: int
    ignore_index: int | None
    class_names: tuple[str, ...]

    @classmethod
    def from_json(cls, manifest: dict) -> "Dataset":
        """The ``dataset`` entry of a manifest (or checkpoint) dict; without one, PASCAL VOC
        (the rule is ``shardformat.dataset_info``'s)."""
        from keyshard.shardformat import dataset_info

        info = dataset_info(manifest)
        return cls(kind=info["kind"], task=info["task"], num_classes=info["num_classes"],
                   ignore_index=info["ignore_index"], class_names=tuple(info["class_names"]))

    def record(self) -> dict:
        """The JSON ``dataset`` entry, as checkpoints record it."""
        return {"kind": self.kind, "num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "class_names": list(self.class_names)}


@dataclass(frozen=True)
class Encryption:
    """How the shards were encrypted; all None but ``pixel_divisor`` and ``dtype`` when ``plain``.
    ``pixel_divisor``: what a model divides the stored integers by (255; FFX its largest code);
    ``dtype``: the stored pixels' numpy dtype name (``uint8``; FFX ``uint16``)."""

    plain: bool
    method: str | None
    block_size: int | None
    key_fingerprint: str | None
    key_derivation: str | None
    pixel_divisor: int
    dtype: str


@dataclass(frozen=True)
class Image:
    """Size of every stored image (``channels`` is always 3); ``max_pixels``: larger inputs were
    bad samples (None in manifests written before it was recorded)."""

    height: int
    width: int
    channels: int = 3
    max_pixels: int | None = None

    @property
    def size(self) -> int:
        """The side of the square images ``encrypt --image-size`` writes (their height)."""
        return self.height

    @property
    def shape(self) -> tuple[int, int, int]:
        """One stored image's array shape, H×W×3."""
        return (self.height, self.width, self.channels)


@dataclass(frozen=True)
class Shard:
    """One shard file: its split, augmentation replica (0: the images themselves), sample count,
    size and SHA-256, against which every read is checked."""

    file: str
    split: str
    replica: int
    samples: int
    bytes: int
    sha256: str

    def entry(self) -> dict:
        """The shard's JSON entry (what ``shardformat.stream_shard`` checks a stream against)."""
        return {"file": self.file, "split": self.split, "replica": self.replica, "samples": self.samples,
                "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Splits:
    """How the ids were split (``seed``, ``rule`` in words) and how many samples each split holds."""

    seed: int
    rule: str
    counts: dict[str, int]

    def __contains__(self, split: str) -> bool:
        return split in self.counts


@dataclass(frozen=True)
class Source:
    """The input dataset: ``kind`` (dir, tar, folders), ``path``, ``root`` of the VOC layout inside
    it (None in manifests written before it was recorded), the split files' and the content's
    SHA-256 (``pipeline/manifest.py`` says how the content checksum is computed)."""

    kind: str
    path: str
    root: str | None
    split_files: dict[str, str]
    content_sha256: str


@dataclass(frozen=True)
class Augmentation:
    """Augmentation replicas written before encryption: ``copies`` per image (0: none), ``seed``."""

    copies: int
    seed: int


@dataclass(frozen=True)
class Provenance:
    """Where a manifest comes from (``keyshard.signing.manifest_provenance``): the sha256 of its
    exact bytes, whether a signature was verified over them, and the signer's key fingerprint."""

    manifest_sha256: str
    signature_verified: bool
    signer_fingerprint: str | None

    def record(self) -> dict:
        """The provenance as checkpoints and audits record it."""
        return {"manifest_sha256": self.manifest_sha256, "signature_verified": self.signature_verified,
                "signer_fingerprint": self.signer_fingerprint}


@dataclass(frozen=True)
class Manifest:
    """A shard directory's ``manifest.json``, schema-checked (``keyshard.read_manifest``).

    ``raw`` is the JSON dict as read (treat it as read-only); ``provenance`` is None only for a
    manifest made with ``from_json`` from a dict rather than read from bytes."""

    dataset: Dataset
    encryption: Encryption
    image: Image
    shards: tuple[Shard, ...]
    splits: Splits
    source: Source
    augmentation: Augmentation
    tool_version: str
    command: tuple[str, ...]
    provenance: Provenance | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: dict, provenance: Provenance | None = None) -> "Manifest":
        """The records of a schema-valid manifest dict (``read`` checks the schema first)."""
        enc, image, source = doc["encryption"], doc["image"], doc["source"]
        return cls(
            dataset=Dataset.from_json(doc),
            encryption=Encryption(plain=enc["plain"], method=enc["method"], block_size=enc["block_size"],
                                  key_fingerprint=enc["key_fingerprint"], key_derivation=enc["key_derivation"],
                                  pixel_divisor=enc["pixel_divisor"], dtype=enc.get("dtype", "uint8")),
            image=Image(height=image["height"], width=image["width"], channels=image["channels"],
                        max_pixels=image.get("max_pixels")),
            shards=tuple(Shard(**{k: s[k] for k in ("file", "split", "replica", "samples", "bytes", "sha256")})
                         for s in doc["shards"]),
            splits=Splits(seed=doc["splits"]["seed"], rule=doc["splits"]["rule"],
                          counts=dict(doc["splits"]["counts"])),
            source=Source(kind=source["kind"], path=source["path"], root=source.get("root"),
                          split_files=dict(source["split_files"]), content_sha256=source["content_sha256"]),
            augmentation=Augmentation(copies=doc["augmentation"]["copies"], seed=doc["augmentation"]["seed"]),
            tool_version=doc["tool"]["version"],
            command=tuple(doc["command"]),
            provenance=provenance,
            raw=doc,
        )

    def shards_of(self, split: str, replica: int | None = None) -> tuple[Shard, ...]:
        """The split's shards in manifest order; with ``replica``, only that augmentation replica's."""
        return tuple(s for s in self.shards if s.split == split and (replica is None or s.replica == replica))

    def replicas(self, split: str) -> int:
        """How many augmentation replicas the split has (1: the images alone)."""
        return 1 + max((s.replica for s in self.shards_of(split)), default=0)


def as_manifest(manifest: "Manifest | dict") -> Manifest:
    """A ``Manifest`` as is; a manifest dict (already schema-checked, e.g. from ``json.load`` of a
    file ``read`` accepted) as its records, for code written against the 0.1 API's dict."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)


def read(source: str | Path, trust: str | Path | None = None) -> Manifest:
    """The manifest of a shard directory or URL base (``http(s)://…/``, ``s3://…/``),
    schema-checked, with its provenance.

    With ``trust`` (a public signing-key file) ``manifest.json.sig`` must be a valid signature
    over the manifest's exact bytes; it is checked *before* those bytes are parsed, and the
    manifest returned is parsed from the same bytes, so a changed manifest is refused as a bad
    signature.  Every problem is one ``KeyshardError`` naming the file.
    """
    from keyshard import signing, sources

    if trust is not None:
        signing.load_public(trust)  # a bad public-key file fails before anything is fetched
    path = location(source)
    raw = sources.read_bytes(path)
    provenance = signing.manifest_provenance(source, raw, trust)  # the signature before parsing
    doc = parse(raw, path)
    return Manifest.from_json(doc, Provenance(**provenance))


def location(source) -> str:
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
    """A manifest dict from its bytes, schema-checked; one clear error naming ``path`` otherwise."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyshardError(f"{path}: not JSON") from None
    if not isinstance(doc, dict):
        raise KeyshardError(f"{path}: not a JSON object")
    validate(doc, path)
    return doc


def schema() -> dict:
    """``manifests/manifest.schema.json`` with the method and dtype enums of the registered methods
    (for the built-ins that is the file as written; a test checks it)."""
    import numpy as np

    from keyshard import methods

    doc = json.loads(resources.files("keyshard.manifests").joinpath("manifest.schema.json").read_text())
    enc = doc["properties"]["encryption"]["properties"]
    enc["method"]["enum"] = [*methods.names(), None]
    enc["dtype"]["enum"] = list(dict.fromkeys(["uint8"] + [np.dtype(methods.get(n).storage_dtype).name
                                                          for n in methods.names()]))
    return doc


def validate(doc: dict, where: str) -> None:
    """``doc`` matches the manifest schema, else one ``KeyshardError`` naming ``where`` and the
    path (the error ``jsonschema.validate`` would raise: the best match)."""
    import jsonschema

    from keyshard import methods

    error = jsonschema.exceptions.best_match(_validator_for(methods.names()).iter_errors(doc))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise KeyshardError(f"{where}: manifest does not match the schema at {path}: {error.message}")


@lru_cache(maxsize=4)
def _validator_for(method_names: tuple[str, ...]):
    """The manifest schema's validator for these registered methods, checked and built once
    (every shard set read validates its manifest; the key file's validator is cached alike)."""
    import jsonschema

    doc = schema()
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc)


def library_versions() -> dict:
    """What output bytes and scores depend on besides keyshard (zlib: the shard masks'
    compression); recorded in manifests and audits."""
    out = {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
