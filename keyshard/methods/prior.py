"""The image prior of ciphertext-only key estimation: what ordinary photographs look like.

A ciphertext-only attacker holds keyed images and nothing else.  What lets them estimate a key
is that every block of every image went through the same position-wise map, and that plain
photographs have well-known statistics.  This module holds those statistics, measured on
photographs unrelated to any target:

* ``cov[c1, c2, L + dy, L + dx]``: the covariance of channel ``c1`` at a pixel and channel ``c2``
  at the pixel ``(dy, dx)`` away, for offsets up to ``L`` (the *reach*), about the photos'
  per-channel means ``mean``.  Photographs are (close to) stationary, so this one function gives
  the expected covariance of any two positions of a block, or of a block and its right or lower
  neighbour, for every block size with 2M - 1 <= L (``block_covariances``);
* ``colour_mean`` / ``colour_std``: how per-image colour features (channel means, channel
  standard deviations, the three channel correlations) vary over photos.  They choose between
  an NP mask and its complement, which structure alone cannot.

The shipped prior (``prior/photos.npz``, about 150 KB) is built from scikit-image's bundled
photographs by ``python -m keyshard.evaluate.ciphertext_only build-prior``; ``attack
ciphertext-only --prior DIR`` builds one from a folder of the user's own plain photographs.
A prior is never built from the target's own plain images: that would be a known-plaintext
attack, not a ciphertext-only one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from keyshard.keys import CHANNELS

FORMAT = "keyshard-image-prior/1"
REACH = 31  # largest pixel offset measured: enough for SHF's block templates up to M = 16
COLOUR_FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "corr_rg", "corr_rb", "corr_gb")
CROP = 256  # the colour features' spread is measured over crops of this size
# The least spread of each colour feature (0..255 means and deviations, correlations): a prior
# from a few photos understates how much colours vary, and one feature far outside a narrow
# spread would otherwise decide alone between an NP mask and its complement.  (Chosen when the
# colour features also named SHF's channels: with them the true channel order of single 256²
# crops of scikit-image's photos scored best in 80 % of crops, against 72 % without.)
COLOUR_FLOOR = np.array([25.0] * 6 + [0.2] * 3)


@dataclass(frozen=True, eq=False)
class ImagePrior:
    """Second-order statistics of plain photographs (module doc)."""

    mean: np.ndarray         # (3,) per-channel mean, 0..255
    cov: np.ndarray          # (3, 3, 2L+1, 2L+1) covariance against pixel offset
    colour_mean: np.ndarray  # (9,) COLOUR_FEATURES averaged over crops
    colour_std: np.ndarray   # (9,) their spread over crops
    source: str              # what it was built from, in words

    @property
    def reach(self) -> int:
        return (self.cov.shape[-1] - 1) // 2

    def block_covariances(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The expected covariances of a block's 3M² positions (flattening order of
        ``keyshard.transforms``) with each other, with the block to the right and with the block
        below: three 3M² × 3M² matrices, ``[a, b] = cov(position a, position b of that block)``."""
        if 2 * m - 1 > self.reach:
            from keyshard.errors import KeyshardError

            raise KeyshardError(f"the image prior reaches {self.reach} pixels; block size {m} needs {2 * m - 1}")
        from keyshard.transforms import block_coords

        r, c, ch = block_coords(np.arange(m * m * CHANNELS), m)
        big = self.reach

        def at(dy: int, dx: int) -> np.ndarray:
            oy, ox = r[None, :] - r[:, None] + dy + big, c[None, :] - c[:, None] + dx + big
            return self.cov[ch[:, None], ch[None, :], oy, ox]

        return at(0, 0), at(0, m), at(m, 0)

    def colour_distance(self, images) -> float:
        """How unlike photographs the images' colours are: the squared z-scores of their mean
        colour features (lower is more photo-like).  NP uses it to pick a mask over its complement."""
        features = np.mean([colour_features(np.asarray(x, dtype=np.float64)) for x in images], axis=0)
        return float(np.sum(((features - self.colour_mean) / self.colour_std) ** 2))


