"""Ciphertext-only key estimation: what an attacker holding keyed images, and nothing else, gets.

One key maps every block of every image, so each keyed image is thousands of samples of the same
position-wise map; natural-image statistics (an image prior of unrelated photographs,
``keyshard.methods.prior``) estimate it.  Each method estimates its own key
(``Method.estimate``); this module reads the keyed samples, runs the estimator, writes the
estimate as an explicit key (the format ``attack known-plaintext`` writes) and scores it:

* against the true key (auditors): the share of the key material that is right
  (``Method.estimate_score``; NP also up to complement, SHF up to channel naming), the share of pixels that decrypt
  exactly, and the PSNR of the images decrypted with the estimate (beside the PSNR of the keyed
  images themselves, as they are);
* against a stolen model: its score (mIoU or top-1) on plain test shards encrypted with the
  estimate, beside the correct key's — where the estimator returns several candidates (NP:
  masks and their complements; SHF: the six namings of the channels), the model's score picks
  one.

``audit_row`` is the same attack run inside ``keyshard evaluate --ciphertext-only N`` on the
first N test images encrypted with the audited key.

``python -m keyshard.evaluate.ciphertext_only build-prior`` rebuilds the shipped image prior
from scikit-image's bundled photographs (``SKIMAGE_PHOTOS``).
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keyshard import keys, methods, sources
from keyshard.errors import KeyshardError
from keyshard.manifest import Manifest, read
from keyshard.methods import prior as image_prior
from keyshard.shardformat import decode_npy, stream_shard
from keyshard.transforms import compile_plan

MAX_IMAGES = 4096       # keyed images one estimate reads
MAX_PRIOR_IMAGES = 500  # photos a --prior folder contributes
PRIOR_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# scikit-image's bundled colour photographs (no download needed): the shipped prior's source
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")


# -- the image prior ---------------------------------------------------------------------------------
def skimage_photos(names=SKIMAGE_PHOTOS) -> dict[str, np.ndarray]:
    """scikit-image's bundled photographs by name (H×W×3 uint8); ``motorcycle`` is the left view
    of ``stereo_motorcycle``."""
    try:
        from skimage import data
    except ImportError:
        raise KeyshardError("scikit-image is needed for its bundled photographs "
                            "(`pip install scikit-image`; the test extra includes it)") from None
    loaders = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
               "motorcycle": lambda: data.stereo_motorcycle()[0]}
    return {n: np.ascontiguousarray(np.asarray(loaders[n]())[..., :3]) for n in names}


def skimage_prior(names=SKIMAGE_PHOTOS) -> image_prior.ImagePrior:
    """The prior of scikit-image's photographs ``names`` (the shipped prior: all of them)."""
    return image_prior.from_images(list(skimage_photos(names).values()),
                                   f"scikit-image photographs: {', '.join(names)}")


def prior_from_dir(folder, size: int) -> image_prior.ImagePrior:
    """A prior from a folder of the user's own plain photographs (searched recursively, at most
    MAX_PRIOR_IMAGES, in path order), each decoded and resized to size × size as ``encrypt``
    stores images, so the statistics are those of images of the shards' size."""
    from keyshard.images import BadSample, load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise KeyshardError(f"{folder}: not a directory of photographs")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PRIOR_SUFFIXES and p.is_file())
    images = []
    for path in files[:MAX_PRIOR_IMAGES]:
        try:
            images.append(load_image(path.read_bytes(), size, str(path))[0])
        except BadSample:
            continue  # an unreadable photo is left out of the statistics
    if not images:
        raise KeyshardError(f"{folder}: holds no readable photographs ({', '.join(PRIOR_SUFFIXES)})")
    return image_prior.from_images(images, f"{len(images)} photographs of {folder}")


def load_prior(folder=None, size: int = 256) -> image_prior.ImagePrior:
    """The user's folder's prior, or the shipped one."""
    return prior_from_dir(folder, size) if folder is not None else image_prior.load()


