"""Shared-memory batch slots: DataLoader workers stack batches into them, the main process copies out.

Why: the stock hand-off of a batch tensor from a worker makes the worker copy it into a *fresh*
shared-memory segment every batch (new pages: allocate, fault in, zero, free again).  Measured
with ``benchmarks/bench_loader.py`` on 2 cores, that cost a worker about as much CPU as reading
and decoding the batch.  Here each worker owns a few slots allocated once, before the workers
start; it stacks a batch straight into a free slot and sends only a ``SlotBatch`` (slot number,
row count, keys).  The main process copies the rows out — into pinned memory when CUDA is used,
the copy ``pin_memory`` would make anyway — and frees the slot.  So every batch the caller gets
is its own tensor; nothing it keeps can be overwritten.

A worker that finds none of its slots free (DataLoader may give one worker more than
``prefetch_factor`` batches to do when another has finished) hands that batch over the stock way,
so nothing ever waits on a slot.  Slot states change under one lock, which also orders the
main process's copy before the worker's next write into that slot.  Too little ``/dev/shm`` for
the slots is one ``KeyshardError`` line before any worker starts (docker's default is 64 MB).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from dataclasses import dataclass

import numpy as np
import torch

from keyshard.errors import KeyshardError


LOCK_WAIT_S = 5.0  # a lock held longer than this means its holder died inside a few-line critical section


@dataclass(frozen=True)
class SlotBatch:
    """A batch waiting in slot ``slot`` of worker ``worker``: its first ``n`` rows."""

    worker: int
    slot: int
    n: int
    keys: list


class BatchRing:
    """``slots`` batch slots per worker, each ``batch_size`` rows of pixels and targets."""

    def __init__(self, workers: int, slots: int, batch_size: int, pixel_shape: tuple, pixel_dtype,
                 target_shape: tuple, target_dtype):
        def shared(shape, dtype):
            return torch.from_numpy(np.zeros((workers, slots, batch_size, *shape), dtype)).share_memory_()

        size = workers * slots * batch_size * (np.prod(pixel_shape, dtype=int) * np.dtype(pixel_dtype).itemsize
                                               + np.prod(target_shape, dtype=int) * np.dtype(target_dtype).itemsize)
        free = _shm_free()
        if free is not None and size > free:
            gc.collect()  # a loader that ended in an error can hold its slots until the cycle collector runs
            free = _shm_free()
            if size > free:
                raise _no_room(size, workers, f"{free / 1e6:.0f} MB free")
        try:
            self.pixels, self.targets = shared(pixel_shape, pixel_dtype), shared(target_shape, target_dtype)
        except RuntimeError as exc:  # torch: "unable to allocate shared memory(shm) for file </torch_…>: …"
            _remove_left_behind(str(exc))
            raise _no_room(size, workers, str(exc).rpartition(": ")[2] or type(exc).__name__) from None
        self.busy = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.lock = multiprocessing.get_context().Lock()

    # --- in a worker -------------------------------------------------------------------------
    def reclaim(self, worker: int) -> None:
        """Free all of a worker's slots: at the start of its epoch nothing sent before is read any more
        (DataLoader drops what an abandoned epoch left in flight before the next epoch starts)."""
        if self.lock.acquire(timeout=LOCK_WAIT_S):
            try:
                self.busy[worker] = 0
            finally:
                self.lock.release()

    def put(self, worker: int, keys, pixels, targets) -> SlotBatch | None:
        """Stack one batch (sequences of numpy arrays) into a free slot; None when no slot is free
        or the arrays are not exactly the slot's shape and dtype (an ``augment`` may change them;
        the caller then hands the batch over the stock way, which keeps them as they are)."""
        n = len(keys)
        slot_pixels, slot_targets = self.pixels[worker].numpy(), self.targets[worker].numpy()
        if n > slot_pixels.shape[1] or not (_all_like(pixels, slot_pixels) and _all_like(targets, slot_targets)):
            return None
        if not self.lock.acquire(timeout=LOCK_WAIT_S):  # the main process died inside take(): don't hang
            return None
        try:
            free = np.flatnonzero(self.busy[worker].numpy() == 0)
            if not free.size:
                return None
            slot = int(free[0])
            self.busy[worker, slot] = 1
        finally:
            self.lock.release()
        np.stack(pixels, out=slot_pixels[slot, :n])
        np.stack(targets, out=slot_targets[slot, :n])
        return SlotBatch(worker, slot, n, list(keys))

    # --- in the main process ------------------------------------------------------------------
    def take(self, batch: SlotBatch, pin: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The batch's rows as new tensors (pinned when ``pin``); its slot is free again."""
        pixels, targets = (join_rows([src[batch.worker, batch.slot, :batch.n]], pin)
                           for src in (self.pixels, self.targets))
        with self.lock:
            self.busy[batch.worker, batch.slot] = 0
        return pixels, targets, batch.keys


def _all_like(arrays, slots: np.ndarray) -> bool:
    """Every array has exactly one slot row's shape and dtype."""
    shape, dtype = slots.shape[2:], slots.dtype
    return all(np.shape(a) == shape and np.asarray(a).dtype == dtype for a in arrays)


def join_rows(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """The rows of ``parts`` as one tensor in new (pinned) memory, copied by numpy on the calling
    thread: torch's ``copy_``/``cat`` would wake its OpenMP threads, whose spinning took a core
    from the workers here."""
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=pin)
    np.concatenate([p.numpy() for p in parts], out=out.numpy())
    return out


SHM = "/dev/shm"


def _shm_free() -> int | None:
    """Bytes free in POSIX shared memory, where it is a file system (Linux); else None."""
    try:
        st = os.statvfs(SHM)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _no_room(size: int, workers: int, reason: str) -> KeyshardError:
    return KeyshardError(f"{SHM}: no room for the loader's batch slots ({size / 1e6:.0f} MB for {workers} "
                         f"worker(s); {reason}); use fewer workers or a smaller batch, or give the machine more "
                         "shared memory (docker: --shm-size)")


def _remove_left_behind(message: str) -> None:
    """torch leaves the segment it failed to allocate in /dev/shm (no data, but a name): remove it —
    only after a failed allocation, where this process has just created that name itself."""
    if not message.startswith("unable to allocate shared memory"):
        return
    name = message.partition("</")[2].partition(">")[0]
    if name.startswith(f"torch_{os.getpid()}_") and "/" not in name:
        try:
            os.unlink(os.path.join(SHM, name))
        except OSError:
            pass
