"""Checkpoints: model, optimiser, scheduler, RNG, config, metrics, and the data's key identity.

``state["manifest"]`` records the provenance of the training shards' manifest
(``keyshard.signing.manifest_provenance``: its sha256, whether its signature was verified, the
signer's public-key fingerprint).  It sits beside ``data``, not in it: ``data`` must match on
``--resume``, while the provenance is re-checked by ``check_resume_provenance``.

Saved atomically (temporary name + rename) and always loaded with ``weights_only=True``, so a
checkpoint can never execute code.  They carry the key *fingerprint*, method and block size of
the shards the model was trained on — never key material.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from keyshard import tasks
from keyshard.errors import KeyshardError
from keyshard.manifest import Manifest, Provenance
from keyshard.options import MAX_IMAGE_SIZE
from keyshard.train.presets import BLOCK_MODELS, CLASSIFIERS

FORMAT = "keyshard-checkpoint/1"


def save(path: Path, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full, read-only, killed: no temporary left behind
        raise


def load_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` on the CPU; a missing or unreadable file is one clear error."""
    path = Path(path)
    if path.is_dir():
        raise KeyshardError(f"{path}: is a directory, not a {what} file")
    if not path.is_file():
        raise KeyshardError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's to fix
        raise KeyshardError(f"{path}: not a readable {what} ({type(exc).__name__})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fields(path, where: str, doc: dict, fields: dict) -> None:
    for name, (ok, expected) in fields.items():
        if name not in doc or not ok(doc[name]):
            raise KeyshardError(f"{path}: malformed checkpoint: {where}{name} is missing or not {expected}")


def _text(v) -> bool:
    return isinstance(v, str)


def _text_or_none(v) -> bool:
    return v is None or isinstance(v, str)


def _positive_int(v) -> bool:
    return _is_int(v) and v >= 1


def _state_dict(v) -> bool:
    return (isinstance(v, dict) and len(v) > 0
            and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()))


def validate(state, path, resume: bool = False) -> dict:
    """Check the fields the code reads, with one line naming the file for anything missing or of
    the wrong type: a checkpoint that loads safely (``weights_only``) can still be hand-made or
    damaged.  ``resume``: also what ``train --resume`` restores (optimizer, scheduler, RNG, metrics)."""
    from keyshard.train.presets import SEGMENTATION_MODELS

    models = (*SEGMENTATION_MODELS, *CLASSIFIERS)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise KeyshardError(f"{path}: not a keyshard checkpoint (format {FORMAT} expected)")
    _check_fields(path, "", state, {
        "model_name": (lambda v: v in models, f"one of {', '.join(models)}"),
        "model": (_state_dict, "a state dict of tensors"),
        "epoch": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
        "config": (lambda v: isinstance(v, dict), "a dict"),
        "data": (lambda v: isinstance(v, dict), "a dict"),
    })
    data = state["data"]
    _validate_data(path, data)
    mbs = state.get("model_block_size")
    if state["model_name"] in BLOCK_MODELS or mbs is not None:
        if not (_positive_int(mbs) and mbs <= data["image_size"]):
            raise KeyshardError(f"{path}: malformed checkpoint: model_block_size is missing or not a positive "
                                "integer no larger than the image size")
    if state.get("manifest") is not None:
        _validate_provenance(path, state["manifest"])
    if resume:
        _check_fields(path, "", state, {
            "optimizer": (lambda v: isinstance(v, dict), "a dict (optimizer state)"),
            "scheduler": (lambda v: isinstance(v, dict), "a dict (scheduler state)"),
            "rng": (lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8, "a uint8 tensor (RNG state)"),
            "metrics": (lambda v: isinstance(v, list), "a list"),
            "best_holdout_loss": (_is_number, "a number"),
        })
    return state


