"""Classification helpers of the trainer: ``--train-fraction``'s seeded subset."""

from __future__ import annotations

from keyshard import seeded


def subset_filter(fraction: float, seed: int):
    """Keep a sample iff its key is in the seeded ``fraction`` (``seeded.within``, tag ``subset``):
    the same samples every epoch, on every machine, whatever the shard or worker order."""
    return _Keep(fraction, seed)


class _Keep:  # a class, not a closure: DataLoader workers pickle it
    def __init__(self, fraction: float, seed: int):
        self.fraction, self.seed = fraction, seed

    def __call__(self, key: str) -> bool:
        return seeded.within(key, self.fraction, self.seed, tag="subset")