# -- keyed images ----------------------------------------------------------------------------------
def open_keyed(enc_dir, split: str | None) -> tuple[Manifest, list]:
    """The keyed shards' manifest and the shards to read (of ``split``, or of every split; never
    augmented replicas), in manifest order; refuses plain shards and a method without an
    estimator before reading any sample."""
    manifest = read(enc_dir)
    enc = manifest.encryption
    if enc.plain:
        raise KeyshardError(f"{enc_dir}: holds plain shards (written without a key): nothing to estimate")
    check_estimable(enc.method)
    chosen = [s for s in manifest.shards if s.replica == 0 and (split is None or s.split == split)]
    if not chosen:
        present = ", ".join(dict.fromkeys(s.split for s in manifest.shards)) or "none"
        raise KeyshardError(f"{enc_dir}: holds no keyed shards" + (f" of split {split!r} (its splits: {present})"
                                                                   if split else ""))
    return manifest, chosen


def first_images(source, shards, n: int, tick=None) -> list[np.ndarray]:
    """The stored pixels of the first ``n`` samples of ``shards``, streamed in order; ``tick()``
    after each."""
    images: list[np.ndarray] = []
    for shard in shards:
        for _, files in stream_shard(sources.join(source, shard.file), shard.entry()):
            images.append(decode_npy(files["img.npy"]))
            if tick is not None:
                tick()
            if len(images) == n:
                return images
    return images


def check_estimable(name: str) -> methods.Method:
    """The registered method ``name``, if it has a ciphertext-only estimator."""
    method = methods.get(name)
    if type(method).estimate is methods.Method.estimate:
        raise KeyshardError(f"method {name!r} has no ciphertext-only estimator")
    return method


def check_count(n_images: int, setting: str) -> None:
    """How many keyed images one estimate may read: 1..MAX_IMAGES (``setting`` names it)."""
    if not 1 <= n_images <= MAX_IMAGES:
        raise KeyshardError(f"`{setting}` {n_images} must be in 1..{MAX_IMAGES}")


# -- the estimate ------------------------------------------------------------------------------------
@dataclass
class Estimated:
    """An estimate and how it was made: the candidates (the chosen one first), the method's
    notes, the keyed images it came from and the seconds it took."""

    method: str
    block_size: int
    candidates: list
    notes: dict
    images: list
    seconds: float
    chosen_by: str

    def key(self) -> keys.Key:
        """The chosen candidate as an explicit key (a fresh secret keys only its fingerprint)."""
        return keys.Key(method=self.method, block_size=self.block_size, secret=secrets.token_bytes(32),
                        explicit=self.candidates[0])


def estimate(method_name: str, block_size: int, images: list, prior, password: bytes | None = None,
             seed: int = 0, progress=None) -> Estimated:
    """Run the method's estimator on the keyed images; KeyshardError when it has none."""
    if not images:
        raise KeyshardError("no keyed images to estimate a key from")
    method = check_estimable(method_name)
    started = time.perf_counter()
    result = method.estimate(block_size, images, prior, np.random.default_rng(seed),
                             password=password if method.takes_password else None, progress=progress)
    if result is None:
        raise KeyshardError(f"method {method_name!r} has no ciphertext-only estimator")
    chosen = result.notes.get("chosen_by", "the only candidate") if len(result.candidates) > 1 else "the only candidate"
    return Estimated(method_name, block_size, list(result.candidates), dict(result.notes), images,
                     time.perf_counter() - started, chosen)


# -- scores ----------------------------------------------------------------------------------------
def psnr(estimate: np.ndarray, truth: np.ndarray, peak: float = 255.0) -> float | None:
    """Peak signal-to-noise ratio in dB over all pixels; None where the two are identical."""
    mse = float(np.mean((np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64)) ** 2))
    return None if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def decrypt_all(material, images: list) -> np.ndarray | None:
    """The images decrypted with ``material`` (uint8 N×H×W×3), or None when the material cannot
    decrypt them (a value it never produces)."""
    h, w = images[0].shape[:2]
    plan = compile_plan(material, h, w)
    try:
        return np.stack([plan.decrypt(x) for x in images])
    except ValueError:
        return None