def _validate_data(path, data: dict) -> None:
    """``state["data"]``: the image size and divisor, the dataset, and for keyed data the key's identity."""
    from keyshard import methods

    _check_fields(path, "data.", data, {
        "plain": (lambda v: isinstance(v, bool), "true or false"),
        "image_size": (lambda v: _positive_int(v) and v <= MAX_IMAGE_SIZE, f"an integer in 1..{MAX_IMAGE_SIZE}"),
        "pixel_divisor": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "key_derivation": (_text_or_none, "a string or null"),
    })
    if "dataset" in data:
        ds = data["dataset"]
        kinds = {kind for name in tasks.names() for kind in tasks.get(name).kinds}  # the kind says the task
        if not (isinstance(ds, dict) and _positive_int(ds.get("num_classes"))
                and (ds.get("ignore_index") is None or _is_int(ds.get("ignore_index")))
                and ds.get("kind") in kinds and isinstance(ds.get("class_names"), list)):
            raise KeyshardError(f"{path}: malformed checkpoint: data.dataset is not a dict of kind, num_classes, "
                                "ignore_index and class_names")
    if not data["plain"]:
        _check_fields(path, "data.", data, {
            "method": (lambda v: v in methods.names(), f"one of {', '.join(methods.names())}"),
            "block_size": (lambda v: _positive_int(v) and data["image_size"] % v == 0,
                           "a positive integer dividing the image size"),
            "key_fingerprint": (_text, "a string"),
        })


def _validate_provenance(path, record) -> None:
    """``state["manifest"]``: the training manifest's sha256 and signature record."""
    if not isinstance(record, dict):
        raise KeyshardError(f"{path}: malformed checkpoint: manifest is not a dict")
    verified = record.get("signature_verified") is True
    _check_fields(path, "manifest.", record, {
        "manifest_sha256": (_text, "a string"),
        "signature_verified": (lambda v: isinstance(v, bool), "true or false"),
        "signer_fingerprint": (_text if verified else _text_or_none, "a string" if verified else "a string or null"),
    })


def check_key_kind(data: dict, key, ckpt_path, key_path) -> None:
    """``key`` is of the method and block size the checkpoint's model was trained with (and the
    model was trained with a key at all); else one line naming both files."""
    if data["plain"]:
        raise KeyshardError(f"{ckpt_path}: was trained on plain images; it has no key")
    if (key.method, key.block_size) != (data["method"], data["block_size"]):
        raise KeyshardError(f"{key_path}: is {key.method} M={key.block_size} but {ckpt_path} was trained "
                            f"with {data['method']} M={data['block_size']}")


def fingerprint_overridden(data: dict, key, ckpt_path, key_path, ignore_fingerprint: bool) -> bool:
    """False when ``key`` is the key the checkpoint names (its fingerprint); True for another key that
    ``ignore_fingerprint`` lets through (an explicit key recovered by an attack); else one line."""
    if key.fingerprint == data["key_fingerprint"]:
        return False
    if not ignore_fingerprint:
        raise KeyshardError(f"{key_path}: fingerprint does not match {ckpt_path} (the model was trained with "
                            "another key; `ignore_fingerprint=True` overrides)")
    return True


def load(path: str | Path, resume: bool = False) -> dict:
    """A checkpoint, loaded safely and validated (``validate``)."""
    return validate(load_file(path), path, resume)


def fit_state_dict(module: torch.nn.Module, weights: dict, path, what: str) -> None:
    """``module.load_state_dict(weights)`` (strict), a mismatch as one line naming the file: how
    many tensors are missing, unexpected or of another shape, and the first of them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        raise KeyshardError(f"{path}: {what} does not fit ({len(missing)} tensors missing, {len(unexpected)} "
                            f"unexpected, {len(reshaped)} of another shape, e.g. {first[:80]!r})")
    try:
        module.load_state_dict(weights)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise KeyshardError(f"{path}: {what} does not fit ({type(exc).__name__})") from None


def data_identity(manifest: Manifest) -> dict:
    """What a model is bound to (``state["data"]``): the shards' key fingerprint, method, block
    size, divisor, image size and source checksum, and the dataset (kind, class count, ignore
    index, class names)."""
    enc = manifest.encryption
    return {
        "dataset": manifest.dataset.record(),
        "plain": enc.plain, "method": enc.method, "block_size": enc.block_size,
        "key_fingerprint": enc.key_fingerprint, "key_derivation": enc.key_derivation,
        "pixel_divisor": enc.pixel_divisor, "image_size": manifest.image.size,
        "source_content_sha256": manifest.source.content_sha256,
    }


def dataset_of(state: dict) -> dict:
    """The dataset a checkpoint was trained on (``data.dataset``); checkpoints saved before it was
    recorded are VOC's (21 classes, 255 ignored)."""
    from keyshard.shardformat import dataset_info

    recorded = state["data"].get("dataset")
    return dataset_info({} if recorded is None else {"dataset": recorded})


