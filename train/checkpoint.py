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

from keyshard.errors import KeyshardError

FORMAT = "keyshard-checkpoint/1"


def save(path: Path, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` on the CPU; a missing or unreadable file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise KeyshardError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's to fix
        raise KeyshardError(f"{path}: not a readable {what} ({type(exc).__name__})") from None


def load(path: str | Path) -> dict:
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise KeyshardError(f"{path}: not a keyshard checkpoint (format {FORMAT} expected)")
    return state


def data_identity(manifest: dict) -> dict:
    """What a model is bound to: the shards' key fingerprint, method, block size, divisor."""
    enc = manifest["encryption"]
    return {
        "plain": enc["plain"], "method": enc["method"], "block_size": enc["block_size"],
        "key_fingerprint": enc["key_fingerprint"], "key_derivation": enc["key_derivation"],
        "pixel_divisor": enc["pixel_divisor"], "image_size": manifest["image"]["height"],
        "source_content_sha256": manifest["source"]["content_sha256"],
    }


def check_resume_provenance(state: dict, provenance: dict, path) -> None:
    """``--resume`` continues on the very manifest the run started on (same sha256), and a run
    whose manifest signature was verified is resumed with ``--trust`` again.  Checkpoints made
    before manifests were recorded carry no ``manifest`` and are not checked."""
    old = state.get("manifest")
    if not old:
        return
    if old["manifest_sha256"] != provenance["manifest_sha256"]:
        raise KeyshardError(f"{path}: was trained on another manifest.json (sha256 {old['manifest_sha256'][:16]}…, "
                            f"now {provenance['manifest_sha256'][:16]}…); refusing to resume")
    if old["signature_verified"] and not provenance["signature_verified"]:
        raise KeyshardError(f"{path}: the run verified the manifest's signature (signer "
                            f"{old['signer_fingerprint'][:16]}…); resume with --trust NAME.pub")


def load_model(ckpt_path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model, built as it was trained and loaded in eval mode on ``device``."""
    from keyshard.train.models import build_model

    state = load(ckpt_path)
    model = build_model(state["model_name"], aux_loss=any(k.startswith("aux_classifier") for k in state["model"]),
                        block_size=state.get("model_block_size"))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
