"""``keyshard attack ...``: the attacks an auditor runs against a protected model or its data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from keyshard.errors import KeyshardError


@click.group("attack")
def attack():
    """Attacks that show where the protection is weak (run them before an adversary does)."""


@attack.command("known-plaintext")
@click.option("--plain", "plain_dir", required=True, type=click.Path(), help="Plain shards (e.g. of public VOC): directory or URL base.")
@click.option("--encrypted", "enc_dir", required=True, type=click.Path(), help="Encrypted shards of the same ids: directory or URL base.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Recovered explicit key file (0600).")
@click.option("--key", "true_key", type=click.Path(dir_okay=False), default=None,
              help="The true key, to report how much of it was recovered (auditors only).")
def known_plaintext(plain_dir, enc_dir, output, true_key):
    """Recover the key from plain/encrypted samples of the same ids.

    Method and block size come from the encrypted shards' manifest.  The recovered key is an
    explicit key file: it re-encrypts the plain shards into the encrypted ones exactly, and
    `evaluate --ignore-fingerprint` accepts it.
    """
    from keyshard import keys
    from keyshard.evaluate.known_plaintext import attack as run_attack

    key, report, determined = run_attack(plain_dir, enc_dir)
    keys.save(key, output)
    if true_key:
        truth = keys.load(true_key).material
        material = key.material
        if key.method == "shf":
            report["true_key_equal_where_determined"] = bool(np.array_equal(material.perm[determined], truth.perm[determined]))
        else:
            report["true_mask_equal"] = bool(np.array_equal(material.mask, truth.mask))
        if key.method == "ffx":
            report["true_table_equal_where_known"] = bool(np.array_equal(material.table[determined], truth.table[determined]))
    click.echo(json.dumps(report, indent=2))
    click.echo(f"recovered {key.method} M={key.block_size} key from {report['pairs_needed']} plain/encrypted "
               f"pair(s); it reproduces all {report['reproduced']} encrypted samples; wrote {output}")


@attack.command("search")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(dir_okay=False))
@click.option("--labelled-shards", "labelled_dir", required=True, type=click.Path(),
              help="The attacker's PLAIN labelled shards (directory or URL base).")
@click.option("--labelled-split", type=click.Choice(["holdout", "train"]), default="holdout", show_default=True,
              help="Split the labelled images come from (never the test split).")
@click.option("--labelled", "n_labelled", type=click.IntRange(min=1), default=16, show_default=True,
              help="How many labelled images the attacker uses.")
@click.option("--test", "test_dir", required=True, type=click.Path(), help="PLAIN shards with a test split (directory or http(s)/s3 URL base).")
@click.option("--key", "true_key", type=click.Path(dir_okay=False), default=None,
              help="The true key (auditors): report distances to it and its rank.")
@click.option("--ffx-password", default=None, help="FFX: the password the attacker knows (default: the --key's).")
@click.option("--budget", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Model evaluations for hill-climbing.")
@click.option("--exhaustive-limit", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Try every key when there are at most this many.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
def search_command(ckpt, labelled_dir, labelled_split, n_labelled, test_dir, true_key, ffx_password, budget,
                   exhaustive_limit, top, seed, out_path):
    """Search the key space against the model with a few labelled plain images.

    Exhaustive where the space is small (NP/FFX at M=2: 924 masks), hill-climbing otherwise.
    Reports the best keys, their test mIoU and, with --key, their distance to the true key and
    the true key's rank.
    """
    from tqdm import tqdm

    from keyshard import keys
    from keyshard.evaluate import wrong_keys
    from keyshard.evaluate.audit import score_on_split, test_batches
    from keyshard.train.checkpoint import load_model
    from keyshard.evaluate.key_search import Objective, search
    from keyshard.evaluate.near_miss import distance
    from keyshard.pipeline.manifest import load as load_manifest
    from keyshard.train.device import pick_device
    from keyshard.transforms import compile_plan

    if out_path and Path(out_path).exists():  # before the search, not after minutes of it
        raise KeyshardError(f"{out_path}: already exists; refusing to overwrite")
    device = pick_device()
    model, state = load_model(ckpt, device)
    data = state["data"]
    if data["plain"]:
        raise KeyshardError(f"{ckpt}: was trained on plain images; there is no key to search for")
    labelled_doc, test_doc = load_manifest(labelled_dir), load_manifest(test_dir)
    for d, doc in ((labelled_dir, labelled_doc), (test_dir, test_doc)):
        if not doc["encryption"]["plain"]:
            raise KeyshardError(f"{d}: must hold plain shards")
        if doc["image"]["height"] != data["image_size"]:
            raise KeyshardError(f"{d}: images are {doc['image']['height']}px, the model's {data['image_size']}px")
    method, m = data["method"], data["block_size"]
    truth = keys.load(true_key) if true_key else None
    if truth is not None and (truth.method, truth.block_size) != (method, m):
        raise KeyshardError(f"{true_key}: is {truth.method} M={truth.block_size}, the model {method} M={m}")
    table = None
    if method == "ffx":
        if ffx_password is None and truth is None:
            raise KeyshardError("FFX search needs the password the attacker knows: --ffx-password (or --key)")
        table = keys.ffx_table(ffx_password.encode()) if ffx_password else truth.material.table
    # the first N labelled images
    pixels, masks, _, _ = next(iter(test_batches(labelled_dir, labelled_doc, n_labelled, split=labelled_split)))
    objective = Objective(model, pixels, masks, device)
    # a random start with the model's derivation rule (wrong_keys draws exactly those)
    template = truth or keys.Key(method, m, b"\0" * 32,
                                 reference_seed=0 if str(data["key_derivation"]).startswith("reference") else None,
                                 ffx_password=ffx_password.encode() if ffx_password else None)
    start = wrong_keys.draw(template, 1, seed)[0].material
    if table is not None:
        start = keys.KeyMaterial(method, m, mask=start.mask, table=table)
    bar = tqdm(unit="key", desc="search", file=sys.stderr)
    mode, ranked = search(objective, method, m, data["key_derivation"], table, budget, exhaustive_limit, start,
                          seed, progress=bar.update)
    bar.close()
    best = ranked[:top]
    size = data["image_size"]
    scores = score_on_split(model, [(compile_plan(mat, size, size).to_torch(device), mat.divisor) for _, mat in best],
                            test_dir, test_doc, device, progress=False)
    report = {"mode": mode, "method": method, "block_size": m, "labelled_images": int(objective.pixels.shape[0]),
              "evaluations": objective.evaluations,
              "best": [{"labelled_loss": round(loss, 6), "test_miou": s["miou"]} for (loss, _), s in zip(best, scores)]}
    if truth is not None:
        correct = truth.material
        for entry, (_, mat) in zip(report["best"], best):
            entry["distance_to_true_key"] = distance(mat, correct)
        true_loss = objective(correct)
        report["true_key_labelled_loss"] = round(true_loss, 6)
        report["true_key_rank"] = 1 + sum(1 for loss, _ in ranked if loss < true_loss)
        report["true_key_found"] = any(mat.equals(correct) for _, mat in best)
    text = json.dumps(report, indent=2)
    if out_path:
        Path(out_path).write_text(text + "\n")
    click.echo(text)


@attack.command("finetune")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(dir_okay=False), help="The protected model.")
@click.option("--plain-train", "train_dir", required=True, type=click.Path(), help="PLAIN shards with a train split (directory or URL base).")
@click.option("--test", "test_dir", required=True, type=click.Path(), help="PLAIN shards with a test split (directory or http(s)/s3 URL base).")
@click.option("--fraction", default="0.01,0.05,0.1", show_default=True, help="Fractions of the train ids to use.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=0.02, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
def finetune_command(ckpt, train_dir, test_dir, fraction, epochs, lr, batch_size, seed, out_path):
    """Fine-tune the protected model on a little plain data vs. training from scratch on it.

    A stolen model that beats scratch training by a wide margin (> 0.1 mIoU) leaks what it
    learned: the key does not protect it in that setting.
    """
    from keyshard.evaluate.finetune_attack import parse_fractions, run

    if out_path and Path(out_path).exists():
        raise KeyshardError(f"{out_path}: already exists; refusing to overwrite")
    report = run(ckpt, train_dir, test_dir, parse_fractions(fraction), epochs, lr, batch_size, seed)
    click.echo(f"\nprotected model on plain test images, before any fine-tuning: {report['plain_miou_before']:.4f} mIoU\n")
    click.echo("| fraction | images | fine-tuned stolen model | from scratch | head start |")
    click.echo("|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        click.echo(f"| {r['fraction']:g} | {r['images']} | {r['finetuned_miou']:.4f} | {r['scratch_miou']:.4f} | "
                   f"{r['head_start']:+.4f}{' WEAK' if r['weak'] else ''} |")
    if any(r["weak"] for r in report["rows"]):
        click.echo("\nWEAK: with a little plain data the stolen model beats training from scratch by more than "
                   "0.1 mIoU — its weights carry usable knowledge without the key.")
    if out_path:
        Path(out_path).write_text(json.dumps(report, indent=2) + "\n")
