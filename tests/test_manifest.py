"""The typed manifest (keyshard/manifest.py): one schema-checked read into frozen records, older
manifests read as they always did, and the same one-line errors."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import keyshard
from keyshard.errors import KeyshardError
from keyshard.manifest import MANIFEST, Manifest, as_manifest, read
from keyshard.shardformat import NUM_CLASSES, VOC_CLASS_NAMES, VOID

EXAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "example-manifest.json"


def write(directory: Path, doc: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(json.dumps(doc))
    return directory


def test_records_say_what_the_json_says(tmp_path):
    doc = json.loads(EXAMPLE.read_text())
    m = keyshard.read_manifest(write(tmp_path / "d", doc))
    assert isinstance(m, Manifest) and m.raw == doc
    enc = doc["encryption"]
    assert (m.encryption.plain, m.encryption.method, m.encryption.block_size, m.encryption.key_fingerprint,
            m.encryption.key_derivation, m.encryption.pixel_divisor, m.encryption.dtype) == \
        (enc["plain"], enc["method"], enc["block_size"], enc["key_fingerprint"], enc["key_derivation"],
         enc["pixel_divisor"], enc["dtype"])
    assert (m.image.height, m.image.width, m.image.size, m.image.shape) == (64, 64, 64, (64, 64, 3))
    assert (m.dataset.kind, m.dataset.task, m.dataset.num_classes, m.dataset.ignore_index) == \
        ("voc", "segmentation", 21, 255)
    assert m.dataset.record() == doc["dataset"]
    assert [s.entry() for s in m.shards] == doc["shards"]
    assert [s.file for s in m.shards_of("train")] == ["train-000000.tar", "train-000001.tar"]
    assert [s.file for s in m.shards_of("train", replica=1)] == ["train-000001.tar"]
    assert (m.replicas("train"), m.replicas("test"), m.replicas("nothing")) == (2, 1, 1)
    assert "holdout" in m.splits and "val" not in m.splits and m.splits.counts == doc["splits"]["counts"]
    assert m.source.content_sha256 == doc["source"]["content_sha256"] and m.source.root == "."
    assert (m.augmentation.copies, m.tool_version, m.command[:2]) == (1, "0.1.0", ("keyshard", "encrypt"))
    digest = hashlib.sha256((tmp_path / "d" / MANIFEST).read_bytes()).hexdigest()
    assert m.provenance.record() == {"manifest_sha256": digest, "signature_verified": False,
                                     "signer_fingerprint": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.encryption.method = "shf"


def test_manifests_of_earlier_versions_read_as_before(tmp_path):
    """No ``dataset`` entry: PASCAL VOC (21 classes, 255 ignored); no ``source.root`` or
    ``image.max_pixels``: None."""
    doc = json.loads(EXAMPLE.read_text())
    del doc["dataset"], doc["source"]["root"], doc["image"]["max_pixels"]
    m = read(write(tmp_path / "old", doc))
    assert (m.dataset.kind, m.dataset.task, m.dataset.num_classes, m.dataset.ignore_index) == \
        ("voc", "segmentation", NUM_CLASSES, VOID)
    assert m.dataset.class_names == VOC_CLASS_NAMES
    assert m.source.root is None and m.image.max_pixels is None


def test_a_dict_still_works_where_a_manifest_is_taken():
    doc = json.loads(EXAMPLE.read_text())
    m = as_manifest(doc)
    assert m == Manifest.from_json(doc) and as_manifest(m) is m and m.provenance is None


def test_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(KeyshardError, match="not a directory of shards"):
        read(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyshardError, match="missing — the directory is not a finished keyshard dataset"):
        read(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{")
    with pytest.raises(KeyshardError, match="manifest.json: not JSON"):
        read(tmp_path / "bad")
    doc = json.loads(EXAMPLE.read_text())
    doc["encryption"]["pixel_divisor"] = 0
    with pytest.raises(KeyshardError, match="does not match the schema at encryption/pixel_divisor"):
        read(write(tmp_path / "schema", doc))
