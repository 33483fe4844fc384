"""Training on a GPU against the loader that feeds it: which one limits?  (issue 10)

    python benchmarks/bench_gpu.py [--images 6000] [--workers 0,2,4,8,12] [--epochs 2]

1. **Shards.**  ``--images`` toy-VOC drawings (``keyshard toy-voc``'s generator, one process per
   core), encrypted at ``--image-size`` with an FFX and an NP M=16 key into train/holdout/test shards.
2. **Model alone** — the ceiling the GPU puts on training: FCN-ResNet50 with the paper preset
   (global batch 256 in micro-batches of 32, SGD lr 0.1, momentum 0.9, weight decay 0.005, AMP,
   channels_last) on one batch already on the device, three ways: keyshard's ``train_step`` as
   ``train`` runs it, the same with ``torch.backends.cudnn.benchmark``, and a bare loop with no
   loss read back per micro-batch (how much keyshard's bookkeeping costs).
3. **Loader alone** — the ceiling this machine's cores put on it: ``keyshard.open_shards`` (train
   split, batch 256, shuffle buffer 256, verification on), each batch copied to the device and
   normalised there (``keyshard.model_input``), per worker count.
4. **Together** — the loader feeding ``train_step``, per worker count: the training rate with
   the slot copy on the caller's thread (as before ``train/copy_ahead.py``) and ahead on its
   thread (keyshard), and which of (2) and (3) limits it.
5. **The command** — ``keyshard train --preset paper --amp --channels-last`` for ``--cli-epochs``
   epochs at the worker count that trained fastest in (4), its own samples/s per epoch.

Every rate is samples (images) per second over ``--epochs`` timed epochs after one warm-up
epoch (worker start-up, cuDNN's algorithm search).  On a machine without CUDA it runs on the CPU
(``--model small --image-size 64 --images 200`` for a dry run); its numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BLOCK = 16


def make_voc(work: Path, images: int, jobs: int) -> Path:
    """One VOC layout of ``images`` toy drawings, made in ``jobs`` processes (parts with their own
    seeds, their ids renamed apart) — the generator is single-threaded and the lease is short."""
    from joblib import Parallel, delayed
    from keyshard.pipeline.toy_voc import make_toy_voc

    warnings.filterwarnings("ignore", message="A worker stopped")  # loky's idle workers timing out
    parts = max(1, min(jobs, images // 20))
    sizes = [images // parts + (i < images % parts) for i in range(parts)]
    Parallel(n_jobs=parts)(delayed(make_toy_voc)(work / f"part{i}", images=n, seed=i, min_side=375, max_side=500,
                                                 progress=False) for i, n in enumerate(sizes))
    root = work / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(parts):
        part = work / f"part{i}" / "VOCdevkit" / "VOC2012"
        for split, ids in lists.items():
            for voc_id in (part / "ImageSets/Segmentation" / f"{split}.txt").read_text().split():
                new = f"{voc_id[:5]}{i:02d}{voc_id[7:]}"  # 2007_000123 -> 2007_<part>0123
                (part / "JPEGImages" / f"{voc_id}.jpg").rename(root / "JPEGImages" / f"{new}.jpg")
                (part / "SegmentationClass" / f"{voc_id}.png").rename(root / "SegmentationClass" / f"{new}.png")
                ids.append(new)
    for split, ids in lists.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in sorted(ids)))
    return work / "voc"


def make_shards(work: Path, images: int, size: int, methods: list[str], jobs: int) -> dict[str, str]:
    from keyshard.pipeline import encrypt_job

    from keyshard import keys

    voc = make_voc(work, images, jobs)
    out = {}
    for m in methods:
        out[m] = str(work / f"shards-{m}")
        encrypt_job.run(str(voc), out[m], keys.generate(m, BLOCK), encrypt_job.EncryptOptions(size=size),
                        jobs=jobs, progress=False)
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class Recipe:
    """The paper preset's model and optimiser, and one keyshard training step on stored pixels."""

    def __init__(self, manifest: dict, device, model_name: str, amp: bool, channels_last: bool):
        import torch
        from keyshard.train.loop import TrainConfig
        from keyshard.train.models import build_model

        cfg = TrainConfig.from_preset("paper", model=model_name, amp=amp, channels_last=channels_last)
        self.cfg, self.manifest, self.device = cfg, manifest, device
        torch.manual_seed(0)
        self.model = build_model(cfg.model, aux_loss=False).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def forward(self, pixels):
        from keyshard.train.step import forward_stored

        return forward_stored(self.model, pixels, self.manifest, self.device, self.cfg.channels_last, self.amp)

    def step(self, pixels, masks, n_pad: int) -> None:
        """As ``train`` does it (``train_step``: micro-batches, valid-pixel count, loss read back)."""
        from keyshard.train.step import train_step

        train_step(self.model, self.opt, self.scaler, self.forward, pixels, masks, n_pad, self.cfg.micro_batch, 1)

    def bare_step(self, pixels, masks) -> None:
        """The same arithmetic with nothing read back to the host (a mean loss, no valid-pixel count)."""
        import torch

        self.opt.zero_grad(set_to_none=True)
        masks = masks.to(self.device, non_blocking=True).long()
        n = self.cfg.micro_batch
        for i in range(0, len(pixels), n):
            out = self.forward(pixels[i:i + n])
            loss = torch.nn.functional.cross_entropy(out["out"].float(), masks[i:i + n], ignore_index=255)
            self.scaler.scale(loss * (min(n, len(pixels) - i) / len(pixels))).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


