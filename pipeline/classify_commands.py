"""Classification pieces of the pipeline's CLI: ``toy-classes`` and ``encrypt --image-folder``."""

from __future__ import annotations

import sys

import click

from keyshard import keys, options
from keyshard.errors import KeyshardError


@click.command("toy-classes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", type=click.IntRange(2, 100), default=4, show_default=True, help="Number of classes.")
@click.option("--images", type=click.IntRange(4, options.MAX_IMAGES), default=160, show_default=True,
              help="Images in total, dealt evenly over the classes.")
@click.option("--seed", type=options.SEED, default=0, show_default=True)
def toy_classes(out, classes, images, seed):
    """Write a small synthetic classification set in torchvision's ImageFolder layout (OUT/<class>/<n>.png)."""
    from keyshard.pipeline.toy_classes import make_toy_classes

    root = make_toy_classes(out, classes, images, seed)
    click.echo(f"wrote {images} images in {classes} class folders under {root}")


def parse_splits_from(value: str | None) -> dict | None:
    """``train=FILE,val=FILE`` → {"train": FILE, "val": FILE}."""
    if not value:
        return None
    out = {}
    for part in value.split(","):
        name, sep, path = part.partition("=")
        if not sep or name.strip() not in ("train", "val") or not path.strip():
            raise KeyshardError(f"--splits-from {value!r}: expected train=FILE,val=FILE")
        out[name.strip()] = path.strip()
    if "train" not in out:
        raise KeyshardError(f"--splits-from {value!r}: needs train=FILE")
    return out


def encrypt_image_folder(folder, key_file, plain, output, splits, size, shard_size, jobs, split_seed, holdout,
                         max_pixels, val_fraction, splits_from, quiet):
    """``keyshard encrypt --image-folder DIR`` (called by the encrypt command)."""
    from keyshard.pipeline import image_folder

    if plain == bool(key_file):
        raise KeyshardError("give exactly one of --key KEY_FILE or --plain")
    if val_fraction is not None and splits_from:
        raise KeyshardError("give --val-fraction or --splits-from, not both")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise KeyshardError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    key = keys.load(key_file) if key_file else None
    opts = image_folder.FolderOptions(size=size, splits=splits, shard_size=shard_size, split_seed=split_seed,
                                      holdout=holdout, max_pixels=max_pixels,
                                      val_fraction=None if splits_from else (0.2 if val_fraction is None else val_fraction))
    doc = image_folder.run(folder, output, key, opts, parse_splits_from(splits_from), jobs=jobs,
                           command=["keyshard", *sys.argv[1:]], progress=not quiet)
    n = sum(s["samples"] for s in doc["shards"])
    counts = ", ".join(f"{k} {v}" for k, v in doc["splits"]["counts"].items())
    click.echo(f"wrote {n} samples ({doc['dataset']['num_classes']} classes) in {len(doc['shards'])} shards to "
               f"{output} ({counts}); manifest.json written")
