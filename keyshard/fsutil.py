"""Small file-system helpers: atomic writes, so no partial file ever stands under a final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

from keyshard.errors import KeyshardError


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, killed) leaves no temporary behind
        raise
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


# -- output paths ---------------------------------------------------------------------------
# One behaviour for every command that writes a file the user names (-o/--output, --csv):
# missing parent directories are created; an existing file is refused unless the command says
# otherwise; a directory where a file is expected, a parent that is a file, a read-only file
# system or a directory without write permission is one KeyshardError line naming the path,
# found before the command's work starts (check_output) and again when writing.

def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or type(exc).__name__


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output(path, *, directory: bool = False, overwrite: bool = False) -> Path:
    """Refuse an output path that cannot be written, with one line, without creating anything.

    ``directory``: the path names a directory (created on write); else a file.  Missing parent
    directories are fine — they are created when writing (``make_parent``).  The nearest existing
    ancestor must be a directory this process can create files in (tested by creating and
    removing an anonymous temporary file there, so read-only file systems are caught too).
    """
    p = Path(path)
    if p.is_dir() and not directory:
        raise KeyshardError(f"{p}: is a directory; give a file name")
    if p.exists() and directory and not p.is_dir():
        raise KeyshardError(f"{p}: exists and is not a directory")
    if (p.exists() or p.is_symlink()) and not directory and not overwrite:
        raise KeyshardError(f"{p}: already exists; refusing to overwrite")
    base = _existing_ancestor(p if directory else p.parent)
    if not base.is_dir():
        raise KeyshardError(f"{p}: cannot create it, {base} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise KeyshardError(f"{p}: cannot write in {base} ({_reason(exc)})") from None
    return p


def make_parent(path) -> Path:
    """Create the missing parent directories of an output file (one line if that fails)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyshardError(f"{p}: cannot create directory {p.parent} ({_reason(exc)})") from None
    return p


def write_output(path, data: bytes, *, overwrite: bool = False, durable: bool = False) -> Path:
    """Write a user-named output file atomically: parents created, nothing partial left behind,
    an existing file refused unless ``overwrite``, any OS failure one line naming the path."""
    p = Path(path)
    check_output(p, overwrite=overwrite)
    make_parent(p)
    try:
        write_atomic(p, data, durable=durable)
    except OSError as exc:
        raise KeyshardError(f"{p}: cannot write ({_reason(exc)})") from None
    return p


def os_error_line(exc: OSError) -> str:
    """An OSError the commands did not anticipate, as the CLI's one error line."""
    name = exc.filename if exc.filename is not None else ""
    return f"{name}: {_reason(exc)}" if name else f"{_reason(exc)}"


def write_new(path: Path, data: bytes, mode: int = 0o600, overwrite: bool = False, what: str = "file") -> None:
    """Create ``path`` with ``data`` for secrets and keys: a temporary file made with ``mode`` from
    the start (never readable by others, not even briefly), fsynced and renamed into place.  An
    existing ``path`` is refused unless ``overwrite`` (checked again right before the rename)."""
    from keyshard.errors import KeyshardError

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits from the requested mode
        if not overwrite and path.exists():
            raise KeyshardError(f"{path}: already exists; refusing to overwrite it")
        os.replace(tmp, path)
    except OSError as exc:
        raise KeyshardError(f"{path}: cannot write {what} ({exc.strerror})") from None
    finally:
        if tmp.exists():
            tmp.unlink()

