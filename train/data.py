"""keyshard's one loader: stream keyed shards (local directory or URL) into batches.

``open_shards`` is the public API (``keyshard.open_shards``) and what ``train``, ``evaluate`` and
the attacks use.  An epoch reads the shards of one split (for ``train``: one augmentation
replica, ``epoch mod (R+1)``, so an epoch stays one pass over the image ids).  Shard order is
shuffled from ``(seed, epoch)``; rank r of W takes every W-th shard of that order and, inside
it, DataLoader worker w of N every N-th (splitting is by shard, never extracting).  Samples pass
through a seeded shuffle buffer, are decoded and **batched inside the workers** (one hand-off
per batch, integer dtypes unchanged: uint8, or uint16 FFX codes) straight into shared-memory
slots allocated once (``batch_ring``), and the main process copies each batch out and only
re-joins the few partial batches at the ends of the workers' streams.

Ranks may get unequal sample counts; every rank computes all ranks' counts from the manifest
and pads its stream with *void* samples (all pixels 0, every label the ignore index), so all
ranks take exactly ``ceil(max count / batch_size)`` steps — no DDP hang, no communication.
With ``verify_stream`` each shard's bytes are hashed while they stream (on a thread) and checked
against the manifest at the shard's end.  Problems inside a worker reach the caller as the
same one-line ``KeyshardError``, not DataLoader's wrapped traceback.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from keyshard import sources, tasks
from keyshard.errors import KeyshardError
from keyshard.manifest import Manifest, Shard, as_manifest
from keyshard.shardformat import decode_npy, stream_shard
from keyshard.train.batch_ring import BatchRing, SlotBatch, join_rows
from keyshard.train.copy_ahead import CopyAhead
from keyshard.train.device import pick_device
from keyshard.transforms import normalize_pixels


@dataclass(frozen=True)
class EpochPlan:
    """Which shards one rank reads in one epoch, and how much padding evens the ranks out."""

    locations: list[str]   # this rank's shards, in reading order
    shards: list[Shard]    # their manifest records
    samples: int           # real samples this rank will read
    target: int            # samples every rank yields (real + padding)

    @property
    def padding(self) -> int:
        return self.target - self.samples


def shards_for(manifest: Manifest, split: str, replica: int) -> list[Shard]:
    shards = list(manifest.shards_of(split, replica))
    if not shards:
        raise KeyshardError(f"manifest lists no {split!r} shards (replica {replica})")
    return shards


def epoch_plan(source, manifest: Manifest | dict, split: str, epoch: int, seed: int, rank: int = 0, world: int = 1,
               shuffle: bool = True) -> EpochPlan:
    """The rank's shard list for this epoch (from one order all ranks agree on) and its padding."""
    manifest = as_manifest(manifest)
    replica = epoch % manifest.replicas(split) if split == "train" else 0
    shards = shards_for(manifest, split, replica)
    order = np.arange(len(shards))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(shards))
    ordered = [shards[i] for i in order]
    counts = [sum(s.samples for s in ordered[r::world]) for r in range(world)]
    mine = ordered[rank::world]
    return EpochPlan(locations=[sources.join(source, s.file) for s in mine], shards=mine,
                     samples=counts[rank], target=max(counts))


@dataclass(frozen=True)
class WorkerFailure:
    """A KeyshardError raised in a worker, handed over as data so the caller sees its one line."""

    message: str


PREFETCH = 4  # batches each DataLoader worker may have ready ahead (its ring has one slot more)


def _collate(samples):
    keys, pixels, masks = zip(*samples)
    return torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.stack(masks)), list(keys)


