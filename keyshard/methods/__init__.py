"""Encryption methods are plug-ins: one module per method behind one ``Method`` protocol.

A method (``shf``, ``np``, ``ffx``, or one of yours) is a subclass of :class:`Method` plus the
frozen dataclass of its key material (a subclass of :class:`Material`).  Everything that differs
between methods — deriving key material, its JSON in key files, the compiled transform, wrong and
near-miss keys, the known-plaintext attack, ciphertext-only estimation, folding into a model — is a member of the method, so
the rest of keyshard calls ``methods.get(name).member(...)`` and never asks which method it holds.

The registry maps names to method instances:

* the built-in methods (``keyshard/methods/shf.py``, ``np.py``, ``ffx.py``);
* methods of installed packages, from the entry-point group ``keyshard.methods`` (each entry
  point names a ``Method`` subclass or instance), loaded once, on the first look-up;
* methods registered in-process with :func:`register`.  Worker processes (loky, dask) do not
  see an in-process registration — run such a method with ``--jobs 1`` or install it with an
  entry point.

The defaults (demo method, sweep's list, the paper's Table 1) live in :mod:`.defaults`.  Written
after litdata's ``streaming/compression.py``: an abstract class and a registry
(:class:`keyshard.registry.Registry`, shared with the tasks).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from keyshard.registry import Registry

ENTRY_POINT_GROUP = "keyshard.methods"
_BUILTIN_MODULES = ("shf", "np", "ffx")  # the order of keyshard's built-in methods everywhere


@dataclass(frozen=True, eq=False)
class Material(abc.ABC):
    """One method's key material for one block size M: what a plan is compiled from.

    Subclasses are frozen dataclasses that add their arrays after ``block_size`` and set
    ``method`` to their method's name.
    """

    method: ClassVar[str] = ""
    block_size: int

    @property
    def block_len(self) -> int:
        """3M²: the length of one flattened block, the positions a key acts on."""
        from keyshard.keys import CHANNELS

        return self.block_size * self.block_size * CHANNELS

    @property
    def divisor(self) -> int:
        """What the model divides stored pixels by (255 for uint8 output)."""
        return 255

    @abc.abstractmethod
    def canonical_bytes(self) -> bytes:
        """A stable encoding of the material: it is inside the keyed fingerprint, so it must
        never change for a given key (old key files keep their fingerprints)."""

    def equals(self, other: "Material") -> bool:
        """True when both apply exactly the same transform."""
        return (type(self) is type(other) and self.block_size == other.block_size
                and self.canonical_bytes() == other.canonical_bytes())


class Fold(NamedTuple):
    """How a key folds into a block-aligned stem of patch size S (``train/protect.py``).

    For each (channel, row, col) of an S×S patch: where its encrypted value comes from
    (``source`` = arrays (c, y, x)) and the affine map of normalised values,
    ``x_encrypted = scale · x_plain[source] + offset``.
    """

    source: tuple[np.ndarray, np.ndarray, np.ndarray]
    scale: np.ndarray
    offset: np.ndarray


class Estimate(NamedTuple):
    """A ciphertext-only estimate (``Method.estimate``): the candidate materials, the preferred
    first (NP: masks and their complements, which the data cannot tell apart), and notes for the
    report (how it was found, what decided between candidates)."""

    candidates: tuple
    notes: dict


class Method(abc.ABC):
    """One encryption method.  Stateless: an instance is registered once and shared.

    Class attributes: ``name`` (what key files, manifests and ``--method`` say), ``summary``
    (a few words for help texts), ``Material`` (its material class), ``storage_dtype`` (what
    shards store), ``takes_password`` (whether its keys use the key file's ``ffx_password``),
    ``material_schema`` (the JSON-schema ``properties`` of an explicit key's ``material`` object)
    and ``material_required``.  See docs/architecture.md for what each member guarantees.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Material: ClassVar[type[Material]]
    storage_dtype: ClassVar[type] = np.uint8
    takes_password: ClassVar[bool] = False
    keyspace_note: ClassVar[str] = ""
    material_schema: ClassVar[dict]
    material_required: ClassVar[tuple[str, ...]]
    key_fields: ClassVar[dict] = {}  # extra top-level key-file properties (FFX: ffx_password)

    # -- key material ------------------------------------------------------------------------
    @abc.abstractmethod
    def derive(self, key) -> Material:
        """The material of a ``keys.Key`` from its secret, or from ``key.reference_seed`` when
        set (the authors' ``torch.randperm`` derivation); the same on every machine."""

    @abc.abstractmethod
    def material_from_json(self, block_size: int, doc: dict, where: str) -> Material:
        """An explicit key's material from its (schema-checked) JSON; KeyshardError
        ``"<where>: 'material.<field>' ..."`` for what the schema cannot check."""

    @abc.abstractmethod
    def material_to_json(self, material: Material) -> dict:
        """The ``material`` object of an explicit key file (``material_from_json`` reads it back)."""

    # -- transforms --------------------------------------------------------------------------
    @abc.abstractmethod
    def compile(self, material: Material, height: int, width: int):
        """A ``transforms.Plan`` for H×W×3 images: numpy ``encrypt``/``decrypt`` (exact inverse)
        and ``to_torch`` with bit-identical output."""

    # -- key space ---------------------------------------------------------------------------
    @abc.abstractmethod
    def keyspace_bits(self, material: Material) -> float:
        """log2 of the number of keys of this material's kind (what an attacker must search)."""

    @abc.abstractmethod
    def keyspace_count(self, material: Material) -> int:
        """The exact number of keys of this kind (asked only when ``keyspace_bits`` <= 64)."""

    def describe(self, material: Material) -> list[tuple[str, str]]:
        """Extra ``key-info`` rows (name, value); never secret material."""
        return []

    # -- audits ------------------------------------------------------------------------------
    @abc.abstractmethod
    def wrong_material(self, base: Material, secret: bytes, vary_password: bool) -> Material:
        """A random key of ``base``'s kind drawn from ``secret`` alone: uniform over the keys the
        base's own rule allows (same block size, same mask size, ...)."""

    @abc.abstractmethod
    def wrong_rule(self, base: Material, vary_password: bool) -> str:
        """``wrong_material``'s rule in words (the audit's ``wrong_keys.rule``)."""

    @abc.abstractmethod
    def max_distance(self, material: Material) -> int:
        """The largest near-miss distance keys of this kind can have from ``material``."""

    @abc.abstractmethod
    def distance(self, a: Material, b: Material) -> int:
        """The number of elementary changes separating two keys of the same kind."""

    @abc.abstractmethod
    def near_miss(self, base: Material, d: int, rng: np.random.Generator) -> Material:
        """A random key at ``distance`` exactly ``d`` (1 <= d <= max_distance) from ``base``."""

    def neighbour(self, material: Material, rng: np.random.Generator) -> Material:
        """One hill-climbing step of ``attack search``: a random key at distance 1."""
        return self.near_miss(material, 1, rng)

    def exhaustive(self, start: Material, limit: int):
        """Every key of ``start``'s kind, when there are at most ``limit``; else None."""
        return None

    # -- attacks -----------------------------------------------------------------------------
    @abc.abstractmethod
    def recover(self, block_size: int, pairs: list) -> tuple[Material, dict, np.ndarray]:
        """Known-plaintext recovery from [(id, plain, encrypted)] H×W×3 pairs: the material, a
        summary for the report and a boolean array of what the pairs determine."""

    def compare(self, recovered: Material, truth: Material, determined: np.ndarray) -> dict:
        """Report fields saying how much of the true key an attack recovered."""
        return {"true_key_equal": recovered.equals(truth)}

    def estimate(self, block_size: int, images: list, prior, rng: np.random.Generator,
                 password: bytes | None = None, progress=None) -> Estimate | None:
        """Ciphertext-only estimation: the key material from keyed images alone (H×W×3 arrays of
        ``storage_dtype``), with an image prior of plain photographs (``methods.prior``) and
        ``rng`` for any random starts; ``password``: the FFX-style password when the attacker
        knows it (methods with ``takes_password``); ``progress(done, total)`` for long searches.
        None (the default): the method has no estimator."""
        return None

    def estimate_score(self, estimated: Material, truth: Material) -> dict:
        """How much of the true key an estimate got right: at least ``key_fraction`` (0..1, the
        share of the key material that is right), plus the method's own fields."""
        return {"key_fraction": 1.0 if estimated.equals(truth) else 0.0}

    # -- models ------------------------------------------------------------------------------
    def fold(self, material: Material, size: int) -> Fold | None:
        """The key as a per-value affine map over an S×S patch (``protect``), or None when the
        transform is not one (then a model cannot absorb the key into its stem)."""
        return None

    # -- deployment --------------------------------------------------------------------------
    def onnx_transform(self, material: Material, height: int, width: int):
        """The key transform as an ``onnx.GraphProto`` (opset 18) for ``keyshard export``: input
        ``pixels``, uint8 N×H×W×3; output ``keyed``, N×H×W×3 in ``storage_dtype``; equal to the
        compiled plan's ``encrypt`` bit for bit, so build it from the plan's own arrays
        (``methods.onnx_graph`` has the shared pieces).  None (the default) when the method has
        no ONNX form; export then refuses the method."""
        return None


# -- the registry ------------------------------------------------------------------------------

def _check_material_fields(method: Method, others: list[Method]) -> None:
    """Methods share the key file's ``material`` object: a field two methods name must mean the same."""
    for other in others:
        for field, spec in method.material_schema.items():
            if field in other.material_schema and other.material_schema[field] != spec:
                raise ValueError(f"method {method.name!r}: material field {field!r} differs from {other.name!r}'s")


REGISTRY = Registry("method", Method, __name__, _BUILTIN_MODULES, "METHOD", ENTRY_POINT_GROUP, _check_material_fields)
register, get, names = REGISTRY.register, REGISTRY.get, REGISTRY.names


def builtin_names() -> tuple[str, ...]:
    """keyshard's own methods, in their usual order (what the schemas on disk list)."""
    return _BUILTIN_MODULES


# -- the key file schema -------------------------------------------------------------------------

def key_schema(base: dict, method_names: tuple[str, ...] | None = None) -> dict:
    """The key file schema for ``method_names`` (default: every registered method).

    ``base`` is ``manifests/key.schema.json``; its method enum, the ``material`` properties, the
    methods' own top-level fields and the per-method rules ("is only for method X") are rebuilt
    from the methods' fragments.  For the built-ins this gives the file on disk back (a test
    checks it), so the file documents exactly what keyshard accepts.
    """
    chosen = [get(n) for n in (method_names or names())]
    owners_m = _owners(chosen, lambda m: m.material_schema)
    owners_k = _owners(chosen, lambda m: m.key_fields)
    schema = {**base}
    props = {k: v for k, v in base["properties"].items() if k not in owners_k}
    props["method"] = {"enum": [m.name for m in chosen]}
    for m in chosen:
        props.update(m.key_fields)
    props["material"] = {**base["properties"]["material"],
                         "properties": {f: spec for m in chosen for f, spec in m.material_schema.items()}}
    schema["properties"] = props
    rules = [r for r in base.get("allOf", []) if "method" not in r.get("if", {}).get("properties", {})]
    schema["allOf"] = [_method_rule(m, owners_m, owners_k) for m in chosen] + rules
    return schema


def _owners(chosen: list, fields) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in chosen:
        for f in fields(m):
            out.setdefault(f, []).append(m.name)
    return out


def _only_for(owners: list[str]) -> dict:
    who = owners[0] if len(owners) == 1 else ", ".join(owners[:-1]) + " and " + owners[-1]
    return {"not": {}, "errorMessage": f"is only for method{'s' if len(owners) > 1 else ''} {who}"}


def _method_rule(m: Method, owners_m: dict, owners_k: dict) -> dict:
    """``if method == m.name then`` refuse the other methods' fields and require m's material."""
    then = {f: _only_for(o) for f, o in owners_k.items() if m.name not in o}
    then["material"] = {"required": list(m.material_required),
                        "properties": {f: _only_for(o) for f, o in owners_m.items() if m.name not in o}}
    return {"if": {"required": ["method"], "properties": {"method": {"const": m.name}}},
            "then": {"properties": then}}
