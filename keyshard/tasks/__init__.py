"""Tasks are plug-ins: one module per task (segmentation, classification) behind one ``Task`` class.

A task is what a shard set's labels are for.  Everything that differs between segmentation and
classification is a member of its task: the shard member that carries a sample's target
(``<key>.mask.png`` or ``<key>.cls``), its model factory and loss, the scorer that accumulates
an audit's metrics, the audit's rows and notes and the report's table.  The rest of keyshard asks
``tasks.for_kind(manifest.dataset.kind)`` (a manifest's dataset kind decides: ``voc`` and ``folders`` are
segmentation, ``image-folder`` classification) or ``tasks.of_audit(audit)`` and calls members.

Where each member lives follows the dependency direction (core ← pipeline; core ← train ←
evaluate):

* the ``Task`` subclass, sample encode/decode and all formatting of audits and reports are pure
  Python and numpy, so they live here in the core, where the encryption job, the loader and the
  report can all reach them;
* the model factory, the loss and the scorer need torch models and metrics that belong to the
  stages, so a task names them as ``"module:function"`` strings (``model``, ``loss``,
  ``scorer``) and the stage that needs one resolves it with :meth:`Task.hook` at run time.  The
  core never imports a stage: it only holds the name.

The registry is ``keyshard.registry.Registry``, as for methods; tasks are built in (a new task is a
new module here exposing its instance as ``TASK``, plus its model factory, scorer and sample
reader in the stages).
"""

from __future__ import annotations

import abc
import importlib
from typing import Callable, ClassVar

import numpy as np

from keyshard.registry import Registry

DEFAULT = "segmentation"  # what a manifest without a dataset entry and an audit without "task" hold
_BUILTIN_MODULES = ("segmentation", "classification")  # registry order: the report's section order


class Task(abc.ABC):
    """One task: what its samples carry, how a model for it is built, trained and scored, and how
    its audits and report rows read.  Subclasses set the class attributes and implement the
    abstract methods; instances are stateless."""

    name: ClassVar[str]                 # what audits ("task") and ``train --task`` say
    kinds: ClassVar[tuple[str, ...]]    # manifest dataset kinds whose shards hold this task's samples
    target_member: ClassVar[str]        # the shard member holding a sample's target ("mask.png", "cls")
    target_dtype: ClassVar[type]        # the loader's target dtype (np.uint8 masks, np.int64 classes)
    # stage hooks, "module:function", resolved by the stage that calls them (Task.hook)
    model: ClassVar[str]                # build(name, *, num_classes, block_size, image_size, weights, aux_loss)
    model_names: ClassVar[str]          # the tuple of model names that factory builds
    preset_models: ClassVar[str | None] = None  # {preset: model} when the presets' own models are not this task's
    # training: the rules the trainer applies to a configuration (values only; train/loop.py applies them)
    model_noun: ClassVar[str]           # its models in words ("segmentation model", "classifier")
    own_settings: ClassVar[tuple[str, ...]] = ()  # TrainConfig settings only this task's shards take
    loss: ClassVar[str]                 # loss(outputs, targets, aux_weight, ignore_index) -> summed loss
    scorer: ClassVar[str]               # Scorer(device, num_classes, ignore_index, keep_per_image)
    sample_reader: ClassVar[str]        # encrypt: reader(ref, augment_seed, options, labels) ->
    #                                     (image, target, orig_size, input_row, key_id)
    # audits
    headline: ClassVar[str]             # the score a key is summarised by ("miou", "top1_acc")
    score_label: ClassVar[str]          # that score in words, for plots ("mean IoU")
    metrics_note: ClassVar[dict]        # audit.json "metrics": what each score means
    near_miss: ClassVar[bool] = False   # its audits may score near-miss keys (results.near_miss)
    predictions: ClassVar[bool] = False  # its audits may draw predictions.png
    table_title: ClassVar[str] = ""     # the report's heading for its table after another task's
    # A deployed model's second output (keyshard export), beside ``logits``: its name, the ONNX op
    # that makes it from the logits over axis 1 ("ArgMax": int64 class ids; "Softmax": floats) and
    # whether the logits keep the image's H×W (one prediction per pixel).
    prediction: ClassVar[str] = "probabilities"
    prediction_op: ClassVar[str] = "Softmax"
    per_pixel: ClassVar[bool] = False

    def hook(self, member: str) -> Callable:
        """The stage object a hook attribute (``model``, ``model_names``, ``loss``, ``scorer``,
        ``sample_reader``) names, imported now."""
        module, _, attr = getattr(self, member).partition(":")
        return getattr(importlib.import_module(module), attr)

    # -- samples --------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_target(self, target) -> bytes:
        """The bytes of a sample's ``target_member``; the same target always gives the same bytes
        (shards are byte-reproducible)."""

    @abc.abstractmethod
    def decode_target(self, data: bytes) -> np.ndarray:
        """A target read back from its member's bytes; ``ValueError`` (or ``OSError``) when damaged."""

    @abc.abstractmethod
    def target_shape(self, height: int, width: int) -> tuple:
        """One target's shape for H×W images: ``(H, W)`` for a mask, ``()`` for a class index."""

    def sample_meta(self, target) -> dict:
        """Extra fields of a sample's ``<key>.json`` (none by default)."""
        return {}

    def padding_target(self, ignore_index: int | None) -> int:
        """The value a padding row's target is filled with (the loader pads the last batch to the
        same count on every rank; padding rows are never scored).  By default -100, what
        cross-entropy ignores; a task whose targets are unsigned says its own."""
        return -100

    # -- audits ---------------------------------------------------------------------------
    @abc.abstractmethod
    def key_row(self, scores: dict) -> dict:
        """One scored key's row in ``results.wrong.keys`` (the fingerprint is added before it)."""

    def summary(self, rows: list[dict]) -> dict:
        """``results.wrong.summary`` (and each near-miss distance's row) over key rows: the
        headline's mean / std / min / max (a NaN row when there is none)."""
        values = np.array([r[self.headline] for r in rows]) if rows else np.array([np.nan])
        return {"mean": float(np.mean(values)), "std": float(np.std(values)),
                "min": float(np.min(values)), "max": float(np.max(values))}

    def test_record(self, dataset) -> dict:
        """Extra fields of the audit's ``test`` record from the test data's ``Manifest.dataset``."""
        return {}

    @abc.abstractmethod
    def score_table(self, audit: dict) -> list[str]:
        """audit.md's table of the correct key, plain images and wrong keys (or the baseline)."""

    def notes(self, audit: dict) -> list[str]:
        """audit.md's lines after the table: how to read the numbers, a verdict (none by default)."""
        return []

    @abc.abstractmethod
    def key_table(self, rows: list[dict]) -> list[str]:
        """audit.md's table of every wrong key."""

    # -- the report -----------------------------------------------------------------------
    @abc.abstractmethod
    def report_fields(self, kind: str) -> dict[str, str]:
        """What the report reads from an audit of ``kind`` ("key", "baseline"): dotted field →
        expected JSON type (``NUMBER``, ``INT``, ``TEXT``)."""

    @abc.abstractmethod
    def table(self, audits: list[dict], paper: Callable[[dict], float | None]) -> tuple[list[str], list[dict]]:
        """The report's markdown lines and CSV rows for this task's audits (``_source``: the file
        each came from).  ``paper(audit)``: the paper's number for a full-scale audit, else None
        (the report decides what is full scale)."""


