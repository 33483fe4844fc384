"""``keyshard preview``: the paper's Fig. 4 — one image under each method × block size.

``--voc SRC --id ID``: the sample is read with the pipeline's VOC reader and ``prepare``d exactly
as ``encrypt`` does (decode, RGB, antialiased bilinear resize to ``--image-size``), then encrypted
with a fresh key per (method, M) — or keys derived from ``--key-seed`` for repeatable pictures —
through the same compiled plans as the shards.  Rows are methods, columns block sizes, plus the
plain image.  ``--shards DIR --id ID --key KEY``: the stored encrypted sample beside its
decryption.  FFX codes (0..999) are scaled to 0–255 for display only: ``round(v / max(table) ×
255)``, the model's own scaling times 255.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import click
import numpy as np

from keyshard import keys, methods, options, params, seeded
from keyshard.errors import KeyshardError
from keyshard.manifest import Manifest

PAPER_BLOCK_SIZES = (2, 4, 8, 16, 256)  # Fig. 4's columns (256 = the whole 256² image)


def preview_secret(key_seed: int, method: str, block_size: int) -> bytes:
    """The secret of the preview key for (method, M) under ``--key-seed``: public, for pictures only."""
    return seeded.public_secret("preview-key", key_seed, method, block_size)


def preview_key(method: str, block_size: int, key_seed: int | None = None) -> keys.Key:
    """A fresh key (OS CSPRNG), or with ``key_seed`` the repeatable one of ``preview_secret``."""
    secret = secrets.token_bytes(32) if key_seed is None else preview_secret(key_seed, method, block_size)
    return keys.Key(method, block_size, secret)


def default_block_sizes(size: int) -> tuple[int, ...]:
    """The paper's 2, 4, 8, 16 and the whole image, those that divide ``size``."""
    return tuple(m for m in dict.fromkeys((2, 4, 8, 16, size)) if size % m == 0 and m <= keys.MAX_BLOCK_SIZE)


@dataclass
class Tile:
    method: str
    block_size: int
    key: keys.Key
    encrypted: np.ndarray  # H×W×3 as stored: uint8, or uint16 codes for FFX
    display: np.ndarray    # H×W×3 uint8 as drawn


def caption(divisor: int) -> str | None:
    """What a tile's caption says about display scaling: nothing for 0..255 pixels."""
    return None if divisor == 255 else f"codes / {divisor} * 255"


def display_image(encrypted: np.ndarray, divisor: int) -> np.ndarray:
    """Stored pixels → the uint8 picture drawn (FFX codes scaled by 255 / max(table))."""
    from keyshard.figures import display_pixels

    return display_pixels(encrypted, divisor)


def encrypt_tiles(image: np.ndarray, methods, block_sizes, key_seed: int | None = None) -> list[Tile]:
    """``image`` (H×W×3 uint8) under every method × block size, rows = methods, in that order."""
    from keyshard.transforms import compile_plan

    h, w = image.shape[:2]
    bad = [m for m in block_sizes if h % m or w % m]
    if bad:
        raise KeyshardError(f"`block_sizes`: {', '.join(map(str, bad))} do(es) not divide the image size {h}x{w}")
    tiles = []
    for method in methods:
        for m in block_sizes:
            key = preview_key(method, m, key_seed)
            enc = compile_plan(key.material, h, w).encrypt(image)
            tiles.append(Tile(method, m, key, enc, display_image(enc, key.material.divisor)))
    return tiles