class _ShardStream(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its shards → shuffle → decode → augment → batches.

    The epoch lives in a shared-memory tensor so persistent workers follow ``set_epoch``.
    """

    def __init__(self, source, manifest, split, batch_size, seed, shuffle, shuffle_buffer, rank, world,
                 augment, verify):
        super().__init__()
        self.source, self.manifest, self.split, self.batch_size = source, manifest, split, batch_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world, self.augment, self.verify = rank, world, augment, verify
        self.dtype = np.dtype(manifest.encryption.dtype)
        self.shape = manifest.image.shape
        self.task = tasks.for_kind(manifest.dataset.kind)  # what a sample's target is (<key>.mask.png, <key>.cls)
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.keep = None  # classification --train-fraction: key -> bool (train/classify.py)
        self.ring = None  # BatchRing when read by DataLoader workers (ShardLoader sets it)

    def output_shape(self) -> tuple:
        """One sample's pixels after augmentation (H×W×3)."""
        return tuple(getattr(self.augment, "output_shape", lambda s: s)(self.shape))

    def target_shape(self) -> tuple:
        """One sample's target after augmentation: a class index, or an H×W mask (the task's rule)."""
        return self.task.target_shape(*self.output_shape()[:2])

    def plan(self) -> EpochPlan:
        return epoch_plan(self.source, self.manifest, self.split, int(self.epoch[0]), self.seed,
                          self.rank, self.world, self.shuffle)

    def _raw(self, assigned):
        for location, shard in assigned:
            for key, files in stream_shard(location, shard.entry(), self.verify):
                yield location, key, files

    def _decode(self, item):
        """One sample as ``(key, pixels, target)``: the stored pixels and the task's target (an
        H×W mask, a class index), checked against the manifest; None when ``keep`` drops it."""
        location, key, files = item
        member = self.task.target_member
        try:
            pixels = decode_npy(files["img.npy"], copy=self.augment is not None)
            target = self.task.decode_target(files[member])
        except (KeyError, ValueError, OSError, SyntaxError) as exc:  # UnicodeDecodeError is a ValueError
            raise KeyshardError(f"{location}: sample {key} cannot be decoded ({exc})") from None
        expected = self.task.target_shape(*self.shape[:2])
        if pixels.shape != self.shape or pixels.dtype != self.dtype or target.shape != expected:
            with_target = f" with a {target.shape} {member.split('.')[0]}" if expected else ""  # "... mask"
            raise KeyshardError(f"{location}: sample {key} is {pixels.dtype} {pixels.shape}{with_target}; "
                                f"the manifest says {self.dtype} {self.shape}")
        if self.keep is not None and not self.keep(key):
            return None
        if self.augment is not None:
            pixels, target = self.augment(pixels, target, key)
        return key, pixels, target

    def _hand_over(self, samples, worker):
        """A worker's batch into a shared-memory slot (a ``SlotBatch``), else as tensors
        ``(pixels, targets, keys, worker)``; ``worker`` None: in the main process (no slots)."""
        if worker is not None:
            keys, pixels, targets = zip(*samples)
            batch = self.ring.put(worker, keys, pixels, targets)
            if batch is not None:
                return batch
        return (*_collate(samples), worker)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            plan = self.plan()
            if hasattr(self.augment, "set_epoch"):
                self.augment.set_epoch(int(self.epoch[0]))
            assigned = list(zip(plan.locations, plan.shards))[worker::workers]
            stream = self._raw(assigned)
            if self.shuffle and self.shuffle_buffer > 1:
                state = np.random.SeedSequence([self.seed, int(self.epoch[0]), self.rank, worker]).generate_state(1)
                stream = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 64),
                                     seed=int(state[0]))(stream)
            stream = map(self._decode, stream)
            if self.keep is not None:  # --train-fraction: a seeded subset of the samples
                stream = (item for item in stream if item is not None)
            slot_worker = worker if info is not None and self.ring is not None else None
            if slot_worker is not None:
                self.ring.reclaim(slot_worker)
            for samples in wds.batched(self.batch_size, collation_fn=list, partial=True)(stream):
                yield self._hand_over(samples, slot_worker)
        except KeyshardError as exc:
            yield WorkerFailure(str(exc))