def score_against(est: Estimated, truth) -> dict:
    """With the true key's material: the share of key material right, the share of pixels that
    decrypt exactly with the estimate, the PSNR of the estimate's decryptions and of the keyed
    images as they are (each against the true plain images)."""
    plain = decrypt_all(truth, est.images)
    if plain is None:
        raise KeyshardError("the true key does not decrypt these keyed images (another key?)")
    decrypted = decrypt_all(est.candidates[0], est.images)
    keyed = np.stack([x.astype(np.float64) * (255.0 / truth.divisor) for x in est.images])
    out = dict(methods.get(est.method).estimate_score(est.candidates[0], truth))
    out["pixels_exact"] = 0.0 if decrypted is None else float(np.mean(decrypted == plain))
    out["psnr_db"] = None if decrypted is None else psnr(decrypted, plain)
    out["psnr_keyed_db"] = psnr(keyed, plain)
    return _rounded(out)


def _rounded(doc):
    if isinstance(doc, float):
        return round(doc, 6)
    if isinstance(doc, dict):
        return {k: _rounded(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_rounded(v) for v in doc]
    return doc


def report(est: Estimated, manifest: Manifest | None, prior) -> dict:
    """The attack's JSON report without scores (``score_against`` and ``model_scores`` add them)."""
    return _rounded({
        "method": est.method, "block_size": est.block_size, "images": len(est.images),
        "image_size": list(est.images[0].shape[:2]), "prior": prior.source, "seconds": est.seconds,
        "candidates": len(est.candidates), "chosen_by": est.chosen_by, "estimate": est.notes,
        "encrypted_key_fingerprint": manifest.encryption.key_fingerprint if manifest is not None else None})


# -- the stolen model ----------------------------------------------------------------------------------
def model_scores(est: Estimated, ckpt_path, test_dir, true_key: keys.Key | None = None,
                 batch_size: int = 32, workers: int = 0, progress: bool = True) -> dict:
    """The stolen model's score on plain test shards encrypted with each candidate (and the true
    key, when given), one pass; the best-scoring candidate becomes the estimate.  Returns the
    report's ``model`` record."""
    from keyshard import tasks
    from keyshard.evaluate.audit import check_dataset, check_image_size, check_test_split
    from keyshard.train.checkpoint import load_model
    from keyshard.train.device import pick_device

    device = pick_device()
    model, state = load_model(ckpt_path, device)
    test = read(test_dir)
    check_test_split(test, test_dir)
    check_dataset(state, test, ckpt_path, test_dir)
    data = state["data"]
    if data["plain"] or (data["method"], data["block_size"]) != (est.method, est.block_size):
        trained = "plain images" if data["plain"] else f"{data['method']} M={data['block_size']}"
        raise KeyshardError(f"{ckpt_path}: was trained with {trained}, not {est.method} M={est.block_size}")
    check_image_size(data, test, test_dir)  # the estimate's plans are compiled at the test size
    headline = tasks.for_kind(test.dataset.kind).headline
    materials = est.candidates + ([true_key.material] if true_key is not None else [])
    scores = [s[headline] for s in _score(model, materials, test_dir, test, device, batch_size, workers, progress)]
    ranked = rank_by_model(est, scores[:len(est.candidates)])
    return _rounded({"checkpoint": str(ckpt_path), "metric": headline, "estimated_key": ranked[0],
                     "candidates": ranked, "correct_key": scores[-1] if true_key is not None else None})


def rank_by_model(est: Estimated, scores: list[float]) -> list[float]:
    """Order the estimate's candidates by the stolen model's score on them, best first (the
    best becomes the estimate); returns the scores in that order."""
    order = sorted(range(len(est.candidates)), key=lambda i: -scores[i])  # stable: ties keep the estimator's order
    est.candidates = [est.candidates[i] for i in order]
    if len(order) > 1:
        est.chosen_by = "the stolen model's score"
    return [scores[i] for i in order]


def _score(model, materials, test_dir, test, device, batch_size, workers, progress) -> list[dict]:
    from keyshard.evaluate.audit import score_on_split

    size = test.image.height
    configs = [(compile_plan(m, size, size).to_torch(device), m.divisor) for m in materials]
    return score_on_split(model, configs, test_dir, test, device, batch_size, workers, progress,
                          desc="model with the estimate")


# -- the command's library entry ------------------------------------------------------------------------
def attack(enc_dir, split: str | None = None, n_images: int = 16, prior_dir=None, password: bytes | None = None,
           seed: int = 0, progress: bool = True) -> tuple[Manifest, Estimated, dict]:
    """Read ``n_images`` keyed samples, estimate the key from them alone; (manifest, estimate,
    report without scores).  Inputs are checked first; then a progress bar on stderr: images
    read, then the search."""
    from tqdm import tqdm

    check_count(n_images, "n_images")
    manifest, shards = open_keyed(enc_dir, split)
    prior = load_prior(prior_dir, manifest.image.height)
    enc = manifest.encryption
    with tqdm(total=n_images + 100, desc="ciphertext-only", unit="step", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        images = first_images(enc_dir, shards, n_images, tick=lambda: bar.update(1))

        def advance(done, total):
            bar.n = n_images + int(100 * done / max(total, 1))
            bar.refresh()

        est = estimate(enc.method, enc.block_size, images, prior, password, seed, advance)
        advance(1, 1)
    return manifest, est, report(est, manifest, prior)


# -- the audit's row -----------------------------------------------------------------------------------
def audit_row(key: keys.Key, model, device, test_dir, test: Manifest, n_images: int, correct: float,
              batch_size: int = 32, workers: int = 0, progress: bool = True, seed: int = 0) -> dict:
    """``evaluate --ciphertext-only N``: the first N test images encrypted with the audited key,
    the key estimated from them alone with the shipped prior (an FFX password unknown to the
    attacker), scored against the key and by the model on the test split (the best of the
    candidates, beside the correct key's score ``correct``).  audit.json's ``ciphertext_only``."""
    from keyshard import tasks

    plain = first_images(test_dir, test.shards_of("test"), n_images)
    plan = compile_plan(key.material, *plain[0].shape[:2])
    prior = image_prior.load()
    est = estimate(key.method, key.block_size, [plan.encrypt(x) for x in plain], prior, None, seed)
    headline = tasks.for_kind(test.dataset.kind).headline
    ranked = rank_by_model(est, [s[headline] for s in _score(model, est.candidates, test_dir, test, device,
                                                              batch_size, workers, progress)])
    return {"images": len(plain), "prior": prior.source, "password_known": False, "seconds": round(est.seconds, 3),
            "scores": score_against(est, key.material),  # scores as the audit's own: not rounded
            "model": {"metric": headline, "estimated_key": ranked[0], "correct_key": correct}}


def check_audit_request(key: keys.Key, n_images: int) -> None:
    """``evaluate --ciphertext-only N`` refused before the audit runs: too many images, or a
    method without an estimator."""
    check_count(n_images, "ciphertext_only")
    check_estimable(key.method)


def summary_line(row: dict) -> str:
    """audit.md's line: what N leaked keyed images give an attacker."""
    s, m = row["scores"], row["model"]
    psnr_text = "identical images" if s["psnr_db"] is None else f"PSNR {s['psnr_db']:.1f} dB"
    return (f"- ciphertext-only: from {row['images']} keyed test image(s) alone an attacker recovers "
            f"{100 * s['key_fraction']:.1f} % of the key ({100 * s['pixels_exact']:.1f} % of pixels decrypt exactly, "
            f"{psnr_text}; the keyed images: {s['psnr_keyed_db']:.1f} dB); the stolen model scores "
            f"{m['estimated_key']:.4f} {m['metric']} with the estimate (correct key: {m['correct_key']:.4f}) — "
            f"{row['seconds']:.1f} s, prior: {row['prior']}")


# -- rebuilding the shipped prior ------------------------------------------------------------------------
def main(argv=None) -> None:
    """``python -m keyshard.evaluate.ciphertext_only build-prior [-o PATH]``: rebuild the shipped
    image prior from scikit-image's bundled photographs (default: keyshard/methods/prior/photos.npz)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m keyshard.evaluate.ciphertext_only")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-prior", help="rebuild the shipped image prior from scikit-image's photographs")
    build.add_argument("-o", "--output", default=str(image_prior.shipped_path()), help="where to write the .npz")
    args = parser.parse_args(argv)
    prior = skimage_prior()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    image_prior.save(prior, args.output)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size} bytes): {prior.source}")


if __name__ == "__main__":
    main()
