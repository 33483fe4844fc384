"""Ciphertext-only key estimation: how much of a key N leaked keyed images give away.

For every method and block size M, keys are drawn as `keyshard keygen` draws them (a secret,
here seeded so runs repeat; the FFX password derived from it, so unknown to the attacker), N
keyed 256×256 images are made, and `attack ciphertext-only`'s estimator is run on them alone.
Each estimate is scored against the true key: the share of the key material that is right (NP
up to complement as well), the share of pixels that decrypt exactly, and the PSNR of the
decrypted images (beside that of the keyed images as they are).

Images: by default crops of scikit-image's bundled photographs (a benchmark-only dependency),
in two folds — the crops of one fold are the targets and the image prior is built from the
other fold's photographs, so the prior never holds a target's own photograph.  The folds hold
3 and 2 photographs, so crops at random places overlap: N = 16 and 64 see fewer distinct pixels
than 16 or 64 unrelated photos would.  ``--image-dir DIR``: crops of your own photographs (the
shipped prior is used; it is built from scikit-image's photographs, unrelated to yours);
with ``--resized``, each photograph whole, its halves and their mirror images, resized to 256²
as ``encrypt`` stores a dataset's images.

Writes a CSV and a plot (default: docs/assets/ciphertext-only.csv, .png), prints a markdown
table with the hardware, and with ``--write-table`` the table behind key-info's and encrypt's
warnings (keyshard/methods/ciphertext_only.json: each (method, M) whose keys fall, ≥ 99 % of
pixels exact, to at most 16 images, and the fewest images that did it).

    python benchmarks/bench_ciphertext_only.py                       # everything, ~3 min on 2 cores
    python benchmarks/bench_ciphertext_only.py --methods np --block-sizes 2,4 --images 1,4 --trials 1
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from keyshard import keys
from keyshard.evaluate import ciphertext_only as co
from keyshard.methods import defaults, prior as image_prior
from keyshard.transforms import compile_plan

ROOT = Path(__file__).resolve().parents[1]
FOLDS = (("astronaut", "rocket", "chelsea"), ("coffee", "motorcycle"))
SIZE = 256
EXACT = 0.99  # the warnings' threshold: share of pixels decrypting exactly
WARN_IMAGES = 16  # ... from at most this many keyed images


def secret(method: str, m: int, trial: int) -> bytes:
    return hashlib.sha256(f"bench-ciphertext-only|{method}|{m}|{trial}".encode()).digest()


def crops(images: list, n: int, seed: int) -> list[np.ndarray]:
    """n SIZE² crops at seeded random places, cycling through the images."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        y, x = rng.integers(0, img.shape[0] - SIZE + 1), rng.integers(0, img.shape[1] - SIZE + 1)
        out.append(np.ascontiguousarray(img[y:y + SIZE, x:x + SIZE]))
    return out


