"""A quadratic assignment solver for ciphertext-only estimation of permutation keys (SHF).

The problem: find the permutation π of n positions that maximises

    f(π) = Σ_i Σ_{a,b} A_i[a, b] · B_i[π(a), π(b)]

for a few pairs of n × n matrices — A_i measured on the keyed images, B_i the same statistic
expected of plain images.  When the statistics of the keyed images are those of the template
permuted by the key, the key maximises f (the least-squares match ``‖A − P B Pᵀ‖²``).

scipy's ``quadratic_assignment`` (FAQ) takes one pair of matrices; the keyed images give several
(within a block, with the block to the right, with the block below: the last two fix the
orientation that one block alone leaves open), so the same method is written here for a sum of
pairs: Frank–Wolfe over doubly stochastic matrices from several random starts (the linear step
is scipy's ``linear_sum_assignment``), each projected onto the nearest permutation, then a
refinement pass of improving pairwise exchanges on the exact objective (``refine``).  The best
objective wins; the caller records it (and the true key's objective, when an auditor knows it).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

MAX_ITERATIONS = 100  # Frank–Wolfe steps per start (it usually stops earlier)


def objective(perm: np.ndarray, pairs) -> float:
    """f(π) for a permutation given as an index array."""
    return float(sum(np.sum(a * b[np.ix_(perm, perm)]) for a, b in pairs))


def _as_perm(p: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(-p)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[rows] = cols
    return perm


def frank_wolfe(pairs, start: np.ndarray, iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """FAQ from a doubly stochastic ``start``: a linear assignment on the gradient gives the
    direction, an exact line search (f is quadratic along it) the step; the end point is
    projected onto a permutation."""
    p = start
    for _ in range(iterations):
        grad = sum(a @ p @ b.T + a.T @ p @ b for a, b in pairs)
        q = np.zeros_like(p)
        q[np.arange(len(p)), _as_perm(grad)] = 1.0
        d = q - p
        curve = sum(np.sum(a * (d @ b @ d.T)) for a, b in pairs)
        slope = float(np.sum(grad * d))
        step = min(1.0, max(0.0, -slope / (2 * curve))) if curve < 0 else (1.0 if curve + slope > 0 else 0.0)
        if step <= 1e-9:
            break
        p = p + step * d
    return _as_perm(p)


def random_start(n: int, rng: np.random.Generator) -> np.ndarray:
    """Half the barycentre, half a random doubly stochastic matrix (Sinkhorn-balanced)."""
    j = rng.random((n, n))
    for _ in range(20):
        j /= j.sum(0)
        j /= j.sum(1)[:, None]
    return 0.5 / n + 0.5 * j


def _swap_gains(perm: np.ndarray, pairs) -> np.ndarray:
    """gain[k, l]: exactly how much f changes when π(k) and π(l) are exchanged."""
    n = len(perm)
    gain = np.zeros((n, n))
    for a, b in pairs:
        bp = b[np.ix_(perm, perm)]
        g, h = a @ bp.T, a.T @ bp  # g[k,l] = Σ_b a[k,b] bp[l,b];  h[k,l] = Σ_a a[a,k] bp[a,l]
        dg, dh, da, db = np.diag(g), np.diag(h), np.diag(a), np.diag(bp)
        rows = g + g.T - dg[:, None] - dg[None, :]  # Σ over every b of (a[k,b]-a[l,b])(bp[l,b]-bp[k,b])
        cols = h + h.T - dh[:, None] - dh[None, :]
        # the b ∈ {k, l} and a ∈ {k, l} terms were counted there; take them out, add the 2x2 block
        rows -= (da[:, None] - a.T) * (bp.T - db[:, None]) + (a - da[None, :]) * (db[None, :] - bp)
        cols -= (da[:, None] - a) * (bp - db[:, None]) + (a.T - da[None, :]) * (db[None, :] - bp.T)
        block = (da[:, None] - da[None, :]) * (db[None, :] - db[:, None]) + (a - a.T) * (bp.T - bp)
        gain += rows + cols + block
    np.fill_diagonal(gain, 0.0)
    return gain


def refine(perm: np.ndarray, pairs, rounds: int = 50) -> tuple[np.ndarray, int]:
    """Improving pairwise exchanges until none is left (or ``rounds`` passes): each pass computes
    every exchange's exact gain, then makes the best ones that touch disjoint positions.
    Returns the permutation and the number of exchanges made."""
    perm = perm.copy()
    made = 0
    for _ in range(rounds):
        gain = _swap_gains(perm, pairs)
        k, l = np.unravel_index(np.argsort(gain, axis=None)[::-1][:64], gain.shape)
        used, changed = set(), False
        for i, j in zip(k, l):
            if gain[i, j] <= 1e-9:
                break
            if i in used or j in used:
                continue
            before = objective(perm, pairs)
            perm[[i, j]] = perm[[j, i]]
            if objective(perm, pairs) <= before:  # gains of later exchanges are stale: check each
                perm[[i, j]] = perm[[j, i]]
                continue
            used.update((i, j))
            made += 1
            changed = True
        if not changed:
            break
    return perm, made


def solve(pairs, starts: int, rng: np.random.Generator, progress=None) -> tuple[np.ndarray, dict]:
    """The best of ``starts`` Frank–Wolfe runs (the first from the barycentre), refined.
    ``progress(done, total)`` is called after each start.  Notes: each start's objective, the
    best before and after refinement, and the exchanges refinement made."""
    n = pairs[0][0].shape[0]
    found = []
    for s in range(starts):
        start = np.full((n, n), 1.0 / n) if s == 0 else random_start(n, rng)
        perm = frank_wolfe(pairs, start)
        found.append((objective(perm, pairs), perm))
        if progress is not None:
            progress(s + 1, starts + 1)
    best_f, best = max(found, key=lambda t: t[0])
    refined, made = refine(best, pairs)
    if progress is not None:
        progress(starts + 1, starts + 1)
    return refined, {"starts": starts, "objective_per_start": [round(f, 4) for f, _ in found],
                     "objective_before_refinement": round(best_f, 4),
                     "objective": round(objective(refined, pairs), 4), "refinement_exchanges": made}
