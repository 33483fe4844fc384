"""Classification pieces of the pipeline's CLI: ``toy-classes`` and ``encrypt --image-folder``."""

from __future__ import annotations

import click

from keyshard import options
from keyshard.errors import KeyshardError


@click.command("toy-classes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", type=click.IntRange(2, 100), default=4, show_default=True, help="Number of classes.")
@click.option("--images", type=click.IntRange(4, options.MAX_IMAGES), default=160, show_default=True,
              help="Images in total, dealt evenly over the classes.")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Seed of the images (the same seed gives the same files).")
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


def image_folder_dataset(folder, val_fraction, splits_from):
    """The ``encrypt --image-folder DIR`` source, its options checked before any work (the encrypt
    command then runs the one encryption job on it)."""
    from keyshard.pipeline.image_folder import ImageFolderDataset

    if val_fraction is not None and splits_from:
        raise KeyshardError("give --val-fraction or --splits-from, not both")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise KeyshardError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    lists = parse_splits_from(splits_from)
    dataset = ImageFolderDataset(folder, lists, None if lists else (0.2 if val_fraction is None else val_fraction))
    dataset.check()
    return dataset
