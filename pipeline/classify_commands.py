"""Classification pieces of the pipeline's CLI: ``toy-classes`` and ``encrypt --image-folder``."""

from __future__ import annotations

import click

from keyshard import options, params


@click.command("toy-classes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", type=click.IntRange(2, 100), default=4, show_default=True, help="Number of classes.")
@click.option("--images", type=click.IntRange(4, options.MAX_IMAGES), default=160, show_default=True,
              help="Images in total, dealt evenly over the classes.")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Seed of the images (the same seed gives the same files).")
@params.names_flags
def toy_classes(out, classes, images, seed):
    """Write a small synthetic classification set in torchvision's ImageFolder layout (OUT/<class>/<n>.png)."""
    from keyshard.pipeline.toy_classes import make_toy_classes

    root = make_toy_classes(out, classes, images, seed)
    click.echo(f"wrote {images} images in {classes} class folders under {root}")


def image_folder_dataset(folder, val_fraction, splits_from):
    """The ``encrypt --image-folder DIR`` source, its options checked before any work (the encrypt
    command then runs the one encryption job on it)."""
    from keyshard.pipeline.image_folder import ImageFolderDataset

    dataset = ImageFolderDataset(folder, splits_from, val_fraction)
    dataset.check()
    return dataset
