"""Encryption throughput vs a fixed decode+resize baseline, all in one run (ratios, not timings).

(a) baseline: PIL decode + RGB + antialiased bilinear resize of each image, PIL decode + nearest
    resize of its mask — the floor any pipeline pays;
(b) the full ``keyshard encrypt`` path to shards (read, decode, resize, encrypt, encode, tar,
    sha256, manifest) per method and block size;
both at 1 process and at 2, plus transform-only µs per 256×256 image (numpy and torch).

    python benchmarks/bench_encrypt.py [--images 600] [--size 256] [--voc PATH]

Images: with ``--voc`` the first N ids of a real VOC2012 layout; otherwise VOC-like photos
(500×375 / 375×500 JPEGs, quality 90) cut from the real photographs that ship with
scikit-image (``pip install scikit-image``; a benchmark-only dependency), with toy label maps.
Pure-noise synthetic images would overstate JPEG decode cost, which both paths pay.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "retina", "grass", "gravel", "brick", "immunohistochemistry")


def make_photo_voc(out: Path, n: int) -> Path:
    """A VOC layout of ``n`` photo crops (JPEG q90, VOC's typical sizes) with toy label maps."""
    import skimage.data

    from keyshard.pipeline.toy_voc import make_toy_voc

    root = make_toy_voc(out, images=n, min_side=375, max_side=500, progress=False)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skimage.data, p)()).convert("RGB") for p in PHOTOS]
    for jpg in sorted((root / "JPEGImages").glob("*.jpg")):
        w, h = Image.open(jpg).size
        photo = photos[int(rng.integers(len(photos)))]
        scale = max(w / photo.width, h / photo.height) * rng.uniform(1.0, 1.6)
        big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1), Image.BICUBIC)
        x0, y0 = int(rng.integers(big.width - w + 1)), int(rng.integers(big.height - h + 1))
        big.crop((x0, y0, x0 + w, y0 + h)).save(jpg, quality=90)
    return root


def baseline_worker(paths, size):
    for jpg, png in paths:
        with Image.open(jpg) as im:
            np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        with Image.open(png) as m:
            np.asarray(m.resize((size, size), Image.NEAREST))
    return len(paths)


def baseline(pairs, size, jobs):
    chunks = [pairs[i::jobs] for i in range(jobs)]
    t = time.perf_counter()
    if jobs == 1:
        baseline_worker(pairs, size)
    else:
        Parallel(n_jobs=jobs)(delayed(baseline_worker)(c, size) for c in chunks)
    return len(pairs) / (time.perf_counter() - t)


def full_path(voc, key, size, jobs, work):
    from keyshard.pipeline import encrypt_job

    out = Path(work) / f"out-{time.perf_counter_ns()}"
    opts = encrypt_job.EncryptOptions(size=size, splits=("train", "holdout", "test"), shard_size=32)
    t = time.perf_counter()
    doc = encrypt_job.run(str(voc), str(out), key, opts, jobs=jobs, progress=False)
    dt = time.perf_counter() - t
    n = sum(s["samples"] for s in doc["shards"])
    shutil.rmtree(out)
    return n / dt


def transform_us(key, size, reps=50):
    import torch

    from keyshard.transforms import compile_plan

    plan = compile_plan(key.material, size, size)
    x = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    plan.encrypt(x)
    t = time.perf_counter()
    for _ in range(reps):
        plan.encrypt(x)
    np_us = (time.perf_counter() - t) / reps * 1e6
    tp, xt = plan.to_torch("cpu"), torch.from_numpy(x)[None]
    tp.encrypt(xt)
    t = time.perf_counter()
    for _ in range(reps):
        tp.encrypt(xt)
    return np_us, (time.perf_counter() - t) / reps * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--block-sizes", default="2,16,256")
    ap.add_argument("--voc", default=None, help="Real VOC2012 layout to read the first N ids from.")
    args = ap.parse_args()

    import torch

    from keyshard import keys
    from keyshard.pipeline.toy_voc import make_toy_voc

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="keyshard-bench-")
    try:
        if args.voc:
            from keyshard.pipeline.voc import VocSource

            src = VocSource.open(args.voc)
            root = Path(work) / "voc" / "VOCdevkit" / "VOC2012"
            take = {s: src.split_ids(s)[: args.images // 2] for s in ("train", "val")}
            for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
                (root / sub).mkdir(parents=True)
            for split, ids_ in take.items():
                (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in ids_))
                for i in ids_:
                    ref = src.ref(i, split)
                    (root / "JPEGImages" / f"{i}.jpg").write_bytes(ref.image.read())
                    (root / "SegmentationClass" / f"{i}.png").write_bytes(ref.mask.read())
            source = f"real VOC2012 ({args.voc})"
        else:
            root = make_photo_voc(Path(work) / "voc", args.images)
            source = "photo crops (scikit-image data), JPEG q90"
        ids = [p.stem for p in (root / "JPEGImages").glob("*.jpg")]
        mean_kb = np.mean([(root / "JPEGImages" / f"{i}.jpg").stat().st_size for i in ids]) / 1024
        pairs = [(str(root / "JPEGImages" / f"{i}.jpg"), str(root / "SegmentationClass" / f"{i}.png")) for i in ids]
        baseline_worker(pairs[:20], args.size)  # warm file cache
        Parallel(n_jobs=2)(delayed(baseline_worker)(pairs[:2], args.size) for _ in range(2))  # start workers
        warm = make_toy_voc(Path(work) / "warm", images=8, progress=False)
        full_path(warm.parent.parent, keys.generate("ffx", 2), args.size, 2, work)  # workers import keyshard

        configs = [("plain", None)] + [(m, int(b)) for m in keys.METHODS for b in args.block_sizes.split(",")]
        rows = []
        base = {j: baseline(pairs, args.size, j) for j in (1, 2)}
        for method, m in configs:
            key = None if method == "plain" else keys.generate(method, m)
            row = {"config": "plain" if key is None else f"{method} M={m}"}
            for jobs in (1, 2):
                b = full_path(root.parent.parent, key, args.size, jobs, work)
                row[f"b{jobs}"] = b
            row["np_us"], row["torch_us"] = transform_us(key, args.size) if key else (float("nan"),) * 2
            rows.append(row)
        base = {j: (base[j] + baseline(pairs, args.size, j)) / 2 for j in (1, 2)}  # baseline before and after, averaged

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}, torch {torch.__version__}; "
              f"{len(pairs)} JPEGs, {source}, mean {mean_kb:.0f} KB -> {args.size}x{args.size}")
        print(f"baseline (a) PIL decode+resize, image+mask: 1 proc {base[1]:.0f} img/s, 2 procs {base[2]:.0f} img/s\n")
        print("| config | (b) 1 proc img/s | b/a 1 proc | (b) 2 procs img/s | b/a 2 procs | transform numpy µs | transform torch µs |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            r["r1"], r["r2"] = r["b1"] / base[1], r["b2"] / base[2]
            us = "| — | — |" if r["np_us"] != r["np_us"] else f"| {r['np_us']:.0f} | {r['torch_us']:.0f} |"
            print(f"| {r['config']} | {r['b1']:.0f} | {r['r1']:.2f} | {r['b2']:.0f} | {r['r2']:.2f} {us}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
