"""Where shards live: a local directory or a URL base (``http(s)://host/dir/``, ``s3://bucket/prefix/``).

A *source* is the string a user gave; a *location* is one file in it (``join(source, name)``).
URLs never go through ``pathlib`` (it would turn ``http://h/d`` into ``http:/h/d``).  Remote
bytes go through ``fsspec``: HTTP(S) is read as one front-to-back stream (``block_size=0``: no
Range requests, which plain static servers ignore), S3 through ``s3fs`` (the ``keyshard[s3]``
extra) with its endpoint and credentials from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).  Each open is retried a bounded number of
times on transient errors; anything else becomes one ``KeyshardError`` line naming the URL.
Remote reads work in forked DataLoader workers: fsspec drops its cached filesystems and event
loop in a child process.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from pathlib import Path

from keyshard.errors import KeyshardError

REMOTE_SCHEMES = ("http://", "https://", "s3://")
RETRIES = 3            # attempts per open on a transient error
RETRY_BACKOFF_S = 0.25  # doubled after each failed attempt
S3_BLOCK = 8 << 20      # s3fs read-ahead block: one ranged GET per 8 MiB
HASH_CHUNK = 1 << 20    # bytes per hand-off to the hashing thread
HASH_BUFFERS = 4        # pieces in flight between a reader and its hashing thread


def is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(REMOTE_SCHEMES)


def join(source, name: str) -> str:
    """The location of file ``name`` inside ``source`` (URL base or directory)."""
    if is_url(source):
        return source.rstrip("/") + "/" + name
    return str(Path(source) / name)


class _Transient(Exception):
    """An error worth another attempt (connection trouble, HTTP 5xx, throttling)."""


def _fsspec_open(location: str, size: int | None):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with torch
        raise KeyshardError(f"{location}: reading URLs needs fsspec (pip install fsspec)") from None
    if location.startswith("s3://"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise KeyshardError(f"{location}: reading s3:// needs the s3 extra "
                                "(pip install 'keyshard[s3]')") from None
        fs, path = fsspec.core.url_to_fs(location)
        return fs.open(path, "rb", block_size=S3_BLOCK, cache_type="readahead")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise KeyshardError(f"{location}: reading http(s) URLs needs aiohttp (pip install aiohttp)") from None
    fs, path = fsspec.core.url_to_fs(location)
    # block_size=0: one front-to-back GET, no Range requests; a known size skips the HEAD probe
    return fs.open(path, "rb", block_size=0, size=size)


def _classify(exc: BaseException, location: str) -> Exception:
    """Map a library error to a one-line KeyshardError, or _Transient if worth retrying."""
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        return _classify(exc.__cause__, location)  # fsspec's HTTP reports every failure as not found
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError) or status == 404:
        return KeyshardError(f"{location}: missing (not found)")
    if isinstance(exc, PermissionError) or status in (401, 403):
        return KeyshardError(f"{location}: access denied (check credentials: AWS_ACCESS_KEY_ID, ...)")
    if isinstance(status, int) and (status >= 500 or status == 429):
        return _Transient(f"{location}: server answered {status}")
    if isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return _Transient(f"{location}: cannot connect ({_reason(exc)})")
    if isinstance(exc, OSError):
        return KeyshardError(f"{location}: cannot read ({_reason(exc)})")
    return KeyshardError(f"{location}: cannot read ({name}: {_reason(exc)})")


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "strerror", None) or exc).splitlines()
    return text[0][:200] if text and text[0] else type(exc).__name__


def open_binary(location: str, size: int | None = None):
    """Open one file of a source for sequential binary reading (local file or URL); ``size``, when
    known (a shard's manifest entry), saves a round trip."""
    if not is_url(location):
        try:
            return open(location, "rb")
        except FileNotFoundError:
            raise KeyshardError(f"{location}: missing (not found)") from None
        except OSError as exc:
            raise KeyshardError(f"{location}: cannot read ({exc.strerror})") from None
    delay = RETRY_BACKOFF_S
    for attempt in range(RETRIES):
        try:
            return _fsspec_open(location, size)
        except KeyshardError:
            raise
        except Exception as exc:  # noqa: BLE001 - every library error becomes one line
            err = _classify(exc, location)
            if not isinstance(err, _Transient):
                raise err from None
            if attempt == RETRIES - 1:
                raise KeyshardError(f"{err} (after {RETRIES} attempts)") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class _Hasher:
    """SHA-256 on one background thread (``hashlib`` releases the GIL while it hashes).

    The source is read with ``readinto`` into a few reused ``HASH_CHUNK`` buffers that circulate
    between the reading thread and this one through two ``SimpleQueue``s.  Measured on the loader
    (``benchmarks/bench_loader.py``): a fresh 1 MiB ``bytes`` per piece is a fresh mmap that is
    page-faulted in and unmapped again, which cost the reading thread more than the hashing did;
    a ``ThreadPoolExecutor`` per piece added GIL switches.  Reused buffers also bound the memory:
    the reader waits when the hashing is ``HASH_BUFFERS`` pieces behind."""

    def __init__(self):
        self._sha, self._todo, self._free = hashlib.sha256(), queue.SimpleQueue(), queue.SimpleQueue()
        for _ in range(HASH_BUFFERS):
            self._free.put(bytearray(HASH_CHUNK))
        self._thread = threading.Thread(target=self._run, name="keyshard-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update, get, free = self._sha.update, self._todo.get, self._free.put
        while (item := get()) is not None:
            buf, n = item
            update(memoryview(buf)[:n])
            free(buf)

    def fill(self, readinto) -> memoryview:
        """The next piece, read by ``readinto(buffer)`` and queued for hashing (one thread: in
        order).  The view is valid until the next ``fill``."""
        buf = self._free.get()
        n = readinto(buf)
        if n:
            self._todo.put((buf, n))
        else:
            self._free.put(buf)
        return memoryview(buf)[:n]

    def stop(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.stop()
        return self._sha.hexdigest()


class Stream:
    """A location read front to back: counts bytes, optionally hashes them on a background thread
    (``_Hasher``: decoding goes on meanwhile), and turns read errors into one line naming the
    location.  ``finish()`` drains the rest and returns (bytes, sha256 hex)."""

    def __init__(self, location: str, hash_bytes: bool = True, size: int | None = None):
        self.location, self.size = location, 0
        self._f = open_binary(location, size)
        self._hasher = _Hasher() if hash_bytes else None
        self._chunk, self._pos = b"", 0

    def _io(self, call, arg):
        try:
            return call(arg)
        except KeyshardError:
            raise
        except Exception as exc:  # noqa: BLE001 - every library error becomes one line
            raise KeyshardError(str(_classify(exc, self.location))) from None

    def _readinto(self, buf: bytearray) -> int:
        n = self._io(self._f.readinto, buf) or 0
        self.size += n
        return n

    def read(self, n: int = -1):
        """Up to ``n`` bytes.  With hashing: a view of the current piece (``_Hasher.fill``), valid
        until the next ``read`` — ``tarfile`` copies what it reads at once."""
        if self._hasher is None:
            data = self._io(self._f.read, n)
            self.size += len(data)
            return data
        if n < 0:
            parts = [bytes(self._chunk[self._pos:])]
            while piece := self._hasher.fill(self._readinto):
                parts.append(bytes(piece))
            self._chunk, self._pos = b"", 0
            return b"".join(parts)
        if self._pos >= len(self._chunk):
            self._chunk, self._pos = self._hasher.fill(self._readinto), 0
        data = self._chunk[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def finish(self) -> tuple[int, str | None]:
        while self.read(1 << 20):
            pass
        self.close()
        return self.size, self._hasher.hexdigest() if self._hasher is not None else None

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.stop()
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_bytes(location: str, max_bytes: int = 64 << 20) -> bytes:
    """A whole (small) file: the manifest, its signature."""
    chunks, size = [], 0
    with Stream(location, hash_bytes=False) as f:
        while size <= max_bytes and (chunk := f.read(max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise KeyshardError(f"{location}: larger than {max_bytes} bytes")
    return data
