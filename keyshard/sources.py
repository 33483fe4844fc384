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

import collections
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
READ_PIECE = 4 << 20    # bytes read and hashed at a time (_HashAhead): FFX verified 3-5 points faster than
# 1 MiB (fewer GIL hand-overs per MB), 256 KiB far slower (benchmarks/bench_loader.py)
READ_AHEAD = 3          # pieces read ahead of the decoding; as many may wait to be hashed
READ_CHUNK = 64 << 10   # the decoder's views of a piece: tarfile's read size (shardformat.TAR_READ_CHUNK)


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


_RETRY = object()  # _read_piece: the queues changed meanwhile, decide again


class _HashAhead:
    """Hashes a stream on a background thread that also reads ahead whenever it is idle.

    The stream is read in ``READ_PIECE`` immutable ``bytes``, in order, by whichever thread
    gets there first: the background thread reads up to ``READ_AHEAD`` pieces ahead when it
    has nothing to hash, and the decoding thread reads a piece itself when none is ready.
    Every piece is hashed by the background thread in file order (``hashlib`` releases the
    GIL), and the decoding thread gets ``READ_CHUNK`` views (tarfile's read size) of the same
    immutable bytes: what is decoded is exactly what is hashed, never rewritten.

    Why both may read (measured with ``benchmarks/bench_loader.py``): with cheap-to-hash data
    (NP, 1 byte per value) the background thread keeps up with reading and hashing, and the
    decoding thread makes no system calls at all; with FFX's uint16 codes hashing alone takes
    most of a core, a thread that must also read falls behind, and the decoding thread reading
    for itself was faster.  Memory stays bounded: at most ``READ_AHEAD`` pieces read ahead and
    ``READ_AHEAD`` pieces waiting to be hashed (24 MiB per stream at most)."""

    def __init__(self, read):
        self._read = read  # read(n) -> bytes; raises KeyshardError
        self._sha = hashlib.sha256()
        self._changed = threading.Condition()
        self._reading = threading.Lock()  # one reader at a time: pieces enter the queues in order
        self._ahead, self._unhashed = collections.deque(), collections.deque()
        self._eof, self._error, self._stop = False, None, False
        self._view, self._pos = memoryview(b""), 0
        self._thread = threading.Thread(target=self._run, name="keyshard-hash", daemon=True)
        self._thread.start()

    def _read_piece(self, keep_ahead: bool):
        """Read the next piece (holding ``_reading``) and queue it for hashing; ``keep_ahead``
        (the background thread) also queues it for the decoding thread, else it is returned;
        ``_RETRY`` when the queues changed while it waited for ``_reading``.  After a failed read
        nobody reads on: the position in the stream is unknown."""
        with self._reading:
            with self._changed:
                if self._error is not None:
                    raise self._error
                if not keep_ahead and self._ahead:  # the background thread read it meanwhile
                    self._changed.notify_all()
                    return self._ahead.popleft()
                if self._eof:
                    return None
                # decided before holding _reading: check again, so the queues stay within READ_AHEAD
                full = len(self._unhashed) >= READ_AHEAD
                if full or (keep_ahead and (self._unhashed or len(self._ahead) >= READ_AHEAD)):
                    return _RETRY
            try:
                data = self._read(READ_PIECE)
            except BaseException as exc:
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                raise
            with self._changed:
                if not data:
                    self._eof = True
                else:
                    self._unhashed.append(data)
                    if keep_ahead:
                        self._ahead.append(data)
                self._changed.notify_all()
            return data

    def _can_read_ahead(self) -> bool:
        return not self._eof and self._error is None and len(self._ahead) < READ_AHEAD

    def _run(self) -> None:
        update = self._sha.update
        try:
            while True:
                with self._changed:
                    while not (self._stop or self._unhashed or self._can_read_ahead()):
                        self._changed.wait()
                    if self._stop and not self._unhashed:
                        return
                    data = self._unhashed[0] if self._unhashed else None
                if data is None:
                    self._read_piece(keep_ahead=True)
                    continue
                update(data)
                with self._changed:
                    self._unhashed.popleft()
                    self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - the decoding thread raises it
            with self._changed:
                self._error = self._error or exc
                self._changed.notify_all()

    def _next_piece(self) -> bytes:
        while True:
            with self._changed:
                while len(self._unhashed) >= READ_AHEAD and not self._ahead and self._error is None:
                    self._changed.wait()  # hashing is behind: bounded memory
                if self._ahead:
                    self._changed.notify_all()  # room to read ahead again
                    return self._ahead.popleft()
            data = self._read_piece(keep_ahead=False)
            if data is not _RETRY:
                return data or b""

    def chunk(self) -> memoryview | bytes:
        """The next chunk of the stream, ``b""`` at its end."""
        if self._pos >= len(self._view):
            data = self._next_piece()
            if not data:
                return b""
            self._view, self._pos = memoryview(data), 0
        self._pos += READ_CHUNK
        return self._view[self._pos - READ_CHUNK:self._pos]

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()

    def close(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        self._thread.join()


class Stream:
    """A location read front to back: counts bytes, optionally hashes them (``_HashAhead``: on a
    background thread while decoding goes on), and turns read errors into one
    line naming the location.  ``finish()`` drains the rest and returns (bytes, sha256 hex)."""

    def __init__(self, location: str, hash_bytes: bool = True, size: int | None = None):
        self.location, self.size = location, 0
        self._f = open_binary(location, size)
        self._ahead = _HashAhead(self._read_raw) if hash_bytes else None
        self._left = b""

    def _io(self, call, arg):
        try:
            return call(arg)
        except KeyshardError:
            raise
        except Exception as exc:  # noqa: BLE001 - every library error becomes one line
            raise KeyshardError(str(_classify(exc, self.location))) from None

    def _read_raw(self, n: int) -> bytes:
        data = self._io(self._f.read, n)
        self.size += len(data)
        return data

    def read(self, n: int = -1) -> bytes | memoryview:
        """Up to ``n`` bytes (all the rest for ``n < 0``); ``b""`` at the end.  With hashing, a
        read of ``READ_CHUNK`` bytes (tarfile's) returns a view of the next chunk of an immutable
        piece, without a copy; it stays valid for as long as the caller keeps it."""
        if self._ahead is None:
            return self._read_raw(n)
        if n < 0:
            parts = [self._left]
            while chunk := self._ahead.chunk():
                parts.append(chunk)
            self._left = b""
            return b"".join(parts)
        data = self._left or self._ahead.chunk()
        if len(data) > n:
            data, self._left = data[:n], data[n:]
        else:
            self._left = b""
        return data

    def finish(self) -> tuple[int, str | None]:
        """Read to the end; (bytes read, their sha256 hex or None without hashing)."""
        while self.read(1 << 20):
            pass
        digest = self._ahead.hexdigest() if self._ahead is not None else None
        self.close()
        return self.size, digest

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
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
