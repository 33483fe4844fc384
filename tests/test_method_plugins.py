"""Encryption methods are plug-ins (issue 22): the registry, the schemas it fills in, no method
names outside keyshard/methods/, and a fourth method defined here alone that runs the whole
chain — keygen, encrypt, verify, train, evaluate, known-plaintext attack — with no change to
product code."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from keyshard import keys, methods
from keyshard.errors import KeyshardError
from keyshard.keys import CHANNELS
from keyshard.transforms import Plan, expand, to_blocks

from conftest import assert_user_error, invoke

ROOT = Path(__file__).resolve().parents[1]


# --8<-- [start:additive]
@dataclass(frozen=True, eq=False)
class AddMaterial(methods.Material):
    method = "add"
    shift: np.ndarray  # uint8, one shift per block position (3M² of them)

    def canonical_bytes(self) -> bytes:
        return b"shift" + self.shift.astype(np.uint8).tobytes()


class AddPlan(Plan):
    """One uint8 image of shifts: ``x + s`` and ``x - s`` wrap modulo 256 in uint8 arithmetic."""

    method = "add"

    def __init__(self, height, width, shift_image):
        super().__init__(height, width)
        self.shift = shift_image.reshape(-1)

    def _apply_flat(self, flat, forward):
        return flat + self.shift if forward else flat - self.shift

    def _torch_arrays(self):
        return {"shift": self.shift}

    @staticmethod
    def _torch_flat(t, flat, forward):
        return flat + t["shift"] if forward else flat - t["shift"]


def _shifts(secret: bytes, n: int) -> np.ndarray:
    return np.frombuffer(hashlib.shake_256(b"add-shift|" + secret).digest(n), dtype=np.uint8).copy()


class Additive(methods.Method):
    """A keyed per-position additive shift mod 256: position k of every block gets v + shift[k]."""

    name = "add"
    summary = "additive shift mod 256 (a test plug-in)"
    Material = AddMaterial
    material_required = ("shift",)
    material_schema = {"shift": {
        "description": "add: the shift 0..255 of each block position; 3M² integers.",
        "type": "array", "minItems": 3, "maxItems": keys.MAX_BLOCK_LEN,
        "items": {"type": "integer", "minimum": 0, "maximum": 255}}}

    def derive(self, key):
        n = key.block_size * key.block_size * CHANNELS
        if key.reference_seed is not None:
            return AddMaterial(key.block_size, (keys.reference_permutation(key.reference_seed, n) % 256).astype(np.uint8))
        return AddMaterial(key.block_size, _shifts(key.secret, n))

    def material_from_json(self, block_size, doc, where):
        if len(doc["shift"]) != block_size * block_size * CHANNELS:
            raise KeyshardError(f"{where}: 'material.shift' must have 3M² values")
        return AddMaterial(block_size, np.asarray(doc["shift"], dtype=np.uint8))

    def material_to_json(self, material):
        return {"shift": material.shift.tolist()}

    def compile(self, material, height, width):
        return AddPlan(height, width, expand(material.shift, height, width, material.block_size))

    def keyspace_bits(self, material):
        return 8.0 * material.block_len

    def keyspace_count(self, material):
        return 256 ** material.block_len

    def wrong_material(self, base, secret, vary_password):
        return AddMaterial(base.block_size, _shifts(secret, base.block_len))

    def wrong_rule(self, base, vary_password):
        return f"random shifts of the {base.block_len} block positions"

    def max_distance(self, material):
        return material.block_len

    def distance(self, a, b):
        return int((a.shift != b.shift).sum())

    def near_miss(self, base, d, rng):
        shift = base.shift.copy()
        where = rng.choice(shift.size, d, replace=False)
        shift[where] += rng.integers(1, 256, d).astype(np.uint8)  # never 0: each chosen position changes
        return AddMaterial(base.block_size, shift)

    def recover(self, block_size, pairs):
        """shift = encrypted − plain (mod 256), the same in every block of every pair."""
        diffs = np.concatenate([to_blocks(e, block_size) - to_blocks(p, block_size) for _, p, e in pairs])
        if not (diffs == diffs[:1]).all():
            raise KeyshardError("the encrypted samples are not one additive shift of the plain ones")
        return AddMaterial(block_size, diffs[0].astype(np.uint8)), {}, np.ones(diffs.shape[1], dtype=bool)

    # fold: the inherited None — v + s mod 256 wraps, so it is not an affine map a stem can absorb
# --8<-- [end:additive]


@pytest.fixture(scope="module")
def additive():
    """Registered once per process (a registration lasts for the process; --jobs 1 below)."""
    if "add" not in methods.names():
        methods.register(Additive)
    return methods.get("add")


# -- the registry and the schemas ---------------------------------------------------------------

def test_builtins_are_registered_in_order():
    assert methods.names()[:3] == methods.builtin_names() == keys.METHODS
    with pytest.raises(KeyshardError, match="unknown method 'nope'"):
        methods.get("nope")


def test_a_name_registers_once(additive):
    with pytest.raises(ValueError, match="already registered"):
        methods.register(Additive)


def test_entry_points_are_loaded(monkeypatch):
    """An installed package's ``keyshard.methods`` entry point is registered on first look-up."""
    import importlib.metadata

    class FakeEntryPoint:
        def load(self):
            class Shifted(Additive):
                name = "plugin-add"
            return Shifted

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [FakeEntryPoint()] if group == methods.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(methods.REGISTRY, "_plugins", {})  # filled again on the next look-up
    monkeypatch.setattr(methods.REGISTRY, "_loaded", False)
    assert methods.names() == (*methods.builtin_names(), "plugin-add")


