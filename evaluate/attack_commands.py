"""``keyshard attack ...``: the attacks an auditor runs against a protected model or its data."""

from __future__ import annotations

import json

import click

from keyshard import options, params
from keyshard.errors import KeyshardError
from keyshard.fsutil import check_output, make_parent, write_output


@click.group("attack")
def attack():
    """Attacks that show where the protection is weak (run them before an adversary does)."""


@attack.command("known-plaintext")
@click.option("--plain", "plain_dir", required=True, type=click.Path(), help="Plain shards (e.g. of public VOC): directory or URL base.")
@click.option("--encrypted", "enc_dir", required=True, type=click.Path(), help="Encrypted shards of the same ids: directory or URL base.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Recovered explicit key file (0600).")
@click.option("--key", "true_key", type=click.Path(dir_okay=False), default=None,
              help="The true key, to report how much of it was recovered (auditors only).")
@params.names_flags
def known_plaintext(plain_dir, enc_dir, output, true_key):
    """Recover the key from plain/encrypted samples of the same ids.

    Method and block size come from the encrypted shards' manifest.  The recovered key is an
    explicit key file: it re-encrypts the plain shards into the encrypted ones exactly, and
    `evaluate --ignore-fingerprint` accepts it.
    """
    from keyshard import keys, methods
    from keyshard.evaluate.known_plaintext import attack as run_attack

    check_output(output)  # before the attack: an existing file, a directory, a read-only place
    key, report, determined = run_attack(plain_dir, enc_dir)
    make_parent(output)
    keys.save(key, output)
    if true_key:
        report.update(methods.get(key.method).compare(key.material, keys.load(true_key).material, determined))
    click.echo(json.dumps(report, indent=2))
    click.echo(f"recovered {key.method} M={key.block_size} key from {report['pairs_needed']} plain/encrypted "
               f"pair(s); it reproduces all {report['reproduced']} encrypted samples; wrote {output}")


@attack.command("ciphertext-only")
@click.option("--encrypted", "enc_dir", required=True, type=click.Path(),
              help="Keyed shards (directory or URL base): the only thing this attacker holds.")
@click.option("--split", default=None, help="Read the keyed samples of this split only (default: every split, "
              "in manifest order; augmented replicas are never read).")
@click.option("--images", "n_images", type=click.IntRange(min=1), default=16, show_default=True,
              help="How many keyed samples the estimate uses (at most 4096).")
@click.option("--prior", "prior_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Build the image prior from your own plain photographs in DIR (never the target's own "
                   "plain images). Default: the shipped prior, from scikit-image's photographs.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Estimated explicit key file (0600).")
@click.option("--key", "true_key", type=click.Path(dir_okay=False), default=None,
              help="The true key (auditors): report how much of it was estimated, how many pixels decrypt "
                   "exactly and the PSNR of the decrypted images.")
@click.option("--checkpoint", "ckpt", type=click.Path(dir_okay=False), default=None,
              help="The stolen model: its score with the estimated key (and the --key's); where there are "
                   "several candidates (NP: masks and their complements; SHF: the six namings of the channels) it "
                   "picks one. Needs --test.")
@click.option("--test", "test_dir", type=click.Path(), default=None,
              help="PLAIN shards with a test split, to score --checkpoint on.")
@click.option("--ffx-password-file", type=click.Path(dir_okay=False), default=None,
              help="FFX: the password is known (the paper's fixed password): read it from this file; only "
                   "the mask is estimated. Default: the password is unknown and the table is estimated too.")
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of the search's random starts.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@params.names_flags
def ciphertext_only(enc_dir, split, n_images, prior_dir, output, true_key, ckpt, test_dir, ffx_password_file,
                    seed, quiet):
    """Estimate the key from keyed images alone: no plain originals, no model needed.

    One key maps every block of every image, so natural-image statistics (an image prior of
    unrelated photographs) estimate it: NP's mask up to its complement, FFX's mask and table,
    SHF's permutation and the names of its channels.  Writes the estimate as an explicit key file, as `attack known-plaintext`
    does; `evaluate --ignore-fingerprint` accepts it.
    """
    from keyshard import keys
    from keyshard.evaluate import ciphertext_only as co

    if (ckpt is None) != (test_dir is None):
        raise KeyshardError("--checkpoint and --test go together (the model is scored on plain test shards)")
    check_output(output)  # before the attack: an existing file, a directory, a read-only place
    password = keys.ffx_password_from(None, ffx_password_file, use_env=False)[0] if ffx_password_file else None
    truth = keys.load(true_key) if true_key else None
    manifest, est, report = co.attack(enc_dir, split, n_images, prior_dir, password, seed, progress=not quiet)
    if len(est.images) < n_images:
        click.echo(f"warning: {enc_dir} holds {len(est.images)} keyed sample(s)"
                   + (f" of split {split!r}" if split else "") + f", not {n_images}: estimated from those", err=True)
    if ckpt is not None:
        report["model"] = co.model_scores(est, ckpt, test_dir, truth, progress=not quiet)
    report["chosen_by"] = est.chosen_by
    if truth is not None:
        report["scores"] = co.score_against(est, truth.material)
    key = est.key()
    make_parent(output)
    keys.save(key, output)
    report["estimated_key_fingerprint"] = key.fingerprint
    click.echo(json.dumps(report, indent=2))  # stdout is the JSON report alone; the summary goes to stderr
    click.echo(f"estimated {est.method} M={est.block_size} key from {len(est.images)} keyed image(s) in "
               f"{est.seconds:.1f} s (candidate chosen by {est.chosen_by}); wrote {output}", err=True)