def colour_features(img: np.ndarray) -> np.ndarray:
    """COLOUR_FEATURES of one H×W×3 image (values 0..255)."""
    flat = img.reshape(-1, CHANNELS).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    z = (flat - mean) / std
    corr = [float(np.mean(z[:, a] * z[:, b])) for a, b in ((0, 1), (0, 2), (1, 2))]
    return np.concatenate([mean, std, corr])


def _correlate(fa: np.ndarray, fb: np.ndarray, shape: tuple, reach: int) -> np.ndarray:
    """Σ_p a(p) b(p + o) for offsets o in [-reach, reach]², from the two zero-padded spectra."""
    full = np.fft.irfft2(np.conj(fa) * fb, shape)
    iy, ix = np.arange(-reach, reach + 1) % shape[0], np.arange(-reach, reach + 1) % shape[1]
    return full[np.ix_(iy, ix)]


def from_images(images, source: str, reach: int = REACH) -> ImagePrior:
    """A prior from plain photographs (H×W×3 uint8, any sizes larger than ``reach``): covariances
    by FFT over every pixel pair, colour features over crops of CROP² (or the whole image)."""
    images = [np.asarray(x)[..., :CHANNELS] for x in images]
    mean = np.mean([x.reshape(-1, CHANNELS).mean(0) for x in images], axis=0)
    sums = np.zeros((CHANNELS, CHANNELS, 2 * reach + 1, 2 * reach + 1))
    counts = np.zeros((2 * reach + 1, 2 * reach + 1))
    feats = []
    for img in images:
        x = img.astype(np.float64) - mean
        shape = (x.shape[0] + reach, x.shape[1] + reach)
        spectra = [np.fft.rfft2(x[..., c], shape) for c in range(CHANNELS)]
        ones = np.fft.rfft2(np.ones(x.shape[:2]), shape)
        counts += _correlate(ones, ones, shape, reach)
        for c1 in range(CHANNELS):
            for c2 in range(CHANNELS):
                sums[c1, c2] += _correlate(spectra[c1], spectra[c2], shape, reach)
        feats += [colour_features(crop) for crop in crops(img, CROP, CROP // 2)]
    feats = np.array(feats)
    spread = np.maximum(feats.std(0), COLOUR_FLOOR)  # few photos understate the spread
    return ImagePrior(mean, sums / np.maximum(counts, 1), feats.mean(0), spread, source)


def crops(img: np.ndarray, size: int, stride: int) -> list[np.ndarray]:
    """size × size crops on a stride grid (the whole image when it is smaller)."""
    h, w = img.shape[:2]
    if h < size or w < size:
        return [img]
    return [img[y:y + size, x:x + size] for y in range(0, h - size + 1, stride) for x in range(0, w - size + 1, stride)]


def save(prior: ImagePrior, path) -> None:
    """A compressed .npz (float32 covariances: about 150 KB at reach 31)."""
    np.savez_compressed(path, format=np.array(FORMAT), mean=prior.mean, cov=prior.cov.astype(np.float32),
                        colour_mean=prior.colour_mean, colour_std=prior.colour_std, source=np.array(prior.source))


def load(path=None) -> ImagePrior:
    """A saved prior; by default the shipped one (``prior/photos.npz`` next to this module)."""
    where = Path(path) if path is not None else resources.files("keyshard.methods").joinpath("prior/photos.npz")
    with where.open("rb") as f, np.load(f) as doc:
        if str(doc["format"]) != FORMAT:
            from keyshard.errors import KeyshardError

            raise KeyshardError(f"{where}: not a keyshard image prior ({FORMAT} expected)")
        return ImagePrior(doc["mean"], doc["cov"].astype(np.float64), doc["colour_mean"], doc["colour_std"],
                          str(doc["source"]))


def shipped_path() -> Path:
    """Where the shipped prior lives in the source tree (what ``build-prior`` rewrites)."""
    return Path(__file__).resolve().parent / "prior" / "photos.npz"
