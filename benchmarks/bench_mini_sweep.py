"""Mini sweep on synthetic VOC data (CPU) and FFX's training-budget curve.

    python benchmarks/bench_mini_sweep.py [--workdir mini-sweep-work] [--budgets 8,16,32,64]
                                          [--assets docs/assets]

1. `keyshard toy-voc WORKDIR/toy --images 240`: 240 synthetic images in the VOC2012 layout.
2. The mini sweep: SHF, NP and FFX at M = 2, 4, 8, 16 on 64×64 images, the demo network,
   8 epochs, 20 wrong keys per audit, one augmentation replica, keys derived from --key-seed 1:

       keyshard sweep --voc WORKDIR/toy -o WORKDIR/sweep --methods shf,np,ffx --block-sizes 2,4,8,16 \\
           --preset demo --image-size 64 --epochs 8 --wrong-keys 20 --augment-copies 1 --key-seed 1 \\
           --workers 1 -j 1

3. The FFX budget curve: the FFX cells again with the same keys (same --key-seed) at each other
   budget in --budgets, each budget in its own sweep directory WORKDIR/ffx-eE (a sweep directory
   records its epochs, and a finished cell is skipped on a rerun, so another budget needs another
   directory). Each of these also trains its own plain baseline at that budget.

Writes into --assets: mini-sweep-table1.csv and mini-sweep-fig6.png (the sweep's table1.csv and
fig6.png), ffx-budget.csv (method, M, epochs, correct/plain/wrong-mean mIoU, and the plain
baseline at the same budget), ffx-budget.png (correct-key mIoU against epochs, one line per M,
with the plain-image and wrong-key levels) and mini-sweep-hardware.json (CPU, cores, torch).
Prints both tables as markdown. Every step is resumable: a rerun skips finished cells.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

SWEEP_ARGS = ["--block-sizes", "2,4,8,16", "--preset", "demo", "--image-size", "64",
              "--wrong-keys", "20", "--augment-copies", "1", "--key-seed", "1", "--workers", "1", "-j", "1"]
MAIN_EPOCHS = 8
BLOCK_SIZES = (2, 4, 8, 16)


def keyshard(*args: str) -> None:
    cmd = ["keyshard", *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def sweep(voc: Path, out: Path, methods: str, epochs: int) -> list[dict]:
    keyshard("sweep", "--voc", str(voc), "-o", str(out), "--methods", methods,
             "--epochs", str(epochs), *SWEEP_ARGS)
    with open(out / "table1.csv", newline="") as f:
        return list(csv.DictReader(f))


def hardware() -> dict:
    import torch

    from cpu import cpu_model

    model = cpu_model()
    return {"cpu": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": None,
            "python": platform.python_version()}


def f3(v: str | float | None) -> str:
    return "—" if v in (None, "") else f"{float(v):.3f}"


def budget_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    colours = dict(zip(BLOCK_SIZES, ("tab:green", "tab:blue", "tab:orange", "tab:purple")))
    for m in BLOCK_SIZES:
        r = sorted((x for x in rows if int(x["block_size"]) == m), key=lambda x: int(x["epochs"]))
        if not r:
            continue
        e = [int(x["epochs"]) for x in r]
        ax.plot(e, [float(x["correct_miou"]) for x in r], "o-", color=colours[m], label=f"FFX M={m}: correct key")
        ax.plot(e, [float(x["plain_miou"]) for x in r], "--", color=colours[m], alpha=0.5, lw=1)
        ax.plot(e, [float(x["wrong_mean_miou"]) for x in r], ":", color=colours[m], alpha=0.5, lw=1)
    base = sorted({(int(x["epochs"]), float(x["baseline_miou"])) for x in rows if x["baseline_miou"]})
    if base:
        ax.plot([b[0] for b in base], [b[1] for b in base], "s-", color="k", alpha=0.6, lw=1,
                label="no key: plain-trained baseline")
    ax.plot([], [], "--", color="grey", label="plain images (per M)")
    ax.plot([], [], ":", color="grey", label="wrong keys, mean (per M)")
    ax.set_xticks(sorted({int(x["epochs"]) for x in rows}))
    ax.set_xlabel("training epochs")
    ax.set_ylabel("test mIoU")
    ax.set_ylim(0, 1)
    ax.set_title("FFX on the mini sweep's data (64×64, demo network): mIoU against training budget", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("mini-sweep-work"))
    ap.add_argument("--budgets", default="8,16,32,64", help="FFX training budgets in epochs (8 is the sweep's own)")
    ap.add_argument("--assets", type=Path, default=Path("docs/assets"))
    args = ap.parse_args()
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    work, assets = args.workdir, args.assets
    work.mkdir(parents=True, exist_ok=True)
    assets.mkdir(parents=True, exist_ok=True)

    toy = work / "toy"
    if not (toy / "VOCdevkit" / "VOC2012").is_dir():
        keyshard("toy-voc", str(toy), "--images", "240")

    main_rows = sweep(toy, work / "sweep", "shf,np,ffx", MAIN_EPOCHS)
    shutil.copyfile(work / "sweep" / "table1.csv", assets / "mini-sweep-table1.csv")
    shutil.copyfile(work / "sweep" / "fig6.png", assets / "mini-sweep-fig6.png")

    by_budget = {MAIN_EPOCHS: main_rows}
    for e in budgets:
        if e != MAIN_EPOCHS:
            by_budget[e] = sweep(toy, work / f"ffx-e{e}", "ffx", e)

    budget_rows = []
    for e in sorted(by_budget):
        base = next((x["plain_miou"] for x in by_budget[e] if x["method"] == "baseline"), "")
        for x in by_budget[e]:
            if x["method"] == "ffx":
                budget_rows.append({"method": "ffx", "block_size": int(x["block_size"]), "epochs": e,
                                    "best_epoch": x["best_epoch"], "correct_miou": x["correct_miou"],
                                    "plain_miou": x["plain_miou"], "wrong_mean_miou": x["wrong_mean_miou"],
                                    "wrong_max_miou": x["wrong_max_miou"], "baseline_miou": base})
    budget_rows.sort(key=lambda x: (x["block_size"], x["epochs"]))
    with open(assets / "ffx-budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(budget_rows[0]))
        w.writeheader()
        w.writerows(budget_rows)
    budget_plot(budget_rows, assets / "ffx-budget.png")
    hw = hardware()
    (assets / "mini-sweep-hardware.json").write_text(json.dumps(hw, indent=2) + "\n")

    print(f"\nhardware: {hw['cores']}-core {hw['machine']} CPU ({hw['cpu']}), torch {hw['torch']}, no GPU\n")
    print("| method | M=2 correct / plain / wrong | M=4 | M=8 | M=16 |")
    print("|---|---|---|---|---|")
    for method in ("shf", "np", "ffx"):
        cells = {int(x["block_size"]): x for x in main_rows if x["method"] == method}
        print(f"| {method.upper()} | " + " | ".join(
            f"{f3(c['correct_miou'])} / {f3(c['plain_miou'])} / {f3(c['wrong_mean_miou'])}"
            for c in (cells[m] for m in BLOCK_SIZES)) + " |")
    base = next(x for x in main_rows if x["method"] == "baseline")
    print(f"| baseline (plain) | {f3(base['plain_miou'])} | | | |\n")
    print("| epochs | " + " | ".join(f"FFX M={m} correct / plain / wrong" for m in BLOCK_SIZES) + " | baseline |")
    print("|---:|" + "---|" * (len(BLOCK_SIZES) + 1))
    for e in sorted(by_budget):
        r = {x["block_size"]: x for x in budget_rows if x["epochs"] == e}
        print(f"| {e} | " + " | ".join(
            f"{f3(r[m]['correct_miou'])} / {f3(r[m]['plain_miou'])} / {f3(r[m]['wrong_mean_miou'])}"
            if m in r else "—" for m in BLOCK_SIZES) + f" | {f3(r[BLOCK_SIZES[0]]['baseline_miou'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