class ShardLoader:
    """One rank's batches of one split: iterate for an epoch; ``set_epoch`` for the next.

    Yields ``(pixels, targets, ids, n_padding)``: pixels N×H×W×3 uint8 (uint16 for FFX) as
    stored, targets N×H×W uint8 masks, the samples' keys, and how many of the last rows are
    padding.  ``len()`` is the number of batches, the same on every rank.
    """

    def __init__(self, stream: _ShardStream, batch_size: int, workers: int):
        self.stream, self.batch_size, self.workers = stream, batch_size, workers
        self.manifest = stream.manifest
        self._kept = {}  # shard files -> how many of their samples the keep filter accepts
        self._pin = pick_device().type == "cuda"
        self._ahead: CopyAhead | None = None  # the epoch's copy-out thread (with workers)
        if workers:  # slots are reclaimed per epoch, which needs persistent workers (batch_ring)
            stream.ring = BatchRing(workers, PREFETCH + 1, batch_size, stream.output_shape(), stream.dtype,
                                    stream.target_shape(), stream.task.target_dtype)
        self._loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=self._pin, prefetch_factor=PREFETCH if workers else None)

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch[0] = epoch

    def set_keep(self, keep) -> None:
        """Read only the samples whose key ``keep(key)`` accepts (``--train-fraction``; one rank)."""
        if keep is not None and self.stream.world > 1:
            raise KeyshardError("a sample subset is read by one process only")
        self.stream.keep = keep
        self._kept = {}

    @property
    def plan(self) -> EpochPlan:
        plan = self.stream.plan()
        if self.stream.keep is None:
            return plan
        # a subset: its exact size (the keys of this epoch's shards that ``keep`` accepts) before
        # the epoch, so the step count and the schedule count it; counted once per shard list
        files = tuple(sorted(s.file for s in plan.shards))
        if files not in self._kept:
            self._kept[files] = sum(sum(1 for key in _shard_keys(loc, shard) if self.stream.keep(key))
                                    for loc, shard in zip(plan.locations, plan.shards))
        n = self._kept[files]
        return EpochPlan(plan.locations, plan.shards, n, n)

    def __len__(self) -> int:
        return math.ceil(self.plan.target / self.batch_size)

    def _pad_shape(self, seen_shape):
        return seen_shape if seen_shape is not None else self.stream.output_shape()

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Rows of several pieces as one new tensor, pinned under CUDA like the slots' copies."""
        return join_rows(parts, self._pin)

    def _received(self):
        """The workers' batches as ``(pixels, targets, ids, worker)``: slots copied out, failures
        raised; with workers, on a thread one batch ahead of the caller (``copy_ahead``)."""
        if self._ahead is not None:  # an abandoned epoch's thread may still be inside the DataLoader
            self._ahead.join()
            self._ahead = None
        batches = iter(self._loader)  # on the caller's thread: DataLoader forks its workers here
        if not self.workers:
            return self._taken(batches)
        self._ahead = CopyAhead(self._taken(batches))
        return iter(self._ahead)

    def _taken(self, batches):
        for item in batches:
            if isinstance(item, WorkerFailure):
                raise KeyshardError(item.message)
            yield (*self.stream.ring.take(item, self._pin), item.worker) if isinstance(item, SlotBatch) else item

    def _in_plan_order(self, received, plan: EpochPlan):
        """Rows re-sequenced into the plan's shard order, for ``shuffle=False`` with several workers:
        worker w reads shards w, w+N, ..., and DataLoader hands their batches over in turn, so
        without this the order (and what an audit lists first) would depend on the worker count.
        Yields ``(pixels, targets, ids)`` pieces; ``__iter__`` joins them into batches."""
        queues = [collections.deque() for _ in range(self.workers)]
        for i, shard in enumerate(plan.shards):
            queue, need = queues[i % self.workers], shard.samples
            while need:
                while not queue and (item := next(received, None)) is not None:
                    queues[item[3]].append([*item[:3], 0])
                if not queue:  # a worker ended early: the caller's count check names it
                    break
                head = queue[0]
                pixels, masks, ids, start = head
                take = min(need, len(ids) - start)
                yield pixels[start:start + take], masks[start:start + take], ids[start:start + take]
                head[3], need = start + take, need - take
                if head[3] == len(ids):
                    queue.popleft()
        for queue in queues:  # more rows than the manifest lists: let the count check see them
            for pixels, masks, ids, start in queue:
                yield pixels[start:], masks[start:], ids[start:]
        for pixels, masks, ids, _ in received:
            yield pixels, masks, ids

    def __iter__(self):
        plan, bs = self.plan, self.batch_size
        pending, n_pending, seen, shape = [], 0, 0, None
        received = self._received()
        if not self.stream.shuffle and self.workers > 1 and self.stream.keep is None:
            received = self._in_plan_order(received, plan)
        else:
            received = (item[:3] for item in received)
        for item in received:
            pixels, masks, ids = item
            seen += len(ids)
            shape = tuple(pixels.shape[1:])
            if not pending and len(ids) == bs:
                yield pixels, masks, ids, 0
                continue
            pending.append(item)
            n_pending += len(ids)
            if n_pending >= bs:  # re-join the partial batches from the ends of the workers' streams
                pixels, masks = self._join([p[0] for p in pending]), self._join([p[1] for p in pending])
                ids = [k for p in pending for k in p[2]]
                yield pixels[:bs], masks[:bs], ids[:bs], 0
                pending = [(pixels[bs:], masks[bs:], ids[bs:])] if n_pending > bs else []
                n_pending -= bs
        if seen != plan.samples:
            raise KeyshardError(f"read {seen} samples but the manifest lists {plan.samples} for this rank "
                                "(shards changed? run `keyshard verify`)")
        pad = plan.target - seen
        if not pad and len(pending) <= 1:  # nothing or one partial batch: no copy needed
            for pixels, masks, ids in pending:
                yield pixels, masks, ids, 0
            return
        shape = self._pad_shape(shape)
        dtype = pending[0][0].dtype if pending else torch.from_numpy(np.zeros(0, self.stream.dtype)).dtype
        pixels = self._join([p[0] for p in pending] + [torch.zeros((pad, *shape), dtype=dtype)])
        task = self.stream.task  # padding targets are never scored (train_step skips padding rows)
        fill = torch.full((pad, *task.target_shape(*shape[:2])), task.padding_target(self.manifest.dataset.ignore_index),
                          dtype=torch.from_numpy(np.zeros(0, task.target_dtype)).dtype)
        masks = self._join([p[1] for p in pending] + [fill])
        ids = [k for p in pending for k in p[2]] + [""] * pad
        for i in range(0, len(ids), bs):
            n = len(ids[i:i + bs])
            yield pixels[i:i + bs], masks[i:i + bs], ids[i:i + bs], max(0, min(n, i + n - n_pending))