def read_voc_sample(src, voc_id: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample of a VOC source (directory or tar), ``prepare``d at ``size``: (image, mask)."""
    from keyshard.pipeline.samples import BadSample, prepare
    from keyshard.pipeline.voc import SPLIT_DIR, VocSource

    source = VocSource.open(src)
    listed = None
    for split in ("train", "val"):
        try:
            if voc_id in source.split_ids(split):
                listed = f"{split}.txt"
                break
        except KeyshardError:
            continue  # a missing split file: the id may be in the other one
    if listed is None:
        raise KeyshardError(f"{src}: id {voc_id!r} is in neither {SPLIT_DIR}/train.txt nor val.txt")
    ref = source.ref(voc_id, listed)
    try:
        image, mask, _ = prepare(ref.image.read(), ref.mask.read(), size, ref.image.label, ref.mask.label)
    except BadSample as exc:
        raise KeyshardError(str(exc)) from None
    return image, mask


def voc_grid(image: np.ndarray, tiles: list[Tile], methods, block_sizes, title: str) -> bytes:
    """Fig. 4 as PNG bytes: a row per method, a column per block size, the plain image first."""
    from keyshard.figures import grid_png

    by = {(t.method, t.block_size): t for t in tiles}
    rows = []
    for i, method in enumerate(methods):
        row = [(image, None) if i == 0 else None]
        for m in block_sizes:
            t = by[(method, m)]
            row.append((t.display, caption(t.key.material.divisor)))
        rows.append(row)
    return grid_png(rows, col_labels=["plain image"] + [f"M = {m}" for m in block_sizes],
                    row_labels=[m.upper() for m in methods], title=title)


def read_shard_sample(shards, voc_id: str, key: keys.Key, key_path) -> tuple[np.ndarray, Manifest, str]:
    """The stored (encrypted) pixels of one sample, its manifest and the shard it came from."""
    from keyshard import sources
    from keyshard.manifest import read
    from keyshard.shardformat import decode_npy, sample_key, stream_shard

    manifest = read(shards)
    if manifest.encryption.plain:
        raise KeyshardError(f"{shards}: holds plain shards; nothing to decrypt (preview a `voc` source instead)")
    if key.fingerprint != manifest.encryption.key_fingerprint:
        raise KeyshardError(f"{key_path}: fingerprint does not match {shards}/manifest.json (another key)")
    wanted = sample_key(voc_id)
    for shard in manifest.shards:
        location = sources.join(shards, shard.file)
        for name, files in stream_shard(location, shard.entry()):
            if name == wanted:
                try:
                    return decode_npy(files["img.npy"]), manifest, location
                except (KeyError, ValueError) as exc:
                    raise KeyshardError(f"{location}: sample {wanted!r}: unreadable image ({exc})") from None
    raise KeyshardError(f"{shards}: no sample {wanted!r}")


def shard_grid(shards, voc_id: str, key_path) -> bytes:
    """The stored encrypted sample and its decryption, side by side, as PNG bytes."""
    from keyshard.figures import grid_png
    from keyshard.transforms import compile_plan

    key = keys.load(key_path)
    stored, _, location = read_shard_sample(shards, voc_id, key, key_path)
    if stored.ndim != 3 or stored.shape[2] != 3:
        raise KeyshardError(f"{location}: sample {voc_id!r}: not an H×W×3 image (shape {stored.shape})")
    try:
        plain = compile_plan(key.material, stored.shape[0], stored.shape[1]).decrypt(stored)
    except ValueError as exc:  # codes no key could produce, another dtype: damaged data
        raise KeyshardError(f"{location}: sample {voc_id!r}: {exc}") from None
    divisor = key.material.divisor
    title = f"{voc_id}: {key.method.upper()} M={key.block_size}, key {key.fingerprint[:12]}..."
    return grid_png([[(display_image(stored, divisor), caption(divisor)), (plain, None)]],
                    col_labels=["stored (encrypted)", "decrypted with --key"], title=title)


@click.command("preview", short_help="Picture what encryption does to a sample (the paper's Fig. 4).")
@click.option("--voc", "voc", type=click.Path(), default=None,
              help="VOCdevkit/VOC2012 (or a folder above it), or the official VOC tar: encrypt one sample "
                   "with every method and block size (the paper's Fig. 4).")
@click.option("--shards", type=click.Path(), default=None,
              help="Encrypted shards (directory or URL base): show a stored sample and its decryption with --key.")
@click.option("--id", "voc_id", required=True, help="The sample's VOC id, e.g. 2007_000032.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None, help="With --shards: the shards' key.")
@click.option("--methods", "method_names", type=options.METHOD_LIST, default=None,
              help="With --voc: methods, one row each  [default: every registered method]")
@click.option("--block-sizes", type=options.CommaList(options.BLOCK_SIZE), default=None,
              help="With --voc: block sizes, one column each; each must divide --image-size  "
                   "[default: 2,4,8,16 and the image size, those that divide it]")
@click.option("--image-size", type=options.IMAGE_SIZE, default=None,
              help="With --voc: resize to this size as encrypt --image-size does  [default: 256]")
@click.option("--key-seed", type=options.SEED, default=None,
              help="With --voc: derive the keys from this number (repeatable pictures; such keys are public) "
                   "instead of fresh random ones.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@params.names_flags
def preview(voc, shards, voc_id, key_file, method_names, block_sizes, image_size, key_seed, output):
    """Picture one sample encrypted: --voc SRC --id ID (every method x block size, the paper's
    Fig. 4) or --shards DIR --id ID --key KEY (a stored sample and its decryption).

    FFX codes are scaled to 0-255 for display only (v / max(table) x 255).
    """
    from keyshard.fsutil import check_output, write_output

    if (voc is None) == (shards is None):
        raise click.UsageError("give exactly one of --voc SRC or --shards DIR")
    if shards is not None:
        if key_file is None:
            raise click.UsageError("--shards needs --key (the key the shards were encrypted with)")
        given = [n for n, v in (("--methods", method_names), ("--block-sizes", block_sizes),
                                ("--image-size", image_size), ("--key-seed", key_seed)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only with --voc")
        check_output(output)
        png = shard_grid(shards, voc_id, key_file)
    else:
        if key_file is not None:
            raise click.UsageError("--key: only with --shards (a --voc preview makes its own keys; see --key-seed)")
        size = image_size or options.DEFAULT_IMAGE_SIZE
        method_names = method_names or methods.names()
        block_sizes = block_sizes or default_block_sizes(size)
        bad = [m for m in block_sizes if size % m]
        if bad:
            raise KeyshardError(f"`block_sizes`: {', '.join(map(str, bad))} do(es) not divide `image_size` {size}")
        check_output(output)
        image, _ = read_voc_sample(voc, voc_id, size)
        tiles = encrypt_tiles(image, method_names, block_sizes, key_seed)
        keys_text = "fresh random keys" if key_seed is None else f"keys from --key-seed {key_seed}"
        png = voc_grid(image, tiles, method_names, block_sizes, f"{voc_id} at {size}x{size}, {keys_text}")
    write_output(output, png)
    click.echo(f"wrote {output}")
