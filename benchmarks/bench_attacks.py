"""Audit and attack throughput: model evaluations per second, all keys on one decoded batch.

    python benchmarks/bench_attacks.py [--image-size 64] [--labelled 16]

Builds the demo network (untrained weights cost the same), then measures on this machine's
device: (1) `attack search` objective evaluations/s (one candidate key = encrypt the labelled
batch on the device + forward + loss), for NP M=2 (exhaustive over 924 masks) and SHF M=8
(hill-climbing proposals); (2) audit throughput in image-forwards/s for 1 and 21 keys per batch.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", "--size", dest="size", type=int, default=64)  # --size: the old name
    ap.add_argument("--labelled", type=int, default=16)
    ap.add_argument("--evaluations", type=int, default=200)
    args = ap.parse_args()

    from keyshard import keys, methods
    from keyshard.evaluate import wrong_keys
    from keyshard.evaluate.key_search import Objective, exhaustive, hill_climb
    from keyshard.evaluate.metrics import Confusion
    from keyshard.train.models import build_model
    from keyshard.transforms import compile_plan, normalize_pixels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model("small").to(device).eval()
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (args.labelled, args.size, args.size, 3), dtype=np.uint8))
    masks = torch.from_numpy(rng.integers(0, 21, (args.labelled, args.size, args.size)))
    rows = []

    np2 = keys.generate("np", 2)
    obj = Objective(model, pixels, masks, device)
    t = time.perf_counter()
    exhaustive(obj, methods.get("np").exhaustive(np2.material, limit=10_000))
    rows.append(("search NP M=2, exhaustive (924 keys)", obj.evaluations / (time.perf_counter() - t), "keys/s"))

    shf8 = keys.generate("shf", 8)
    obj = Objective(model, pixels, masks, device)
    start = wrong_keys.draw(shf8, 1, 0)[0].material
    t = time.perf_counter()
    hill_climb(obj, start, args.evaluations, 0)
    rows.append(("search SHF M=8, hill-climb", obj.evaluations / (time.perf_counter() - t), "keys/s"))

    batch = pixels.to(device)
    for n_keys in (1, 21):
        plans = [compile_plan(k.material, args.size, args.size).to_torch(device)
                 for k in [np2] + wrong_keys.draw(np2, n_keys - 1, 0)]
        conf = Confusion(device)
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):
                for p in plans:
                    conf.update(model(normalize_pixels(p.encrypt(batch), 255))["out"].argmax(1), masks.to(device))
        rows.append((f"audit, {n_keys} key(s) per decoded batch", 3 * n_keys * len(batch) / (time.perf_counter() - t),
                     "image-forwards/s"))

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; demo network, {args.size}x{args.size}, {args.labelled} labelled images per evaluation\n")
    print("| measurement | rate | unit |")
    print("|---|---:|---|")
    for label, rate, unit in rows:
        print(f"| {label} | {rate:.1f} | {unit} |")


if __name__ == "__main__":
    main()