def same_data(saved: dict, current: dict) -> bool:
    """``saved`` (a checkpoint's ``data``) and ``current`` name the same shards; an old ``saved``
    without ``dataset`` counts as VOC's."""
    from keyshard.shardformat import voc_dataset

    return {"dataset": voc_dataset(), **saved} == current


def check_resume_provenance(state: dict, provenance: Provenance, path) -> None:
    """A resumed run continues on the very manifest it started on (same sha256), and a run whose
    manifest signature was verified is resumed with a trusted key again.  Checkpoints made
    before manifests were recorded carry no ``manifest`` and are not checked."""
    old = state.get("manifest")
    if not old:
        return
    if old["manifest_sha256"] != provenance.manifest_sha256:
        raise KeyshardError(f"{path}: was trained on another manifest.json (sha256 {old['manifest_sha256'][:16]}…, "
                            f"now {provenance.manifest_sha256[:16]}…); refusing to resume")
    if old["signature_verified"] and not provenance.signature_verified:
        raise KeyshardError(f"{path}: the run verified the manifest's signature (signer "
                            f"{old['signer_fingerprint'][:16]}…); resume with `trust=NAME.pub`")


def load_model(ckpt_path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model, built by its task's model factory (``Task.hook("model")``) as it
    was trained, and loaded in eval mode on ``device``."""
    state = load(ckpt_path)
    name, mbs, weights = state["model_name"], state.get("model_block_size"), state["model"]
    num_classes = _class_count(ckpt_path, state)
    _check_stem(ckpt_path, state)
    try:
        model = tasks.get(model_task(state)).hook("model")(
            name, num_classes=num_classes, block_size=mbs, image_size=state["data"]["image_size"],
            aux_loss=any(k.startswith("aux_classifier") for k in weights))
    except KeyshardError as exc:
        raise KeyshardError(f"{ckpt_path}: {exc}") from None
    fit_state_dict(model, weights, ckpt_path, f"model weights for {name}")
    return model.to(device).eval(), state


def model_task(state: dict) -> str:
    """The name of the task a checkpoint's model is for: the task whose model factory builds it
    (``Task.hook("model_names")``).  The model decides, not the dataset record, which classifier
    checkpoints of 0.1 lack (``validate`` has checked that some task builds the model)."""
    name = state["model_name"]
    return next(task for task in tasks.names() if name in tasks.get(task).hook("model_names"))


def _class_count(ckpt_path, state: dict) -> int:
    """How many classes the checkpoint's model outputs.  A classifier's comes from its head's
    weights (checked to be there), as classifier checkpoints have always been loaded; any other
    model's from the dataset record."""
    from keyshard.train.classifiers import HEADS

    name = state["model_name"]
    if name not in HEADS:
        return dataset_of(state)["num_classes"]
    head = state["model"].get(HEADS[name] + "weight")
    if head is None or head.dim() != 2:
        raise KeyshardError(f"{ckpt_path}: model weights for {name} have no classification head ({HEADS[name]}weight)")
    return int(head.shape[0])


def _check_stem(ckpt_path, state: dict) -> None:
    """A block model's stem is S×S for its block size (``models.stem_stride``): checked before a
    model of that size is built, so a hand-made checkpoint cannot ask for a huge one."""
    from keyshard.train.models import stem_stride

    name, mbs = state["model_name"], state.get("model_block_size")
    if name not in BLOCK_MODELS:
        return
    stem = state["model"].get("stem.weight")
    if stem is None or stem.dim() != 4 or tuple(stem.shape[-2:]) != (stem_stride(mbs),) * 2:
        raise KeyshardError(f"{ckpt_path}: model weights do not fit {name} M={mbs} (stem.weight)")
