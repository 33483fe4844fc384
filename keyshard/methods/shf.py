"""SHF, pixel shuffling: within every block, position k takes the value of position perm[k].

The key is a permutation of the 3M² block positions (values may move between channels), so
there are (3M²)! keys.  Compiled, a key is one flat gather index over the whole image and its
inverse scatter index: encryption is a single ``np.take`` / ``torch.gather``.

Ciphertext-only estimation (``estimate``) matches how the keyed images' block positions vary
together — within a block, and with the blocks to the right and below — to what an image prior
expects of plain photographs, a quadratic assignment (``keyshard.methods.qap``).  The six namings
of the three channels are then ranked by the same objective; all six are candidates
(``keyshard attack ciphertext-only --checkpoint`` lets the stolen model pick).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from keyshard import keys
from keyshard.errors import KeyshardError
from keyshard.keys import CHANNELS
from keyshard.methods import Estimate, Fold, Material, Method
from keyshard.transforms import (IMAGENET_MEAN, IMAGENET_STD, Plan, block_coords, block_index, block_positions,
                                 patch_positions, to_blocks)

_P = np.uint64(1099511628211)  # FNV prime: multiplier of the known-plaintext attack's rolling hash


@dataclass(frozen=True, eq=False)
class ShfMaterial(Material):
    method = "shf"
    perm: np.ndarray  # out[k] = in[perm[k]] within each flattened block

    def canonical_bytes(self) -> bytes:
        return b"perm" + self.perm.astype("<u4").tobytes()


class ShfPlan(Plan):
    """A flat gather index (and its inverse) over the whole flattened image."""

    method = "shf"

    def __init__(self, height: int, width: int, gather: np.ndarray, scatter: np.ndarray):
        super().__init__(height, width)
        self.gather, self.scatter = gather, scatter

    def _apply_flat(self, flat, forward):
        return np.take(flat, self.gather if forward else self.scatter)

    def _torch_arrays(self):
        return {"gather": self.gather.astype(np.int64), "scatter": self.scatter.astype(np.int64)}

    @staticmethod
    def _torch_flat(t, flat, forward):
        import torch

        index = t["gather"] if forward else t["scatter"]  # torch.gather: ~8x faster than indexing on CPU
        return torch.gather(flat, 1, index.expand(flat.shape[0], -1))


class Shf(Method):
    name = "shf"
    summary = "pixel shuffling"
    Material = ShfMaterial
    material_required = ("permutation",)
    material_schema = {"permutation": {
        "description": "SHF: out[k] = in[permutation[k]] within each flattened block; a permutation of 0..3M²-1.",
        "type": "array", "minItems": 3, "maxItems": keys.MAX_BLOCK_LEN,
        "items": {"type": "integer", "minimum": 0, "maximum": keys.MAX_BLOCK_LEN - 1}}}

    def derive(self, key):
        n = key.block_size * key.block_size * CHANNELS
        perm = (keys.reference_permutation(key.reference_seed, n) if key.reference_seed is not None
                else keys.fisher_yates(key.secret, b"shf-permutation", n))
        return ShfMaterial(key.block_size, perm)

    def material_from_json(self, block_size, doc, where):
        n = block_size * block_size * CHANNELS
        perm = np.asarray(doc["permutation"], dtype=np.int64)
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise KeyshardError(f"{where}: 'material.permutation' must be a permutation of 0..{n - 1} (3M² values)")
        return ShfMaterial(block_size, perm)

    def material_to_json(self, material):
        return {"permutation": material.perm.tolist()}

    def compile(self, material, height, width):
        m = material.block_size
        y0, x0, k = block_positions(height, width, m)
        r, col, ch = block_coords(material.perm[k], m)  # out[k] = in[perm[k]] within the block
        gather = (((y0 + r) * width + (x0 + col)) * CHANNELS + ch).reshape(-1).astype(np.intp)
        scatter = np.empty_like(gather)
        scatter[gather] = np.arange(gather.size, dtype=np.intp)
        return ShfPlan(height, width, gather, scatter)

    def keyspace_bits(self, material):
        return math.lgamma(material.block_len + 1) / math.log(2)

    def keyspace_count(self, material):
        return math.factorial(material.block_len)

    def wrong_material(self, base, secret, vary_password):
        return ShfMaterial(base.block_size, keys.fisher_yates(secret, b"shf-permutation", base.block_len))

    def wrong_rule(self, base, vary_password):
        return f"random permutations of the {base.block_len} block positions"

    def max_distance(self, material):
        return material.perm.size // 2

    def distance(self, a, b):
        """Transpositions separating the permutations: n − (cycles of a ∘ b⁻¹)."""
        relative = a.perm[np.argsort(b.perm)]
        seen = np.zeros(relative.size, dtype=bool)
        cycles = 0
        for start in range(relative.size):
            if not seen[start]:
                cycles += 1
                j = start
                while not seen[j]:
                    seen[j] = True
                    j = relative[j]
        return relative.size - cycles

    def near_miss(self, base, d, rng):
        """``d`` disjoint transpositions of the base permutation."""
        a, b = rng.choice(base.perm.size, 2 * d, replace=False).reshape(2, d)
        perm = base.perm.copy()
        perm[a], perm[b] = base.perm[b], base.perm[a]
        return ShfMaterial(base.block_size, perm)

    def recover(self, block_size, pairs):
        """Each position's signature is a rolling hash of its values over every block seen; perm[k]
        is the plain position with encrypted position k's signature (ties stay undetermined)."""
        n = block_size * block_size * CHANNELS
        sig_p, sig_e = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for _, plain, enc in pairs:
                for blocks, sig in ((to_blocks(plain, block_size), sig_p), (to_blocks(enc, block_size), sig_e)):
                    for row in blocks.astype(np.uint64):  # sig = sig * P + value, mod 2**64
                        sig *= _P
                        sig += row + np.uint64(1)
        order_p, order_e = np.argsort(sig_p, kind="stable"), np.argsort(sig_e, kind="stable")
        if not np.array_equal(sig_p[order_p], sig_e[order_e]):
            raise KeyshardError("the encrypted samples are not a pixel shuffle of the plain ones "
                                "(different images, replicas or method)")
        perm = np.empty(n, dtype=np.int64)
        perm[order_e] = order_p  # equal signatures matched in index order; ties are arbitrary
        _, inverse, counts = np.unique(sig_e, return_inverse=True, return_counts=True)
        determined = counts[inverse] == 1
        return ShfMaterial(block_size, perm), {"tied_positions": int((~determined).sum())}, determined

    def compare(self, recovered, truth, determined):
        return {"true_key_equal_where_determined": bool(np.array_equal(recovered.perm[determined],
                                                                       truth.perm[determined]))}

    def estimate(self, block_size, images, prior, rng, password=None, progress=None):
        """The permutation from keyed images alone (module doc): the best of several
        Frank–Wolfe starts on two views of the statistics (correlations, and correlations after
        each block's mean is removed), refined by pairwise exchanges; then the six namings of
        its channels, best objective first (``_channel_namings``)."""
        from keyshard.methods import qap

        starts = ESTIMATE_STARTS
        cipher = _transformed(_cipher_covariances(images, block_size))
        template = _transformed(prior.block_covariances(block_size))
        pairs = list(zip(cipher, template))
        perm, notes = qap.solve(pairs, starts, rng, progress)
        named = _channel_namings(perm, block_size, pairs)
        notes["objective"] = round(named[0][1], 4)  # the chosen naming's (the search's own may name them otherwise)
        return Estimate(tuple(ShfMaterial(block_size, p) for p, _ in named), {
            **notes, "candidates": "the permutation under each of the six namings of the channels",
            "chosen_by": "the structure objective", "objective_per_naming": [round(f, 4) for _, f in named]})

    def estimate_score(self, estimated, truth):
        """The fraction of block positions whose source the estimate names right, and the same
        up to a renaming of the channels (the estimate's positions, whatever it called the channels)."""
        right = float(np.mean(estimated.perm == truth.perm))
        renamed = [float(np.mean(p == truth.perm)) for p in _renamings(estimated.perm, estimated.block_size)]
        return {"key_fraction": right, "key_fraction_up_to_channel_naming": max(renamed)}

    def fold(self, material, size):
        """Values keep their 0..255 scale but may change channel: ``a = std[c_src] / std[c]``,
        ``offset = (mean[c_src] − mean[c]) / std[c]``."""
        m = material.block_size
        c, y, x, k = patch_positions(size, m)
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        r, col, sc = block_coords(material.perm[k], m)
        return Fold((sc, y - y % m + r, x - x % m + col), std[sc] / std[c], (mean[sc] - mean[c]) / std[c])

    def onnx_transform(self, material, height, width):
        """One Gather on each flattened image with the plan's gather index."""
        from keyshard.methods.onnx_graph import flat_gather

        return flat_gather("keyshard_shf", self.compile(material, height, width).gather, height, width, np.uint8)