NUMBER, INT, TEXT = "a number", "an integer", "a string"  # report_fields' JSON types


def field(doc, dotted: str):
    """A nested field of an audit (``"results.wrong.summary.max"``), or None where any step is
    missing or not an object."""
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def number(doc, dotted: str) -> float | int | None:
    """An optional numeric field (per-image means are absent from audits written before them)."""
    value = field(doc, dotted)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def keyed_in_order(audits: list[dict]) -> list[dict]:
    """The key audits (not baselines) in the report's row order: method, M, model, file."""
    return sorted((a for a in audits if a.get("kind") != "baseline"),
                  key=lambda a: (a["key"]["method"], a["key"]["block_size"], a["checkpoint"]["model"],
                                 a.get("_source", "")))


def _check_kinds(task: Task, others: list[Task]) -> None:
    """A manifest dataset kind belongs to one task."""
    taken = {k for t in others for k in t.kinds}
    if taken & set(task.kinds):
        raise ValueError(f"task {task.name!r}: one of its dataset kinds {task.kinds} is already registered")


REGISTRY = Registry("task", Task, __name__, _BUILTIN_MODULES, "TASK", check=_check_kinds)
register, get, names = REGISTRY.register, REGISTRY.get, REGISTRY.names


def for_kind(kind: str) -> Task:
    """The task of a manifest's dataset kind (``voc``, ``folders``, ``image-folder``)."""
    for task in REGISTRY:
        if kind in task.kinds:
            return task
    from keyshard.errors import KeyshardError

    raise KeyshardError(f"unknown dataset kind {str(kind)[:40]!r}")


def of_audit(audit: dict) -> Task:
    """The task an audit.json was written for (no ``task`` field: the default, segmentation)."""
    return get(audit.get("task", DEFAULT))