def _shard_keys(location: str, shard: Shard):
    """The sample keys of one shard: a local tar's member headers only (tarfile seeks past the
    data), a remote one streamed and checked."""
    import os
    import tarfile

    if not sources.is_url(location) and os.path.isfile(location):
        try:
            with tarfile.open(location, "r:") as tf:
                seen = None
                for member in tf:
                    key = member.name.partition(".")[0]
                    if member.isfile() and key != seen:
                        seen = key
                        yield key
        except (tarfile.TarError, OSError) as exc:
            raise KeyshardError(f"{location}: not a readable shard ({exc}); run `keyshard verify`") from None
        return
    for key, _ in stream_shard(location, shard.entry(), verify=True):
        yield key


def _rank_world(rank, world) -> tuple[int, int]:
    if rank is not None and world is not None:
        if not 0 <= rank < world:
            raise KeyshardError(f"rank {rank} is not in 0..{world - 1}")
        return rank, world
    if rank is not None or world is not None:
        raise KeyshardError("give both rank and world, or neither")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def open_shards(source, split: str = "train", *, batch_size: int, epoch: int = 0, seed: int = 0,
                workers: int = 0, shuffle_buffer: int = 256, rank: int | None = None,
                world: int | None = None, augment=None, verify_stream: bool = True,
                shuffle: bool = True, manifest: Manifest | None = None) -> ShardLoader:
    """Batches of one split of a shard directory or URL base for this rank (see ``ShardLoader``).

    ``rank``/``world`` default to the initialised ``torch.distributed`` group (else 0 of 1).
    ``shuffle=False`` reads shards in manifest order with no shuffle buffer (evaluation): the same
    batches, in the same order, at any worker count (the main process holds up to about
    (workers − 1) shards' rows to put them back in order; not with a ``set_keep`` subset).
    ``augment(pixels, mask, key) -> (pixels, mask)`` runs per sample in the workers on numpy
    arrays (its ``set_epoch(epoch)``, if it has one, is called at the start of every epoch).
    ``manifest``: the ``keyshard.read_manifest(source)`` the caller already has (read once per
    command; a 0.1-style manifest dict is accepted too), else it is read here.
    """
    from keyshard.manifest import read

    if batch_size < 1 or workers < 0 or shuffle_buffer < 0:
        raise KeyshardError("batch_size must be ≥ 1, workers and shuffle_buffer ≥ 0")
    manifest = as_manifest(manifest) if manifest is not None else read(source)
    if split not in manifest.splits:
        raise KeyshardError(f"{source}: holds no {split!r} split")
    rank, world = _rank_world(rank, world)
    stream = _ShardStream(source, manifest, split, batch_size, seed, shuffle, shuffle_buffer, rank, world,
                          augment, verify_stream)
    loader = ShardLoader(stream, batch_size, workers)
    loader.set_epoch(epoch)
    return loader


def model_input(pixels: torch.Tensor, manifest: Manifest | dict, device) -> torch.Tensor:
    """Stored pixels → normalised float N×3×H×W model input on ``device``.

    The copy moves the compact integers (uint8/uint16); division by the manifest's pixel
    divisor and ImageNet normalisation happen on the device, after the copy.  ``manifest``:
    ``keyshard.read_manifest``'s ``Manifest`` (a manifest dict, as keyshard 0.1 returned, works too).
    """
    x = pixels.to(device, non_blocking=True)
    return normalize_pixels(x, as_manifest(manifest).encryption.pixel_divisor)
