"""Keyed prediction: `keyshard predict` end to end against the bare model, and ONNX Runtime against torch.

    python benchmarks/bench_predict.py [--images 32] [--batch 16] [--image-size 256] [--repeats 2]

Builds FCN-ResNet50 (untrained weights cost the same as trained ones) as a checkpoint bound to a
key (SHF M=8 by default), writes --images synthetic photographs of 375–500 px as JPEG files, and
measures in one run on this machine's CPU (and its GPU, when there is one):

1. predict images/s end to end — JPEG files decoded and resized as `encrypt` does, the key
   applied, the model run, logits resized to each photograph's size, argmax, a palette PNG and a
   jsonl line per image: the library path `keyshard predict` runs (`predict_to_dir`), with the
   model already loaded — against the bare model forward on the same number of images, from a
   batch of those photographs decoded, keyed and normalised beforehand;
2. ONNX Runtime (the keyed-input file of `keyshard export`) against torch on the CPU: latency of
   one forward of keyed pixels at batch 1 and at --batch.

Each number is the fastest of --repeats runs (5 × --repeats at batch 1) after one warm-up run;
the two sides of a comparison alternate, so other work on the machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def hardware() -> str:
    import onnxruntime
    from cpu import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"onnxruntime {onnxruntime.__version__}; load average {os.getloadavg()[0]:.1f} at the start")


def make_checkpoint(folder: Path, model_name: str, size: int, method: str, block_size: int):
    """A checkpoint of a freshly initialised model bound to a new key, and the key file."""
    from keyshard import keys
    from keyshard.shardformat import voc_dataset
    from keyshard.train.checkpoint import save
    from keyshard.train.models import build_model

    key = keys.Key(method, block_size, bytes(range(32)))
    keys.save(key, folder / "key.json")
    torch.manual_seed(0)
    model = build_model(model_name, aux_loss=False)
    data = {"dataset": voc_dataset(), "plain": False, "method": key.method, "block_size": key.block_size,
            "key_fingerprint": key.fingerprint, "key_derivation": key.derivation,
            "pixel_divisor": key.material.divisor, "image_size": size, "source_content_sha256": None}
    save(folder / "model.pt", {"model_name": model_name, "model": model.state_dict(), "epoch": 0, "config": {},
                               "data": data})
    return folder / "model.pt", folder / "key.json"


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired(first, second, repeats: int) -> tuple[float, float]:
    """The fastest of ``repeats`` timed runs of each function, in seconds, after one warm-up run
    of each; the two alternate, so a load that comes and goes (other processes on the machine)
    weighs on both alike."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for run, kept in zip((first, second), times):
            start = time.perf_counter()
            run()
            kept.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def predict_against_model(predictor, named, batch: int, workers: int, out: Path, repeats: int):
    """(images/s of the command's path over ``named`` JPEG files, images/s of the bare model on
    the first ``batch`` of them decoded, keyed and normalised, as many images)."""
    from keyshard.evaluate.predict import ImageFiles, file_batches, predict_to_dir
    from keyshard.transforms import normalize_pixels

    files = ImageFiles(named[:batch], predictor.image_size)
    pixels = torch.stack([files[i].pixels for i in range(len(files))]).to(predictor.device)
    x = normalize_pixels(predictor.plan.encrypt(pixels), predictor.divisor)
    runs = iter(range(1_000_000))

    def end_to_end():
        predict_to_dir(predictor, file_batches(named, predictor.image_size, batch, workers),
                       out / f"run{next(runs)}", progress=False)
        synchronize(predictor.device)

    def bare():
        with torch.inference_mode():
            for _ in range(len(named) // batch):
                predictor.model(x)["out"]
        synchronize(predictor.device)

    e2e, model = paired(end_to_end, bare, repeats)
    return len(named) / e2e, (len(named) // batch) * batch / model


def onnx_against_torch(ckpt, predictor, batch: int, repeats: int) -> list[tuple]:
    """(batch, onnxruntime ms, torch ms) at batch 1 and ``batch``, keyed pixels in, on the CPU."""
    import onnxruntime

    from keyshard.evaluate.export import build_model
    from keyshard.methods.onnx_graph import INPUT
    from keyshard.transforms import normalize_pixels

    exported = build_model(ckpt)
    session = onnxruntime.InferenceSession(exported.model.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = np.random.default_rng(0).integers(0, 256, (batch, predictor.image_size, predictor.image_size, 3),
                                              dtype=np.uint8)
    keyed = predictor.plan.plan.encrypt(plain)  # the numpy plan: what a client feeds the file
    rows = []
    for n in (1, batch):
        feed = keyed[:n]

        def torch_run():
            with torch.inference_mode():
                predictor.model(normalize_pixels(torch.from_numpy(feed.astype(np.int32)), predictor.divisor))["out"]

        ort, tor = paired(lambda: session.run(["logits"], {INPUT: feed}), torch_run, repeats if n > 1 else 5 * repeats)
        rows.append((n, 1000 * ort, 1000 * tor))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="JPEG photographs predicted end to end")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes of the end-to-end run (the command's default)")
    ap.add_argument("--model", default="fcn_resnet50")
    ap.add_argument("--method", default="shf")
    ap.add_argument("--block-size", type=int, default=8)
    args = ap.parse_args()

    from keyshard.evaluate.predict import load_predictor
    from keyshard.pipeline.toy_voc import make_toy_voc

    print(f"hardware: {hardware()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        voc = make_toy_voc(tmp / "voc", images=args.images, seed=0, min_side=375, max_side=500, progress=False)
        named = [(p.stem, p) for p in sorted((voc / "JPEGImages").glob("*.jpg"))][:args.images]
        ckpt, key = make_checkpoint(tmp, args.model, args.image_size, args.method, args.block_size)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        rows = []
        for device in devices:
            predictor = load_predictor(ckpt, key, device=device, batch_size=args.batch)
            rows.append((device, *predict_against_model(predictor, named, args.batch, args.workers,
                                                        tmp / f"out-{device.type}", args.repeats)))
        onnx_rows = onnx_against_torch(ckpt, load_predictor(ckpt, key, device="cpu"), args.batch, args.repeats)
    where = f"{args.model} at {args.image_size}², {args.method} M={args.block_size}, {args.images} JPEGs of 375–500 px"
    print(f"{where}\n")
    print("| measurement | device | batch | keyshard | baseline | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for device, e2e, bare in rows:
        print(f"| predict from JPEG files vs bare model forward (images/s) | {device.type} | {args.batch} | "
              f"{e2e:.2f} | {bare:.2f} | {e2e / bare:.2f} |")
    if len(rows) == 1:
        print("| predict from JPEG files vs bare model forward (images/s) | GPU | — | not measured (no CUDA device) | | |")
    for n, ort, tor in onnx_rows:
        print(f"| ONNX Runtime vs torch latency (ms per batch) | cpu | {n} | {ort:.0f} | {tor:.0f} | {ort / tor:.2f} |")


if __name__ == "__main__":
    main()