@attack.command("search")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(dir_okay=False),
              help="The protected (stolen) model whose key is searched for.")
@click.option("--labelled-shards", "labelled_dir", required=True, type=click.Path(),
              help="The attacker's PLAIN labelled shards (directory or URL base).")
@click.option("--labelled-split", type=click.Choice(["holdout", "train"]), default="holdout", show_default=True,
              help="Split the labelled images come from (never the test split).")
@click.option("--labelled", "n_labelled", type=click.IntRange(1, options.MAX_IMAGES), default=16, show_default=True,
              help="How many labelled images the attacker uses.")
@click.option("--test", "test_dir", required=True, type=click.Path(), help="PLAIN shards with a test split (directory or http(s)/s3 URL base).")
@click.option("--key", "true_key", type=click.Path(dir_okay=False), default=None,
              help="The true key (auditors): report distances to it and its rank.")
@click.option("--ffx-password", default=None, help="FFX: the password the attacker knows (default: the --key's). "
              "Visible to ps: prefer --ffx-password-file or $KEYSHARD_FFX_PASSWORD.")
@click.option("--ffx-password-file", type=click.Path(dir_okay=False), default=None,
              help="FFX: read that password from this file (one trailing newline is dropped).")
@click.option("--budget", type=click.IntRange(2, options.MAX_EVALUATIONS), default=2000, show_default=True,
              help="Model evaluations for hill-climbing.")
@click.option("--exhaustive-limit", type=click.IntRange(1, options.MAX_EVALUATIONS), default=5000, show_default=True,
              help="Try every key when there are at most this many.")
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="How many of the best keys found are scored on the test split and reported.")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Seed of the hill-climb (its starting key and its proposals).")
@options.output_option(default=None, type=click.Path(dir_okay=False), metavar="FILE",
                       help="Also write the JSON report to FILE (it is always printed on stdout).")
@params.names_flags
def search_command(ckpt, labelled_dir, labelled_split, n_labelled, test_dir, true_key, ffx_password,
                   ffx_password_file, budget, exhaustive_limit, top, seed, output):
    """Search the key space against the model with a few labelled plain images.

    Exhaustive where the space is small (NP/FFX at M=2: 924 masks), hill-climbing otherwise.
    Reports the best keys, their test mIoU (top-1 accuracy for a classifier) and, with --key, their distance to the true key and
    the true key's rank.
    """
    from keyshard import keys
    from keyshard.evaluate.key_search import run_search

    password, _ = keys.ffx_password_from(ffx_password, ffx_password_file)  # one way only, never echoed
    ffx_password = None if password is None else password.decode("utf-8", "surrogateescape")
    if output:
        check_output(output)  # before the search, not after minutes of it
    report = run_search(ckpt, labelled_dir, labelled_split, n_labelled, test_dir, true_key, ffx_password, budget,
                        exhaustive_limit, top, seed)
    text = json.dumps(report, indent=2)
    if output:
        write_output(output, (text + "\n").encode())
    click.echo(text)


@attack.command("finetune")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(dir_okay=False), help="The protected model.")
@click.option("--plain-train", "train_dir", required=True, type=click.Path(), help="PLAIN shards with a train split (directory or URL base).")
@click.option("--test", "test_dir", required=True, type=click.Path(), help="PLAIN shards with a test split (directory or http(s)/s3 URL base).")
@click.option("--fraction", default="0.01,0.05,0.1", show_default=True,
              help="Comma-separated fractions (0 < F <= 1) of the train ids to use, one experiment each.")
@click.option("--epochs", type=options.EPOCHS, default=10, show_default=True,
              help="Training epochs of both the fine-tuned and the from-scratch model.")
@click.option("--lr", type=options.POSITIVE, default=0.02, show_default=True,
              help="Learning rate of both (SGD, momentum 0.9; > 0).")
@click.option("--batch-size", type=options.BATCH, default=8, show_default=True, help="Images per optimiser step.")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Seed of the chosen subsets, the shuffling and the from-scratch model's weights.")
@options.output_option(default=None, type=click.Path(dir_okay=False), metavar="FILE",
                       help="Also write the report as JSON to FILE (the table is printed either way).")
def finetune_command(ckpt, train_dir, test_dir, fraction, epochs, lr, batch_size, seed, output):
    """Fine-tune the protected model on a little plain data vs. training from scratch on it.

    A stolen model that beats scratch training by a wide margin (> 0.1 mIoU) leaks what it
    learned: the key does not protect it in that setting.
    """
    from keyshard.evaluate.finetune_attack import parse_fractions, run

    if output:
        check_output(output)
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
    if output:
        write_output(output, (json.dumps(report, indent=2) + "\n").encode())
