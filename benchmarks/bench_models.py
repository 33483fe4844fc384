"""Training and evaluation throughput of the block-aligned model vs FCN-ResNet50 at 256×256.

    python benchmarks/bench_models.py [--image-size 256] [--batch 4] [--steps 3]

Runs on the GPU when there is one, else the CPU; random inputs (throughput does not depend on
content); one warm-up step, then the mean over --steps.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def rate(model, x, y, train: bool, steps: int) -> float:
    from keyshard.train.step import segmentation_loss

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train(train)

    def step():
        if train:
            loss = segmentation_loss(model(x), y, 0.5) / y.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)["out"].argmax(1)
        if x.is_cuda:
            torch.cuda.synchronize()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", "--size", dest="size", type=int, default=256)  # --size: the old name
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    from keyshard.train.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 21, (args.batch, args.size, args.size), device=device)
    rows = []
    for name, m in [("fcn_resnet50", None), ("block_aligned", 2), ("block_aligned", 8), ("block_aligned", 32),
                    ("small", None)]:
        torch.manual_seed(0)
        model = build_model(name, aux_loss=True, block_size=m).to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((name + (f" M={m}" if m else ""), params, rate(model, x, y, True, args.steps),
                     rate(model, x, y, False, args.steps)))
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev}; {args.size}x{args.size}, batch {args.batch}, torch {torch.__version__}\n")
    print("| model | parameters (M) | train images/s | eval images/s |")
    print("|---|---:|---:|---:|")
    for name, params, tr, ev in rows:
        print(f"| {name} | {params:.1f} | {tr:.2f} | {ev:.2f} |")


if __name__ == "__main__":
    main()
