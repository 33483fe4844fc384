"""``keyshard keygen`` and ``keyshard key-info``."""

from __future__ import annotations

import click

from keyshard import keys, methods, options, params
from keyshard.errors import KeyshardError
from keyshard.fsutil import make_parent
from keyshard.methods import defaults


@click.command("keygen")
@click.option("--method", type=options.METHOD, required=True, help=options.method_help())
@click.option("--block-size", "-M", type=click.IntRange(1, keys.MAX_BLOCK_SIZE), required=True,
              help=f"Block size M (e.g. 2, 4, ..., at most {keys.MAX_BLOCK_SIZE}).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Key file to create (mode 0600).")
@click.option("--image-size", type=options.IMAGE_SIZE, default=options.DEFAULT_IMAGE_SIZE, show_default=True,
              help="Image size the key will be used with; M must divide it.")
@click.option("--reference-seed", type=click.IntRange(0, keys.MAX_REFERENCE_SEED), default=None,
              help="Derive the key exactly as the authors' reference code (torch.manual_seed + randperm); "
                   "0 to 2^63-1. Only as strong as the seed.")
@click.option("--ffx-password", default=None,
              help="FFX only: fixed password (the paper used one). Default: derived from the secret. "
                   "Visible to ps and shell history: prefer --ffx-password-file or $KEYSHARD_FFX_PASSWORD.")
@click.option("--ffx-password-file", type=click.Path(dir_okay=False), default=None,
              help="FFX only: read the password from this file (one trailing newline is dropped).")
@click.option("--force", is_flag=True, help="Replace an existing key file (the old key is lost).")
@params.names_flags
def keygen(method, block_size, output, image_size, reference_seed, ffx_password, ffx_password_file, force):
    """Create a new secret key file.

    The file holds 32 random bytes from the OS; the permutation / mask / FFX table are derived
    from them (see `key-info`).  It is written with mode 0600 and never overwritten without --force.
    For --method ffx the password may also come from $KEYSHARD_FFX_PASSWORD (give it one way only).
    Everything is checked and derived before the file is written.
    """
    if image_size % block_size:
        raise KeyshardError(f"--block-size {block_size} does not divide --image-size {image_size}")
    takes_password = methods.get(method).takes_password
    if not takes_password and (ffx_password is not None or ffx_password_file is not None):
        given = "--ffx-password" if ffx_password is not None else "--ffx-password-file"
        raise KeyshardError(f"{given} applies only to {' or '.join('--method ' + m for m in keys.password_methods())}")
    password, source = keys.ffx_password_from(ffx_password, ffx_password_file, use_env=takes_password)
    key = keys.generate(method, block_size, reference_seed, password)
    fingerprint = key.fingerprint  # derive everything now: a failure here must leave no file behind
    make_parent(output)  # missing directories are created, as for every -o
    keys.save(key, output, force=force)
    click.echo(f"wrote {output} (mode 0600): {method} M={block_size}, fingerprint {fingerprint}"
               + (f"; FFX password from {source.split()[0]}" if source else ""))
    for warning in key.describe_warnings():
        click.echo(f"warning: {warning}", err=True)


@click.command("key-info")
@click.argument("key_file", type=click.Path(dir_okay=False))
def key_info(key_file):
    """Show a key's method, block size, fingerprint and key-space size (never the secret)."""
    key = keys.load(key_file)
    method = methods.get(key.method)
    bits = key.keyspace_bits()
    count = key.keyspace_count()
    rows = [
        ("file", key_file),
        ("method", key.method),
        ("block size", f"{key.block_size} (block vector of {key.material.block_len} values)"),
        ("derivation", key.derivation + (f" (seed {key.reference_seed})" if key.reference_seed is not None else "")),
        ("fingerprint", key.fingerprint),
        ("key space", f"2^{bits:.1f}" + (f" = {count} keys" if count is not None else "") + method.keyspace_note),
        *method.describe(key.material),
    ]
    for name, value in rows:
        click.echo(f"{name:12} {value}")
    for warning in key.describe_warnings():  # (keys.load has warned about a readable file mode)
        click.echo(f"warning: {warning}", err=True)
    if (weak := defaults.ciphertext_only_warning(key.method, key.block_size)) is not None:
        click.echo(f"warning: {weak}", err=True)  # the ciphertext-only benchmark's verdict, as encrypt prints it


@click.command("signing-key")
@click.option("--output", "-o", "name", type=click.Path(dir_okay=False), required=True, metavar="NAME",
              help="Private key file to create (mode 0600); the public key goes to NAME.pub.")
def signing_key(name):
    """Create an Ed25519 key pair for signing manifests (separate from any encryption key).

    NAME holds the private key (PEM, mode 0600): the data publisher keeps it and signs with
    `keyshard encrypt ... --sign-with NAME`.  NAME.pub is public: trainers and auditors verify
    with `keyshard verify DIR --public-key NAME.pub` or `train`/`evaluate --trust NAME.pub`.
    An existing NAME or NAME.pub is never overwritten.
    """
    from keyshard import signing

    make_parent(name)
    fp = signing.generate(name)
    click.echo(f"wrote {name} (private, mode 0600) and {signing.public_path(name)} (public); "
               f"signer fingerprint {fp}")
