"""Small file-system helpers: atomic writes, so no partial file ever stands under a final name."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to a temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    tmp = Path(tmp_dir or path.parent) / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, doc, tmp_dir: Path | None = None) -> None:
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), tmp_dir)
