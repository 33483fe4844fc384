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
main process's copy before the worker's next write into that slot.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch


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

        self.pixels, self.targets = shared(pixel_shape, pixel_dtype), shared(target_shape, target_dtype)
        self.busy = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.lock = multiprocessing.get_context().Lock()

    # --- in a worker -------------------------------------------------------------------------
    def reclaim(self, worker: int) -> None:
        """Free all of a worker's slots: at the start of its epoch nothing sent before is read any more
        (DataLoader drops what an abandoned epoch left in flight before the next epoch starts)."""
        with self.lock:
            self.busy[worker] = 0

    def put(self, worker: int, keys, pixels, targets) -> SlotBatch | None:
        """Stack one batch (sequences of numpy arrays) into a free slot; None when no slot is free
        or the arrays do not fit one (the caller then hands the batch over the stock way)."""
        n = len(keys)
        slot_pixels, slot_targets = self.pixels[worker], self.targets[worker]
        if (n > slot_pixels.shape[1] or pixels[0].shape != tuple(slot_pixels.shape[2:])
                or np.shape(targets[0]) != tuple(slot_targets.shape[2:])):
            return None
        with self.lock:
            free = np.flatnonzero(self.busy[worker].numpy() == 0)
            if not free.size:
                return None
            slot = int(free[0])
            self.busy[worker, slot] = 1
        np.stack(pixels, out=slot_pixels[slot, :n].numpy())
        np.stack(targets, out=slot_targets[slot, :n].numpy())
        return SlotBatch(worker, slot, n, list(keys))

    # --- in the main process ------------------------------------------------------------------
    def take(self, batch: SlotBatch, pin: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The batch's rows as new tensors (pinned when ``pin``); its slot is free again."""
        pixels, targets = (_copy(src[batch.worker, batch.slot, :batch.n], pin) for src in (self.pixels, self.targets))
        with self.lock:
            self.busy[batch.worker, batch.slot] = 0
        return pixels, targets, batch.keys


def _copy(src: torch.Tensor, pin: bool) -> torch.Tensor:
    """A copy of ``src`` in new (pinned) memory, made by numpy on the calling thread: torch's
    ``copy_`` would wake its OpenMP threads, whose spinning took a core from the workers here."""
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
    np.copyto(dst.numpy(), src.numpy())
    return dst
