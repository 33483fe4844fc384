"""The paper's splits: VOC2012 train.txt → train (1318) + holdout (146); test = val.txt.

The holdout ids are the ones with the smallest SHA-256 of ``"<seed>|<id>"``: a seeded draw
that is the same on every machine and library version and independent of file order.
"""

from __future__ import annotations

from keyshard import seeded
from keyshard.errors import KeyshardError

SPLITS = ("train", "holdout", "test")
PAPER_TRAIN, PAPER_HOLDOUT = 1318, 146


def holdout_count(n_train_file: int) -> int:
    """The paper's proportion 146/1464, at least 1 (1464 ids → exactly 146)."""
    return max(1, round(n_train_file * PAPER_HOLDOUT / (PAPER_TRAIN + PAPER_HOLDOUT)))


def split_ids(train_file_ids: list[str], val_file_ids: list[str] | None, seed: int,
              holdout: int | None = None) -> dict[str, list[str]]:
    """Sorted ids of each split.  ``holdout`` overrides the proportional count."""
    n = len(train_file_ids)
    k = holdout_count(n) if holdout is None else holdout
    if holdout is None and n < 2:
        raise KeyshardError(f"train.txt lists {n} id: the train/holdout split needs at least 2 "
                            "(or give `holdout=0`)")
    if not 0 <= k < n:
        raise KeyshardError(f"`holdout` {k} must be between 0 and {n - 1} (train.txt lists {n} ids)")
    ranked = seeded.ranked(train_file_ids, seed)
    out = {"train": sorted(ranked[k:]), "holdout": sorted(ranked[:k])}
    if val_file_ids is not None:
        out["test"] = sorted(val_file_ids)
    return out
