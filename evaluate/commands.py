"""``keyshard evaluate`` and ``keyshard report``."""

from __future__ import annotations

from pathlib import Path

import click

from keyshard import options, params, tasks
from keyshard.errors import KeyshardError
from keyshard.evaluate.near_miss import MAX_KEYS_PER_DISTANCE
from keyshard.evaluate.wrong_keys import MAX_COUNT as MAX_WRONG_KEYS

MAX_PREDICTIONS = 64  # evaluate --save-predictions: rows of predictions.png


@click.command("evaluate")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(dir_okay=False),
              help="The model to audit: a checkpoint from `keyshard train` (RUN/best.pt) or `keyshard protect`.")
@click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False),
              help="The key the model was trained with (omit for a model trained on plain images: the baseline).")
@click.option("--test", "test_dir", required=True, type=click.Path(), help="PLAIN shards with a test split (directory or http(s)/s3 URL base).")
@click.option("--wrong-keys", type=click.IntRange(1, MAX_WRONG_KEYS), default=100, show_default=True,
              help="Random wrong keys to score; they are drawn and scored a chunk at a time, so memory "
                   "stays flat whatever the count.")
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of the wrong keys (independent of the key).")
@options.output_option(default=None, type=click.Path(file_okay=False), metavar="DIR",
                       help="Directory for audit.json/.md/.png (default: <checkpoint dir>/audit); it must not "
                            "hold an audit yet.")
@click.option("--batch-size", type=options.BATCH, default=32, show_default=True,
              help="Test images per forward pass.")
@click.option("--workers", type=options.WORKERS, default=2, show_default=True,
              help="DataLoader workers reading the test shards (0: read in this process).")
@click.option("--ignore-fingerprint", is_flag=True, help="Audit even if the key's fingerprint differs (reported).")
@click.option("--randomize-ffx-password", is_flag=True,
              help="FFX: wrong keys also get random passwords (default: keep the password, vary the mask).")
@click.option("--near-miss", type=options.CommaList(click.INT, sort=True), default=None, metavar="D1,D2,...",
              help="Also evaluate keys at these distances from the correct key (e.g. 1,2,4,8,16): "
                   "SHF transpositions, NP/FFX swaps of a selected and an unselected position. Default: none.")
@click.option("--near-miss-keys", "near_miss_count", type=click.IntRange(1, MAX_KEYS_PER_DISTANCE), default=5,
              show_default=True,
              help="Keys per near-miss distance.")
@click.option("--trust", type=click.Path(dir_okay=False), default=None, metavar="NAME.pub",
              help="Public signing key of the test data's publisher: refuse the test shards unless their "
                   "manifest.json.sig verifies. The audit records the result.")
@click.option("--save-predictions", "save_predictions", type=click.IntRange(0, MAX_PREDICTIONS), default=0,
              show_default=True, metavar="N",
              help="Also write predictions.png (the paper's Fig. 5) into the output directory for the first N "
                   "test images: the model's input, ground truth and the predictions with the correct key, plain "
                   "images and one wrong key, each with its per-image mIoU (from the same pass). 0: none.")
@click.option("--ciphertext-only", "ciphertext_only", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="N",
              help="Also estimate the key from the first N test images encrypted with it, and nothing else "
                   "(`attack ciphertext-only`, FFX password unknown), and add what that gives to the audit: "
                   "the share of the key recovered and the model's score with the estimate. 0: none.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@params.names_flags
def evaluate(ckpt, key_file, test_dir, wrong_keys, seed, output, batch_size, workers, ignore_fingerprint,
             randomize_ffx_password, near_miss, near_miss_count, trust, save_predictions, ciphertext_only, quiet):
    """Audit a protected model: its score (segmentation: mIoU; classification: top-1 accuracy)
    with the correct key, plain images and N random wrong keys.

    Keys are scored in chunks (as many compiled keys as fit in 256 MB, at most 128): each pass
    over the test split decodes every batch once and applies that chunk's keys to it on the
    device (GPU when there is one), so memory stays flat whatever --wrong-keys.  Writes
    audit.json, audit.md (a readable table) and audit.png (Fig. 6 style).
    """
    from keyshard.evaluate.audit import run_audit, run_baseline
    from keyshard.evaluate.report import check_audit_dir, markdown, write_audit
    from keyshard.train.checkpoint import dataset_of, load as load_checkpoint

    out = check_audit_dir(output or Path(ckpt).parent / "audit")  # refused before the audit, not after it
    state = load_checkpoint(ckpt)
    plain_model, task = state["data"]["plain"], tasks.for_kind(dataset_of(state)["kind"])
    distances = near_miss or ()  # sorted, without repeats (options.CommaList)
    for flag, given, supported in (("--near-miss", distances, task.near_miss),
                                   ("--save-predictions", save_predictions, task.predictions)):
        if given and not supported:
            raise KeyshardError(f"{flag}: not for {task.name} models")
    capture = None
    if save_predictions:
        from keyshard.evaluate.predictions import Capture

        capture = Capture(save_predictions)
    if plain_model and key_file is None:
        if ciphertext_only:
            raise KeyshardError("--ciphertext-only: a model trained on plain images has no key to estimate")
        audit = run_baseline(ckpt, test_dir, batch_size, workers, progress=not quiet, trust=trust, capture=capture)
    elif key_file is None:
        raise KeyshardError(f"{ckpt}: was trained on keyed shards; give its key with --key")
    else:
        audit = run_audit(ckpt, key_file, test_dir, wrong_keys, seed, batch_size, ignore_fingerprint,
                          randomize_ffx_password, workers, progress=not quiet, near_miss=distances,
                          near_miss_count=near_miss_count, trust=trust, capture=capture,
                          ciphertext_only=ciphertext_only)
    paths = write_audit(audit, out, capture)
    click.echo(markdown(audit).split("<details>")[0].rstrip())
    click.echo("\nwrote " + ", ".join(str(p) for p in paths))


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table as CSV (missing directories are created; an existing file is not replaced).")
def report(runs, csv_path):
    """Collect audits into a Table-1-style table.

    Each argument is an audit.json file or a directory: every audit.json in it or under it is
    included (a run with several audit folders, a folder of runs).
    """
    from keyshard.evaluate.report import find_audits, load_audit, table
    from keyshard.fsutil import check_output, write_output

    if csv_path:
        check_output(csv_path)
    files = {}  # the same file named twice (a run and its audit folder) counts once
    for r in runs:
        for p in find_audits(Path(r)):
            files.setdefault(p.resolve(), p)
    files = list(files.values())
    md, csv_text = table([load_audit(p) for p in files], sources=[str(p) for p in files])
    click.echo(md)
    if csv_path:
        write_output(csv_path, csv_text.encode())
        click.echo(f"wrote {csv_path}")

