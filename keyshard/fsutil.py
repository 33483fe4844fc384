"""Small file-system helpers: atomic writes, so no partial file ever stands under a final name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None, durable: bool = True) -> None:
    """Write ``data`` to a temporary file, then rename it to ``path`` (never a partial file).

    ``durable`` also fsyncs the file and its directory, so the rename survives a power loss;
    small bookkeeping files that are re-checked on use can skip that cost.
    """
    path = Path(path)
    tmp = Path(tmp_dir or path.parent) / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def write_json_atomic(path: Path, doc, tmp_dir: Path | None = None, durable: bool = True) -> None:
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), tmp_dir, durable)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()
