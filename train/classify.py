"""Classification helpers of the trainer: ``--train-fraction``'s seeded subset."""

from __future__ import annotations

import hashlib


def subset_filter(fraction: float, seed: int):
    """Keep a sample iff sha256('<seed>|subset|<key>') falls below ``fraction`` of the hash range:
    the same samples every epoch, on every machine, whatever the shard or worker order."""
    return _Keep(int(fraction * 2**64), seed)


class _Keep:  # a class, not a closure: DataLoader workers pickle it
    def __init__(self, limit: int, seed: int):
        self.limit, self.seed = limit, seed

    def __call__(self, key: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}|subset|{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.limit