def test_schemas_on_disk_are_the_registry_s_for_the_builtins():
    """The key and manifest schemas list the built-in methods; keyshard fills in the registry's."""
    on_disk = json.loads((ROOT / "manifests" / "key.schema.json").read_text())
    assert methods.key_schema(on_disk, methods.builtin_names()) == on_disk
    manifest = json.loads((ROOT / "manifests" / "manifest.schema.json").read_text())
    enc = manifest["properties"]["encryption"]["properties"]
    assert enc["method"]["enum"] == [*methods.builtin_names(), None]


def test_the_methods_package_is_installed():
    """pyproject lists its packages one by one: keyshard.methods must be among them (a wheel
    without it cannot load a key)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "keyshard.methods" in packages


def test_no_method_names_outside_the_methods_package():
    """No product code branches on a method name: only keyshard/methods/ (and its defaults) may."""
    pattern = re.compile(r'\.method *(==|!=|in)|method *(==|!=) *"|"(shf|np|ffx)"')
    hits = []
    for folder in ("keyshard", "pipeline", "train", "evaluate"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("keyshard/methods/"):  # the method modules and the defaults module
                continue
            hits += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if pattern.search(line)]
    assert not hits, "\n".join(hits)


# -- the fourth method ---------------------------------------------------------------------------

def test_additive_plans_are_exact_and_bit_identical(additive):
    import torch

    key = keys.Key("add", 4, bytes(range(32)))
    plan = additive.compile(key.material, 16, 8)
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 8, 3), dtype=np.uint8)
    y = plan.encrypt(x)
    np.testing.assert_array_equal(plan.decrypt(y), x)
    np.testing.assert_array_equal(plan.to_torch().encrypt(torch.from_numpy(x)).numpy(), y)
    blocks = to_blocks(x[0], 4)
    np.testing.assert_array_equal(to_blocks(y[0], 4), (blocks + key.material.shift).astype(np.uint8))


def test_additive_key_files_round_trip(additive, tmp_path):
    key = keys.Key("add", 2, bytes(range(32)), explicit=AddMaterial(2, np.arange(12, dtype=np.uint8)))
    keys.save(key, tmp_path / "k.json")
    assert keys.load(tmp_path / "k.json").material.equals(key.material)
    doc = json.loads((tmp_path / "k.json").read_text())
    doc["material"]["mask"] = "0" * 12
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    assert_user_error(invoke("key-info", tmp_path / "bad.json"), "'material.mask' is only for methods np and ffx")


def test_a_fourth_method_runs_the_whole_chain(additive, toy, tmp_path):
    """keygen → encrypt (--jobs 1: an in-process registration is not seen by worker processes)
    → verify → train → evaluate (wrong and near-miss keys) → known-plaintext attack; protect
    refuses it as it refuses FFX."""
    key, plain, enc = tmp_path / "key.json", tmp_path / "plain", tmp_path / "enc"
    ok = [invoke("keygen", "--method", "add", "-M", 4, "--image-size", 32, "-o", key),
          invoke("encrypt", "--voc", toy, "--plain", "-o", plain, "--image-size", 32, "--jobs", 1, "-q"),
          invoke("encrypt", "--voc", toy, "--key", key, "-o", enc, "--image-size", 32, "--jobs", 1, "-q"),
          invoke("verify", enc, "-q"),
          invoke("train", "--shards", enc, "-o", tmp_path / "run", "--preset", "demo", "--epochs", 1,
                 "--workers", 0, "-q"),
          invoke("evaluate", "--checkpoint", tmp_path / "run" / "best.pt", "--key", key, "--test", plain,
                 "--wrong-keys", 4, "--near-miss", "1,8", "--near-miss-keys", 2, "--workers", 0,
                 "-o", tmp_path / "audit", "-q"),
          invoke("attack", "known-plaintext", "--plain", plain, "--encrypted", enc, "-o", tmp_path / "rec.json",
                 "--key", key)]
    for res in ok:
        assert res.exit_code == 0, res.output
    assert json.loads((enc / "manifest.json").read_text())["encryption"]["method"] == "add"
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["key"]["method"] == "add" and audit["wrong_keys"]["count"] == 4
    assert audit["wrong_keys"]["rule"] == "random shifts of the 48 block positions"
    assert keys.load(tmp_path / "rec.json").material.equals(keys.load(key).material)
    assert '"true_key_equal": true' in ok[-1].output and "from 1 plain/encrypted pair(s)" in ok[-1].output
    res = invoke("train", "--shards", plain, "-o", tmp_path / "plain-run", "--preset", "demo", "--epochs", 1,
                 "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    assert_user_error(invoke("protect", "--checkpoint", tmp_path / "plain-run" / "best.pt", "--key", key,
                             "-o", tmp_path / "p.pt"), "ADD is not linear")