def whole(images: list, n: int, seed: int) -> list[np.ndarray]:
    """n of the (already SIZE²) images, drawn without repeats as long as there are enough."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-n // len(images)))])
    return [images[i] for i in order[:n]]


def resized_views(images: list) -> list[np.ndarray]:
    """Each photograph whole, its four halves (left, right, top, bottom) and the mirror image of
    each, every one resized to SIZE² as ``encrypt`` stores an image: ten images a photograph,
    like a dataset's own images rather than crops of a few large ones."""
    import torch

    from keyshard.images import stored_pixels

    out = []
    for img in images:
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        h, w = t.shape[-2:]
        for view in (t, t[..., :w // 2], t[..., w // 2:], t[:, :h // 2], t[:, h // 2:]):
            for v in (view, view.flip(-1)):
                out.append(stored_pixels(v.contiguous(), SIZE).numpy())
    return out


def image_sets(image_dir, resized: bool = False) -> list[tuple[list, object]]:
    """[(target photographs, prior)]: the two scikit-image folds, or the user's photos with the
    shipped prior (``resized``: their resized views instead of the photographs)."""
    if image_dir is None:
        photos = co.skimage_photos()
        return [([photos[n] for n in fold], co.skimage_prior(tuple(p for f in FOLDS if f is not fold for p in f)))
                for fold in FOLDS]
    from keyshard.images import decode_rgb

    files = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in co.PRIOR_SUFFIXES)
    images = [decode_rgb(p.read_bytes(), str(p)).permute(1, 2, 0).numpy() for p in files]
    images = [x for x in images if min(x.shape[:2]) >= SIZE]
    if not images:
        sys.exit(f"{image_dir}: no photographs of at least {SIZE}×{SIZE}")
    return [(resized_views(images) if resized else images, image_prior.load())]


def one(method: str, m: int, n: int, trial: int, sets, draw=crops) -> dict:
    """One estimate from n keyed images (``draw``: crops, or whole resized images), scored
    against its key."""
    targets, prior = sets[trial % len(sets)]
    plain = draw(targets, n, seed=1000 * trial + n)
    key = keys.Key(method, m, secret(method, m, trial))
    plan = compile_plan(key.material, SIZE, SIZE)
    est = co.estimate(method, m, [plan.encrypt(x) for x in plain], prior, seed=trial)
    scores = co.score_against(est, key.material)
    return {"method": method, "block_size": m, "images": n, "trial": trial, "seconds": round(est.seconds, 3),
            "key_fraction": scores["key_fraction"],
            "key_fraction_up_to_symmetry": next((v for k, v in scores.items() if k.startswith("key_fraction_up_to_")),
                                                scores["key_fraction"]),
            "pixels_exact": scores["pixels_exact"],
            "pixels_exact_best_candidate": max(best_candidate(est, key.material), scores["pixels_exact"]),
            "psnr_db": math.inf if scores["psnr_db"] is None else scores["psnr_db"],
            "psnr_keyed_db": scores["psnr_keyed_db"]}


def best_candidate(est, truth) -> float:
    """The share of pixels exact with the best of the estimate's candidates (NP: the mask or its
    complement; SHF: one of the six channel namings): what an attacker gets who can tell the
    candidates apart, by eye or with the stolen model."""
    plain = co.decrypt_all(truth, est.images)
    shares = [co.decrypt_all(c, est.images) for c in est.candidates]
    return max(0.0 if d is None else float(np.mean(d == plain)) for d in shares)


def prototype_shf(m: int, images: list, prior, rng) -> np.ndarray:
    """The issue's prototype, for comparison: correlations only (within, right, below), one
    Frank–Wolfe run from the barycentre, no refinement; the channels named as the estimator does."""
    from keyshard.methods import qap, shf

    pairs = list(zip(shf._transformed(shf._cipher_covariances(images, m)), shf._transformed(prior.block_covariances(m))))
    n = pairs[0][0].shape[0]
    perm = qap.frank_wolfe(pairs[:3], np.full((n, n), 1.0 / n))
    return shf._channel_namings(perm, m, pairs)[0][0]


def ablation(block_sizes, counts, trials: int, sets) -> list[str]:
    """SHF: the shipped estimator against the prototype's search, positions right (mean over trials)."""
    lines = ["| M | N | prototype search | shipped estimator |", "|---:|---:|---:|---:|"]
    for m in block_sizes:
        for n in counts:
            proto, full = [], []
            for trial in range(trials):
                targets, prior = sets[trial % len(sets)]
                plain = crops(targets, n, seed=1000 * trial + n)
                key = keys.Key("shf", m, secret("shf", m, trial))
                plan = compile_plan(key.material, SIZE, SIZE)
                images = [plan.encrypt(x) for x in plain]
                proto.append(np.mean(prototype_shf(m, images, prior, np.random.default_rng(trial)) == key.material.perm))
                full.append(one("shf", m, n, trial, sets)["key_fraction"])
            lines.append(f"| {m} | {n} | {100 * np.mean(proto):.1f} % | {100 * np.mean(full):.1f} % |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def model_rows(sweep_dirs, counts, trials: int) -> list[dict]:
    """The stolen model's score with the estimate: for every cell of the given ``keyshard sweep``
    directories (toy models; ``benchmarks/bench_mini_sweep.py`` makes them), the key estimated
    from N keyed test images alone with the shipped prior, as ``evaluate --ciphertext-only N``
    does (the model picks among the candidates), beside the cell's audit (correct key, plain
    images, wrong keys).  Each cell has one key, its own, so ``trials`` only reseeds the search."""
    from keyshard.manifest import read
    from keyshard.train.checkpoint import load_model

    out = []
    for sweep in map(Path, sweep_dirs):
        test = read(sweep / "plain")
        for cell in sorted(d for d in sweep.iterdir() if (d / "key.json").exists() and (d / "run" / "best.pt").exists()):
            audit = json.loads((cell / "audit" / "audit.json").read_text())
            key = keys.load(cell / "key.json")
            model, state = load_model(str(cell / "run" / "best.pt"), "cpu")
            results = audit["results"]
            for n in counts:
                for trial in range(trials):
                    started = time.perf_counter()
                    row = co.audit_row(key, model, "cpu", str(sweep / "plain"), test, n, results["correct"]["miou"],
                                       progress=False, seed=trial)
                    row_seconds = time.perf_counter() - started
                    out.append({"sweep": sweep.name, "method": key.method, "block_size": key.block_size, "images": n,
                                "trial": trial, "epochs": state["config"]["epochs"],
                                "key_fraction": row["scores"]["key_fraction"], "pixels_exact": row["scores"]["pixels_exact"],
                                "miou_estimate": row["model"]["estimated_key"], "miou_correct": results["correct"]["miou"],
                                "miou_plain": results["plain"]["miou"], "miou_wrong_mean": results["wrong"]["summary"]["mean"],
                                "estimate_seconds": row["seconds"], "row_seconds": round(row_seconds, 2)})
                    print(f"model {cell.name} N={n} trial {trial}: estimate {out[-1]['miou_estimate']:.4f} vs correct "
                          f"{out[-1]['miou_correct']:.4f}", file=sys.stderr, flush=True)
    return sorted(out, key=model_order)


def model_order(row: dict) -> tuple:
    """The models' table order: sweep directory, method (keyshard's order), M, N."""
    from keyshard import methods

    order = methods.names()
    return (row["sweep"], order.index(row["method"]) if row["method"] in order else len(order), row["block_size"],
            row["images"], row["trial"])


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, M, N): means over trials (PSNR: the median, ∞ when exact)."""
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["block_size"], r["images"]), []).append(r)
    out = []
    for (method, m, n), rs in cells.items():
        out.append({"method": method, "block_size": m, "images": n, "trials": len(rs),
                    **{f: float(np.mean([r[f] for r in rs])) for f in
                       ("key_fraction", "key_fraction_up_to_symmetry", "pixels_exact", "pixels_exact_best_candidate",
                        "seconds")},
                    "pixels_exact_min": float(min(r["pixels_exact"] for r in rs)),
                    "psnr_db": float(np.median([r["psnr_db"] for r in rs])),
                    "psnr_keyed_db": float(np.median([r["psnr_keyed_db"] for r in rs]))})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def models_markdown(rows: list[dict], hardware: str) -> str:
    """The stolen toy models' table: one line per cell and N."""
    lines = [f"Hardware: {hardware}.", "",
             "| method | M | epochs | N | key right | pixels exact | mIoU, estimated key | mIoU, correct key | "
             "mIoU, plain images | mIoU, wrong keys (mean) | s / row |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['block_size']} | {r['epochs']} | {r['images']} | "
                     f"{100 * r['key_fraction']:.1f} % | {100 * r['pixels_exact']:.1f} % | {r['miou_estimate']:.4f} | "
                     f"{r['miou_correct']:.4f} | {r['miou_plain']:.4f} | {r['miou_wrong_mean']:.4f} | {r['row_seconds']:.1f} |")
    return "\n".join(lines)


def markdown(summary: list[dict], hardware: str) -> str:
    lines = [f"Hardware: {hardware}.", "",
             "| method | M | N | key right | key right (up to complement / channel naming) | pixels exact (mean / min) | "
             "pixels exact, best candidate | PSNR (dB) | PSNR keyed (dB) | s / estimate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        psnr_text = "∞" if math.isinf(s["psnr_db"]) else f"{s['psnr_db']:.1f}"
        lines.append(f"| {s['method']} | {s['block_size']} | {s['images']} | {100 * s['key_fraction']:.1f} % | "
                     f"{100 * s['key_fraction_up_to_symmetry']:.1f} % | {100 * s['pixels_exact']:.2f} % / "
                     f"{100 * s['pixels_exact_min']:.2f} % | {100 * s['pixels_exact_best_candidate']:.2f} % | {psnr_text} | {s['psnr_keyed_db']:.1f} | "
                     f"{s['seconds']:.2f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, hardware: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods_seen = list(dict.fromkeys(s["method"] for s in summary))
    fig, axes = plt.subplots(1, len(methods_seen), figsize=(4 * len(methods_seen), 3.4), dpi=110, squeeze=False)
    for ax, method in zip(axes[0], methods_seen):
        for m in sorted({s["block_size"] for s in summary if s["method"] == method}):
            pts = sorted((s["images"], s["pixels_exact"]) for s in summary if (s["method"], s["block_size"]) == (method, m))
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=f"M={m}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 101)
        ax.set_xlabel("keyed images the attacker holds (N)")
        ax.set_title(method.upper())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pixels decrypting exactly (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Ciphertext-only key estimation — {hardware}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def warning_table(summary: list[dict], hardware: str) -> dict:
    """Each (method, M) with ≥ EXACT of pixels exact (mean over trials) from ≤ WARN_IMAGES
    images, and the fewest images that did it."""
    entries = {}
    for s in sorted(summary, key=lambda s: s["images"]):
        if s["images"] <= WARN_IMAGES and s["pixels_exact"] >= EXACT:
            entries.setdefault((s["method"], s["block_size"]), s)
    return {"source": "benchmarks/bench_ciphertext_only.py", "hardware": hardware, "threshold": EXACT,
            "max_images": WARN_IMAGES,
            "entries": [{"method": k[0], "block_size": k[1], "images": s["images"],
                         "pixels_exact": round(s["pixels_exact"], 4)} for k, s in sorted(entries.items())]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-dir", default=None, help="Your own photographs (default: scikit-image's).")
    ap.add_argument("--resized", action="store_true",
                    help="With --image-dir: whole photographs and their halves resized to 256² as encrypt stores "
                         "images, instead of 256² crops.")
    ap.add_argument("--methods", default="shf,np,ffx")
    ap.add_argument("--block-sizes", default="2,4,8,16")
    ap.add_argument("--images", default="1,4,16,64", help="N: keyed images per estimate.")
    ap.add_argument("--trials", type=int, default=3, help="Keys (and crop draws) per cell.")
    ap.add_argument("--csv", default=str(ROOT / "docs" / "assets" / "ciphertext-only.csv"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "assets" / "ciphertext-only.png"))
    ap.add_argument("--ablation", action="store_true",
                    help="Only compare SHF's estimator with the prototype's single Frank-Wolfe run (M=8,16; N=1,4).")
    ap.add_argument("--models", action="append", default=[], metavar="SWEEP_DIR",
                    help="Also score toy models: each cell of this `keyshard sweep` directory (repeatable), the key "
                         "estimated from N keyed test images (benchmarks/bench_mini_sweep.py makes the directories).")
    ap.add_argument("--model-images", default="4,16", help="N for --models.")
    ap.add_argument("--only-models", action="store_true", help="With --models: skip the crops' table.")
    ap.add_argument("--models-csv", default=str(ROOT / "docs" / "assets" / "ciphertext-only-models.csv"))
    ap.add_argument("--write-table", action="store_true",
                    help=f"Also write the warnings' table ({defaults.CIPHERTEXT_ONLY_TABLE}).")
    args = ap.parse_args()
    from cpu import cpu_model

    hardware = f"{cpu_model()} ({platform.machine()}), {len(os.sched_getaffinity(0))} cores (numpy/scipy, no GPU)"
    if args.resized and args.image_dir is None:
        sys.exit("--resized needs --image-dir")
    sets = image_sets(args.image_dir, args.resized)
    if args.ablation:
        print(f"Hardware: {hardware}.\n\n" + "\n".join(ablation((8, 16), (1, 4), args.trials, sets)))
        return
    if not args.only_models:
        estimates(args, sets, hardware)
    if args.models:
        stolen = model_rows(args.models, [int(n) for n in args.model_images.split(",")], 1)
        write_csv(stolen, Path(args.models_csv))
        print(models_markdown(stolen, hardware) + f"\n\nwrote {args.models_csv}")


def estimates(args, sets, hardware: str) -> None:
    """The images' table: every method, M, N and trial; CSV, plot, markdown (and the warnings' table)."""
    rows, started = [], time.perf_counter()
    for method in args.methods.split(","):
        for m in map(int, args.block_sizes.split(",")):
            for n in map(int, args.images.split(",")):
                for trial in range(args.trials):
                    rows.append(one(method, m, n, trial, sets, whole if args.resized else crops))
                    r = rows[-1]
                    print(f"{method} M={m} N={n} trial {trial}: key {r['key_fraction']:.3f}, pixels "
                          f"{r['pixels_exact']:.4f}, {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    summary = summarise(rows)
    write_csv(summary, Path(args.csv))
    plot(summary, Path(args.plot), hardware)
    if args.write_table:
        Path(defaults.CIPHERTEXT_ONLY_TABLE).write_text(json.dumps(warning_table(summary, hardware), indent=2) + "\n")
    print(markdown(summary, hardware))
    print(f"\n{len(rows)} estimates in {time.perf_counter() - started:.0f} s; wrote {args.csv}, {args.plot}"
          + (f", {defaults.CIPHERTEXT_ONLY_TABLE}" if args.write_table else ""))


if __name__ == "__main__":
    main()