ESTIMATE_STARTS = 4  # Frank–Wolfe starts of the ciphertext-only estimate (the first from the barycentre)


def _cipher_covariances(images, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Covariances of the keyed images' block positions (about each position's mean): within a
    block, with the block to the right and with the block below, over every block of every image."""
    n = m * m * CHANNELS
    grids = [to_blocks(x, m).astype(np.float64).reshape(x.shape[0] // m, x.shape[1] // m, n) for x in images]
    mean = np.mean([g.reshape(-1, n).mean(0) for g in grids], axis=0)
    sums, counts = [np.zeros((n, n)) for _ in range(3)], [0, 0, 0]
    for g in grids:
        z = g - mean
        for i, (a, b) in enumerate(((z, z), (z[:, :-1], z[:, 1:]), (z[:-1], z[1:]))):
            a, b = a.reshape(-1, n), b.reshape(-1, n)
            sums[i] += a.T @ b
            counts[i] += len(a)
    return tuple(s / max(c, 1) for s, c in zip(sums, counts))


def _transformed(covs) -> list[np.ndarray]:
    """Two views of (within, right, below) covariances, each centred: correlations, and
    correlations of the values less their block's mean (which removes what whole blocks share
    and leaves the fine structure inside a block).  Six matrices in all."""
    n = covs[0].shape[0]
    centre = np.eye(n) - 1.0 / n
    out = []
    for view in (covs, [centre @ c @ centre for c in covs]):
        sd = np.sqrt(np.maximum(np.diag(view[0]), 1e-9))
        out += [(c / sd[:, None] / sd[None, :]) - (c / sd[:, None] / sd[None, :]).mean() for c in view]
    return out


def _channel_namings(perm: np.ndarray, m: int, pairs) -> list[tuple[np.ndarray, float]]:
    """The six ways to rename the channels of an estimated permutation, each with its objective,
    best first.  The channels differ in how they vary inside a block once the block's mean is
    gone (the second view of ``_transformed``: colour edges), so the objective tells the namings
    apart where a colour prior cannot (red and blue trade places in photos of sky or water); all
    six stay candidates, for a stolen model (or a person) to overrule."""
    from keyshard.methods import qap

    return sorted(((p, qap.objective(p, pairs)) for p in _renamings(perm, m)), key=lambda t: -t[1])


def _renamings(perm: np.ndarray, m: int) -> list[np.ndarray]:
    """The permutation with its source channels renamed each of the six ways (itself first)."""
    r, c, ch = block_coords(perm, m)
    return [block_index(r, c, np.asarray(names)[ch], m) for names in itertools.permutations(range(CHANNELS))]


METHOD = Shf()
