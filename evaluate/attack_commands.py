"""``keyshard attack ...``: the attacks an auditor runs against a protected model or its data."""

from __future__ import annotations

import json

import click
import numpy as np

from keyshard.errors import KeyshardError


@click.group("attack")
def attack():
    """Attacks that show where the protection is weak (run them before an adversary does)."""


@attack.command("known-plaintext")
@click.option("--plain", "plain_dir", required=True, type=click.Path(), help="Plain shards (e.g. of public VOC).")
@click.option("--encrypted", "enc_dir", required=True, type=click.Path(), help="Encrypted shards of the same ids.")
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
    from keyshard.evaluate.known_plaintext import matched_pairs, recover_material

    key, report = run_attack(plain_dir, enc_dir)
    keys.save(key, output)
    if true_key:
        truth = keys.load(true_key).material
        _, pairs = matched_pairs(plain_dir, enc_dir)
        material, _, determined = recover_material(key.method, key.block_size, pairs)
        if key.method == "shf":
            report["true_key_equal_where_determined"] = bool(np.array_equal(material.perm[determined], truth.perm[determined]))
        else:
            report["true_mask_equal"] = bool(np.array_equal(material.mask, truth.mask))
        if key.method == "ffx":
            report["true_table_equal_where_known"] = bool(np.array_equal(material.table[determined], truth.table[determined]))
    click.echo(json.dumps(report, indent=2))
    click.echo(f"recovered {key.method} M={key.block_size} key from {report['pairs_needed']} plain/encrypted "
               f"pair(s); it reproduces all {report['reproduced']} encrypted samples; wrote {output}")
