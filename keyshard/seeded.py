"""Seeded draws from SHA-256: the one place where a seed picks ids, subsets and public secrets.

Every random choice that must be the same on every machine, Python and library version, and
whatever the file, shard or worker order, is made here from SHA-256 of a short text.  Two shapes:

* **Ranking** — an id's rank is ``sha256("<seed>|<id>")`` (or ``"<seed>|<tag>|<id>"``); a draw of
  k ids takes the k smallest ranks.  The holdout split (``"<seed>|<id>"``), the ``--val-fraction``
  test split (tag ``val``), the fine-tuning attack's subsets (``"<seed>|<id>"``) and the trainer's
  ``--train-fraction`` subset (tag ``subset``: a sample is kept iff the first 8 bytes of its rank,
  as a big-endian number, fall below the fraction of 2**64, so it needs no list of all ids).
* **Public secrets** — ``sha256("keyshard-<purpose>/1|<part>|<part>...")``: the secrets of keys
  that are meant to be reproducible and therefore public (wrong keys, near-miss keys, the demo,
  preview and sweep keys) and the seeds of the augmentation replicas.

These texts are recorded in manifests and audits (``splits.rule``), so they never change; a new
draw gets a new tag or purpose.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def rank(seed: int, item: str, tag: str | None = None) -> bytes:
    """The SHA-256 digest that orders ``item`` in a draw seeded by ``seed`` (see the module doc)."""
    text = f"{seed}|{item}" if tag is None else f"{seed}|{tag}|{item}"
    return hashlib.sha256(text.encode()).digest()


def ranked(items: Iterable[str], seed: int, tag: str | None = None, key=None) -> list:
    """``items`` ordered by :func:`rank` (smallest first).  ``key`` maps an item to the id that is
    ranked, when items carry more than their id (``key=lambda s: s[0]``)."""
    ident = (lambda x: x) if key is None else key
    return sorted(items, key=lambda x: rank(seed, ident(x), tag))


def within(item: str, fraction: float, seed: int, tag: str | None = None) -> bool:
    """Whether ``item`` belongs to the seeded ``fraction`` of all ids, decided from the item alone:
    the first 8 bytes of its rank (big-endian) are below ``fraction`` of 2**64."""
    return int.from_bytes(rank(seed, item, tag)[:8], "big") < int(fraction * 2**64)


def public_secret(purpose: str, *parts) -> bytes:
    """``sha256("keyshard-<purpose>/1|<part>|...")``: a reproducible (so public) 32-byte secret."""
    text = "|".join([f"keyshard-{purpose}/1", *(str(p) for p in parts)])
    return hashlib.sha256(text.encode()).digest()
