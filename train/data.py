"""Streaming keyed shards into training with ``webdataset`` — never extracting them.

An epoch reads the shards of one split (for ``train``: one augmentation replica, ``epoch mod
(R+1)``, so an epoch stays one pass over the image ids).  Shard order is shuffled from
``(seed, epoch)``, shards are split across ranks (``wds.split_by_node``) and DataLoader workers
(``wds.split_by_worker``), and samples pass through a seeded shuffle buffer.

Splitting is by shard, so ranks may get unequal sample counts; every rank can compute all ranks'
counts from the manifest, so each one pads its stream to the largest count with *void* samples
(mask all 255: they add no loss) and all ranks take the same number of steps — no DDP hang, no
communication.  Padding is counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from keyshard.errors import KeyshardError
from keyshard.shardformat import decode_mask, decode_npy

VOID = 255


@dataclass(frozen=True)
class EpochPlan:
    """Which shards one rank reads in one epoch, and how much padding evens the ranks out."""

    urls: list[str]
    samples: int           # real samples this rank will read
    target: int            # samples every rank yields (real + padding)

    @property
    def padding(self) -> int:
        return self.target - self.samples


def shards_for(manifest: dict, split: str, replica: int) -> list[dict]:
    shards = [s for s in manifest["shards"] if s["split"] == split and s["replica"] == replica]
    if not shards:
        raise KeyshardError(f"manifest lists no {split!r} shards (replica {replica})")
    return shards


def replicas(manifest: dict, split: str) -> int:
    return 1 + max((s["replica"] for s in manifest["shards"] if s["split"] == split), default=0)


def epoch_plan(shard_dir: str | Path, manifest: dict, split: str, epoch: int, seed: int,
               rank: int = 0, world: int = 1, shuffle: bool = True) -> EpochPlan:
    """The rank's shard list for this epoch (same shuffled order on every rank) and its padding."""
    replica = epoch % replicas(manifest, split) if split == "train" else 0
    shards = shards_for(manifest, split, replica)
    order = np.arange(len(shards))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(shards))
    ordered = [shards[i] for i in order]
    counts = [sum(s["samples"] for s in ordered[r::world]) for r in range(world)]
    urls = [str(Path(shard_dir) / s["file"]) for s in ordered]
    return EpochPlan(urls=urls, samples=counts[rank], target=max(counts))


def decode_sample(sample: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    pixels = decode_npy(sample["img.npy"])
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(np.int32)  # torch has no general uint16 arithmetic
    mask = decode_mask(sample["mask.png"]).astype(np.int64)
    return torch.from_numpy(pixels), torch.from_numpy(mask), sample["__key__"]


def shard_dataset(plan: EpochPlan, seed: int, epoch: int, shuffle_buffer: int, augment=None) -> wds.WebDataset:
    """The rank's samples: split by node, then by worker, shuffled, decoded (and augmented)."""
    ds = wds.WebDataset(plan.urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                        workersplitter=wds.split_by_worker, empty_check=False)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=seed * 100003 + epoch)
    ds = ds.map(decode_sample)
    return ds.map(augment) if augment is not None else ds


def iterate_batches(plan: EpochPlan, batch_size: int, seed: int, epoch: int, workers: int = 0,
                    shuffle_buffer: int = 0, image_shape: tuple[int, int] | None = None, augment=None):
    """Yield (pixels, masks, keys, n_padding) batches: the rank's samples then void padding.

    Every rank yields exactly ``ceil(plan.target / batch_size)`` batches.
    """
    loader = torch.utils.data.DataLoader(shard_dataset(plan, seed, epoch, shuffle_buffer, augment),
                                         batch_size=None, num_workers=workers,
                                         persistent_workers=False)
    buf_px, buf_mask, buf_keys = [], [], []
    seen = 0
    for pixels, mask, key in loader:
        buf_px.append(pixels)
        buf_mask.append(mask)
        buf_keys.append(key)
        seen += 1
        if len(buf_px) == batch_size:
            yield torch.stack(buf_px), torch.stack(buf_mask), buf_keys, 0
            buf_px, buf_mask, buf_keys = [], [], []
    if seen != plan.samples:
        raise KeyshardError(f"read {seen} samples but the manifest lists {plan.samples} for this rank "
                            "(shards changed? run `keyshard verify`)")
    pad = plan.target - seen
    if pad and not buf_px and image_shape is None:
        raise KeyshardError("cannot pad an empty rank without knowing the image shape")
    template = buf_px[0] if buf_px else None
    n_pad_in_batch = 0
    while pad > 0 or buf_px:
        while pad > 0 and len(buf_px) < batch_size:
            shape = template.shape if template is not None else (*image_shape, 3)
            buf_px.append(torch.zeros(shape, dtype=template.dtype if template is not None else torch.uint8))
            buf_mask.append(torch.full(shape[:2], VOID, dtype=torch.int64))
            buf_keys.append("")
            pad -= 1
            n_pad_in_batch += 1
        yield torch.stack(buf_px), torch.stack(buf_mask), buf_keys, n_pad_in_batch
        buf_px, buf_mask, buf_keys, n_pad_in_batch = [], [], [], 0