def model_alone(recipe: Recipe, pixels, masks, steps: int, bare: bool) -> float:
    """Images/s of training steps on one batch already on the device."""
    pixels, masks = pixels.to(recipe.device), masks.to(recipe.device)
    run = (lambda: recipe.bare_step(pixels, masks)) if bare else (lambda: recipe.step(pixels, masks, 0))
    for _ in range(3):  # warm-up: cuDNN algorithm search, allocator
        run()
    sync(recipe.device)
    t = time.perf_counter()
    for _ in range(steps):
        run()
    sync(recipe.device)
    return steps * len(pixels) / (time.perf_counter() - t)


class _Inline:
    """The slot copy on the caller's thread, as before ``train/copy_ahead.py`` (for comparison)."""

    def __init__(self, items, depth: int = 1):
        self._items = items

    def __iter__(self):
        return iter(self._items)

    def join(self) -> None:
        pass


def timed_epochs(loader, epochs: int, per_batch, device) -> tuple[float, int]:
    """One warm-up epoch, then ``epochs`` timed ones; (samples/s, samples per epoch)."""
    rate, n = 0.0, 0
    for e in range(epochs + 1):
        loader.set_epoch(e)
        sync(device)
        t, n = time.perf_counter(), 0
        for pixels, masks, _, n_pad in loader:
            per_batch(pixels, masks, n_pad)
            n += len(pixels) - n_pad
        sync(device)
        if e:
            rate += n / (time.perf_counter() - t) / epochs
    return rate, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    default_workers = ",".join(str(w) for w in (0, 2, 4, 8, 12) if w <= cores)
    ap.add_argument("--images", type=int, default=6000, help="toy-VOC images (half train+holdout, half test)")
    ap.add_argument("--image-size", "--size", dest="size", type=int, default=256)  # --size: the old name
    ap.add_argument("--methods", default="ffx,np")
    ap.add_argument("--workers", default=default_workers, help=f"DataLoader worker counts (default {default_workers})")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement (after 1 warm-up)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of the model alone")
    ap.add_argument("--model", default="fcn_resnet50")
    ap.add_argument("--cli-epochs", type=int, default=2, help="epochs of the `keyshard train` run (0 = skip)")
    ap.add_argument("--keep", default=None, help="make the shards in this new directory and keep them")
    args = ap.parse_args()

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none (CPU: numbers mean nothing)"
    print(f"machine: {platform.machine()}, {cores} cores, GPU {gpu}, python {platform.python_version()}, "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="keyshard-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work, device)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, device) -> None:
    import torch

    import keyshard

    cores = os.cpu_count() or 1
    worker_counts = [int(w) for w in args.workers.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    t = time.perf_counter()
    dirs = make_shards(work, args.images, args.size, methods, jobs=cores)
    manifests = {m: keyshard.read_manifest(d) for m, d in dirs.items()}
    train_n = manifests[methods[0]].splits.counts["train"]
    print(f"shards: {args.images} toy-VOC images -> {args.size}x{args.size}, train split {train_n} samples, "
          + ", ".join(f"{m.upper()} M={BLOCK}" for m in methods) + f"; made in {time.perf_counter() - t:.0f} s",
          flush=True)

    # 2. the model alone, on one stored batch
    first = keyshard.open_shards(dirs[methods[0]], "train", batch_size=256, workers=0)
    pixels, masks, _, _ = next(iter(first))
    rows = []
    for label, bench, bare in (("train_step (as `train` runs it)", False, False),
                               ("train_step + cudnn.benchmark", True, False),
                               ("bare loop + cudnn.benchmark (nothing read back)", True, True)):
        torch.backends.cudnn.benchmark = bench
        recipe = Recipe(manifests[methods[0]], device, args.model, amp=True, channels_last=True)
        rows.append((label, model_alone(recipe, pixels, masks, args.steps, bare)))
        print(f"model alone, {label}: {rows[-1][1]:.0f} images/s", file=sys.stderr, flush=True)
    print(f"\nmodel alone: {args.model}, paper preset (batch {len(pixels)}, micro-batch 32, AMP, channels_last), "
          f"{args.steps} steps after 3 warm-up\n")
    print(f"| {'step':<48} | images/s |\n|{'-' * 50}|---------:|")
    for label, rate in rows:
        print(f"| {label:<48} | {rate:8.0f} |")
    model_rate = rows[0][1]
    torch.backends.cudnn.benchmark = False  # as `train` runs (two runs on an H200: +3 % and -3 % with it)

    # 3 and 4. the loader alone, then feeding the model, with the slot copy on the caller's thread
    # (as before train/copy_ahead.py) and on the copy-ahead thread
    import keyshard.train.data as data_mod
    from keyshard.train.copy_ahead import CopyAhead

    table = []
    for m in methods:
        manifest = manifests[m]
        recipe = Recipe(manifest, device, args.model, amp=True, channels_last=True)
        for w in worker_counts:
            def copy_in(pixels, masks, _n_pad, manifest=manifest):
                keyshard.model_input(pixels, manifest, device)
                masks.to(device, non_blocking=True)

            rates = []
            try:
                for ahead in (CopyAhead, _Inline, CopyAhead):
                    data_mod.CopyAhead = ahead
                    feed = keyshard.open_shards(dirs[m], "train", batch_size=256, workers=w, manifest=manifest)
                    rates.append(timed_epochs(feed, args.epochs, copy_in if not rates else recipe.step, device)[0])
                    del feed
            finally:
                data_mod.CopyAhead = CopyAhead
            table.append((m, w, *rates))
            print(f"{m} workers={w}: loader alone {rates[0]:.0f}, training {rates[1]:.0f} (copy on the caller's "
                  f"thread), {rates[2]:.0f} (copy ahead) images/s", file=sys.stderr, flush=True)
    n = manifests[methods[0]].splits.counts["train"]
    print(f"\nloader (open_shards, train split {n} samples, batch 256, shuffle buffer 256, verification on, "
          f"copied to the device) and training fed by it; {args.epochs} epochs after a warm-up; model alone "
          f"{model_rate:.0f} images/s (as `train` runs it)\n")
    print("| method | workers | loader alone | training, copy on the caller's thread | training, copy ahead "
          "| copy ahead / model alone | limited by |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for m, w, alone, inline, ahead in table:
        limit = ("loader" if alone < 1.05 * model_rate else "GPU" if ahead >= 0.95 * model_rate
                 else "the hand-over (neither alone)")
        print(f"| {m.upper()} | {w} | {alone:.0f} | {inline:.0f} | {ahead:.0f} | {ahead / model_rate:.2f} | {limit} |")

    # 5. the command itself
    if args.cli_epochs:
        m = methods[0]
        w = max((row for row in table if row[0] == m), key=lambda row: row[4])[1]  # the fastest training
        cmd = [sys.executable, "-m", "keyshard.cli", "train", "--shards", dirs[m], "--output", str(work / "run"),
               "--preset", "paper", "--epochs", str(args.cli_epochs), "--workers", str(w), "--amp",
               "--channels-last"]
        if args.model != "fcn_resnet50":
            cmd += ["--model", args.model]
        print(f"\n$ keyshard {' '.join(cmd[3:])}", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=work)  # not a source tree
        lines = [ln for ln in res.stdout.splitlines() + res.stderr.splitlines()
                 if re.search(r"samples/s|rror|warning", ln)]
        print("\n".join(lines[-2 * args.cli_epochs - 4:]) or res.stderr[-2000:])
        print(f"(exit {res.returncode})")


if __name__ == "__main__":
    main()
