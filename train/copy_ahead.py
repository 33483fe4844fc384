"""Receive the workers' next batch and copy it out of its slot on a thread, while the caller trains.

Why: the copy out of a shared-memory slot (``batch_ring.BatchRing.take``, about 45 ms for 256
FFX samples at 256², into fresh pages) ran on the caller's thread between two training steps,
with the GPU idle.  numpy's copy releases the GIL and a training step mostly waits on the
device, so on a thread the two overlap.  Measured, same run, copy on the caller's thread vs
here: FCN-ResNet50 on an H200 fed at 2/4/8 workers −1 to +13 % (mean +5 %, 6 pairs;
``benchmarks/bench_gpu.py``, with a first version that could hold one batch more); on 2 cores
with a 20 ms step stand-in, 1 and 2 workers, best of three +1 to +7 % (11 of 12 pairs faster).
With a consumer that does nothing but take batches it costs up to 8 % at 2 workers on 2 cores
(no core left for the thread).  At most ``depth`` batches wait copied: one batch more memory.
"""

from __future__ import annotations

import queue
import threading

from keyshard.errors import KeyshardError

_END = object()
_POLL_S = 0.05  # how often a waiting thread looks whether the other side has gone


class CopyAhead:
    """Iterate ``items`` on a thread, at most ``depth`` items ahead of the caller.

    The thread takes the next item only when fewer than ``depth`` wait, so at most ``depth``
    exist beyond the one the caller holds.  An exception raised while producing reaches the
    caller where the sequence ends.  A caller that stops early (``break``, an exception, the
    generator closed) stops the thread after the item it is producing; ``join()`` waits for
    that, and must come before anything else uses what ``items`` uses (the next epoch's
    DataLoader iterator).  Iterating an instance that was joined before its end raises one line.
    """

    def __init__(self, items, depth: int = 1):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._items = items
        self._room = threading.Semaphore(depth)  # items the thread may still take ahead
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="keyshard-copy-ahead", daemon=True)
        self._thread.start()

    def _wait_for_room(self) -> bool:
        while not self._stop.is_set():
            if self._room.acquire(timeout=_POLL_S):
                return True
        return False

    def _produce(self) -> None:
        items = iter(self._items)
        try:
            while self._wait_for_room():
                try:
                    item = next(items)
                except StopIteration:
                    self._queue.put((_END, None))
                    return
                self._queue.put((item, None))
        except BaseException as exc:  # noqa: BLE001 - handed over and raised on the caller's thread
            self._queue.put((_END, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            self._items = None  # what the items came from (the loader) is not kept alive by us

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise KeyshardError("this loader has started another epoch: iterate one epoch "
                                        "at a time") from None

    def __iter__(self):
        try:
            while True:
                item, exc = self._get()
                self._room.release()
                if item is _END:
                    if exc is not None:
                        try:
                            raise exc
                        finally:  # no frame -> exception -> traceback -> frame cycle keeping the loader
                            exc = None
                    return
                yield item
        finally:
            self._stop.set()

    def join(self) -> None:
        """Stop producing (if the caller stopped early), wait for the thread to end, and drop what
        it left copied."""
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get()
