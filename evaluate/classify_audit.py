"""The key audit of a classifier: top-1 accuracy with the correct key, plain images and N random
wrong keys, by the segmentation audit's method — each test batch read and decoded once per pass,
every key of the pass applied to it on the device with the offline encryption's compiled plans,
keys scored a chunk at a time (``audit.keys_per_pass_for``) so memory stays flat.

``results.<condition>.top1_acc`` (and ``correct`` / ``images``); ``results.wrong.keys`` one row
per wrong key, ``results.wrong.summary`` mean / std / min / max over them.  Writes audit.json,
audit.md and audit.png like ``evaluate`` does for segmentation.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from keyshard import __version__, keys
from keyshard.errors import KeyshardError
from keyshard.evaluate import wrong_keys
from keyshard.evaluate.audit import _chunks, check_inputs, keys_per_pass_for, plan_nbytes, test_batches
from keyshard.fsutil import sha256_file
from keyshard.pipeline.manifest import library_versions, load_trusted
from keyshard.shardformat import dataset_info
from keyshard.train.checkpoint import load_model
from keyshard.train.data import epoch_plan
from keyshard.train.device import pick_device
from keyshard.transforms import compile_plan, normalize_pixels

METRICS_NOTE = {"top1_acc": "fraction of test images whose highest-scoring class is their label"}


def check_classification(manifest: dict, test_dir, ckpt_path) -> None:
    if dataset_info(manifest)["task"] != "classification":
        raise KeyshardError(f"{test_dir}: holds segmentation data, but {ckpt_path} is a classifier")


def score_classifier(model, configs: list, source, manifest: dict, device, batch_size: int = 32,
                     workers: int = 0, bar=None, split: str = "test") -> list[dict]:
    """Top-1 accuracy of each (torch plan or None, pixel divisor) config, one read of the split."""
    correct = torch.zeros(len(configs), dtype=torch.int64)
    seen = 0
    with torch.no_grad():
        for pixels, labels, ids, n_padding in test_batches(source, manifest, batch_size, workers, split):
            real = len(ids) - n_padding
            pixels, labels = pixels[:real].to(device), labels[:real].to(device)
            for i, (tplan, divisor) in enumerate(configs):
                x = tplan.encrypt(pixels) if tplan is not None else pixels
                pred = model(normalize_pixels(x, divisor))["out"].argmax(1)
                correct[i] += int((pred == labels).sum())
            seen += real
            if bar is not None:
                bar.update(real * len(configs))
    return [{"top1_acc": int(c) / max(seen, 1), "correct": int(c), "images": seen} for c in correct]


def _header(kind, ckpt_path, state, test_dir, manifest, provenance, device) -> dict:
    return {
        "format": "keyshard-audit/1", "kind": kind, "task": "classification",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "keyshard", "version": __version__}, "libraries": library_versions(),
        "checkpoint": {"path": str(ckpt_path), "sha256": sha256_file(Path(ckpt_path)), "epoch": state["epoch"] + 1,
                       "model": state["model_name"], "model_block_size": state.get("model_block_size"),
                       "data": state["data"], "manifest": state.get("manifest")},
        "test": {"path": str(test_dir), "images": epoch_plan(test_dir, manifest, "test", 0, 0, shuffle=False).samples,
                 "source_content_sha256": manifest["source"]["content_sha256"],
                 "class_names": dataset_info(manifest)["class_names"], **provenance},
        "device": str(device), "metrics": METRICS_NOTE,
    }


def run_baseline(ckpt_path, test_dir, batch_size=32, workers=0, progress=True, trust=None) -> dict:
    device = pick_device()
    model, state = load_model(ckpt_path, device)
    manifest, provenance = load_trusted(test_dir, trust)
    check_classification(manifest, test_dir, ckpt_path)
    if not manifest["encryption"]["plain"] or "test" not in manifest["splits"]["counts"]:
        raise KeyshardError(f"{test_dir}: needs plain shards with a test split")
    scores = score_classifier(model, [(None, 255)], test_dir, manifest, device, batch_size, workers)
    return {**_header("baseline", ckpt_path, state, test_dir, manifest, provenance, device), "key": None,
            "results": {"plain": scores[0]}}


def run_audit(ckpt_path, key_path, test_dir, n_wrong=100, seed=0, batch_size=32, ignore_fingerprint=False,
              randomize_password=False, workers=0, progress=True, trust=None, keys_per_pass=None) -> dict:
    from tqdm import tqdm

    device = pick_device()
    model, state = load_model(ckpt_path, device)
    key = keys.load(key_path)
    manifest, provenance = load_trusted(test_dir, trust)
    check_classification(manifest, test_dir, ckpt_path)
    status = check_inputs(state, key, manifest, ckpt_path, key_path, test_dir, ignore_fingerprint)
    size = state["data"]["image_size"]
    wrong = wrong_keys.iter_draw(key, n_wrong, seed, randomize_password)
    correct_plan = compile_plan(key.material, size, size).to_torch(device)
    per_pass = keys_per_pass or keys_per_pass_for(plan_nbytes(correct_plan))
    passes = 1 + math.ceil(max(0, n_wrong - (per_pass - 1)) / per_pass)
    images = epoch_plan(test_dir, manifest, "test", 0, 0, shuffle=False).samples
    bar = tqdm(total=images * (2 + n_wrong), unit="img", desc=f"audit ({2 + n_wrong} keys, {passes} pass(es))",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def compiled(chunk):
        return [(compile_plan(k.material, size, size).to_torch(device), k.material.divisor) for k in chunk]

    rows = []
    chunk = list(itertools.islice(wrong, per_pass - 1))
    configs = [(correct_plan, key.material.divisor), (None, 255)] + compiled(chunk)
    del correct_plan
    scores = score_classifier(model, configs, test_dir, manifest, device, batch_size, workers, bar=bar)
    del configs
    rows += [{"fingerprint": k.fingerprint, **s} for k, s in zip(chunk, scores[2:])]
    for chunk in _chunks(wrong, per_pass):
        configs = compiled(chunk)
        rows += [{"fingerprint": k.fingerprint, **s}
                 for k, s in zip(chunk, score_classifier(model, configs, test_dir, manifest, device, batch_size,
                                                         workers, bar=bar))]
        del configs
    bar.close()
    accs = np.array([r["top1_acc"] for r in rows]) if rows else np.array([np.nan])
    return {
        **_header("key", ckpt_path, state, test_dir, manifest, provenance, device),
        "key": {"fingerprint": key.fingerprint, "method": key.method, "block_size": key.block_size,
                "derivation": key.derivation, "fingerprint_check": status},
        "scoring": {"keys_per_pass": per_pass, "passes": passes},
        "wrong_keys": {"count": len(rows), "seed": seed, "randomize_password": randomize_password,
                       "rule": wrong_keys.rule(key, randomize_password)},
        "results": {"correct": scores[0], "plain": scores[1],
                    "wrong": {"summary": {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                                          "min": float(np.min(accs)), "max": float(np.max(accs))},
                              "keys": rows}},
    }


def markdown(audit: dict) -> str:
    r, c = audit["results"], audit["checkpoint"]
    lines = [f"# Key audit (classification): {c['model']} ({c['path']}, epoch {c['epoch']})", "",
             f"Test: {audit['test']['path']}, {audit['test']['images']} images, "
             f"{len(audit['test']['class_names'])} classes.", ""]
    if audit["kind"] == "baseline":
        return "\n".join(lines + ["| condition | top-1 accuracy |", "|---|---|",
                                  f"| plain images (model trained on plain images) | {r['plain']['top1_acc']:.4f} |"]) + "\n"
    k, s = audit["key"], r["wrong"]["summary"]
    lines += [f"Key: {k['method']} M={k['block_size']}, fingerprint `{k['fingerprint'][:16]}…` ({k['fingerprint_check']}).", "",
              "| condition | top-1 accuracy |", "|---|---|",
              f"| correct key | {r['correct']['top1_acc']:.4f} |",
              f"| plain images (no key) | {r['plain']['top1_acc']:.4f} |",
              f"| {audit['wrong_keys']['count']} wrong keys | {s['mean']:.4f} ± {s['std']:.4f} "
              f"(min {s['min']:.4f}, max {s['max']:.4f}) |", "",
              "<details><summary>every wrong key</summary>", "", "| key | top-1 accuracy |", "|---|---|"]
    lines += [f"| `{x['fingerprint'][:16]}…` | {x['top1_acc']:.4f} |" for x in r["wrong"]["keys"]]
    return "\n".join(lines + ["", "</details>"]) + "\n"


def plot(audit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = audit["results"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if audit["kind"] == "baseline":
        ax.bar([0], [r["plain"]["top1_acc"]], color="#999", width=0.6)
        ax.set_xticks([0], ["plain (baseline)"])
    else:
        wrong = [x["top1_acc"] for x in r["wrong"]["keys"]]
        ax.bar([0, 1], [r["correct"]["top1_acc"], r["plain"]["top1_acc"]], color=["#2a7", "#999"], width=0.6)
        ax.scatter(2 + (np.random.default_rng(0).random(len(wrong)) - 0.5) * 0.4, wrong, s=8, color="#c33")
        ax.set_xticks([0, 1, 2], ["correct key", "plain", f"{len(wrong)} wrong keys"])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"{audit['checkpoint']['model']}: key audit", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_audit(audit: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "audit.json", out / "audit.md", out / "audit.png"]
    paths[0].write_text(json.dumps(audit, indent=2) + "\n")
    paths[1].write_text(markdown(audit))
    plot(audit, paths[2])
    return paths
