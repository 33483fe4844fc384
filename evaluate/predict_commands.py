"""``keyshard predict``: the command line of ``evaluate/predict.py`` (imported lazily: no torch until
the command runs).  It builds the predictor with ``keyshard.load_predictor`` — the Python API's
own path — and hands it batches of files or shard samples."""

from __future__ import annotations

from pathlib import Path

import click

from keyshard import options, params
from keyshard.errors import KeyshardError


@click.command("predict")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The model: a checkpoint from `keyshard train` (RUN/best.pt) or `keyshard protect`.")
@click.option("--key", "key", default=None, type=click.Path(dir_okay=False),
              help="The key the model was trained with; it is applied to every image on the device.")
@click.option("--plain", is_flag=True,
              help="Predict on plain images without a key: what a user who lacks the key gets from a protected model.")
@click.option("--ignore-fingerprint", is_flag=True,
              help="Predict even if the key's fingerprint differs from the checkpoint's (said in the output).")
@click.option("--input-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Predict on the image files directly in DIR (.jpg .png .bmp .gif .tif .webp ...), instead of FILES.")
@click.option("--shards", type=click.Path(), default=None, metavar="DIR",
              help="Predict on the test split of PLAIN shards (directory or http(s)/s3 URL base), as "
                   "`evaluate --test` reads them; label maps are at the shards' image size.")
@click.option("--output", "-o", "output", required=True, type=click.Path(file_okay=False), metavar="OUT",
              help="Directory for the predictions; it must be empty or new (or an earlier run's, with --resume).")
@click.option("--batch-size", type=options.BATCH, default=16, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=options.WORKERS, default=2, show_default=True,
              help="Processes decoding images (or reading shards) ahead of the model (0: in this process).")
@click.option("--overlay", is_flag=True,
              help="Segmentation: also write OUT/<stem>.overlay.png, the image blended with the colour map.")
@click.option("--skip-bad", is_flag=True,
              help="Skip images that cannot be read and list them in OUT/failed.jsonl instead of stopping.")
@click.option("--resume", is_flag=True,
              help="Continue an earlier run in OUT: images already in OUT/predictions.jsonl are skipped.")
@options.max_pixels_option(help="Largest image (width x height, read from its header before decoding) accepted, "
                                "as in `encrypt`; larger ones are unreadable images.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@params.names_flags
def predict(files, checkpoint, key, plain, ignore_fingerprint, input_dir, shards, output, batch_size, workers,
            overlay, skip_bad, resume, max_pixels, quiet):
    """Predict with a protected model on new images: FILES..., --input-dir DIR or --shards DIR.

    Images are decoded and resized to the model's size as `encrypt` does them; the key is applied
    on the device (the GPU when there is one).

    \b
    Segmentation: OUT/<stem>.png, a palette label map at the image's original size (logits
      resized bilinearly, then argmax); with --overlay OUT/<stem>.overlay.png;
      OUT/predictions.jsonl, one line per image: id, width, height, pixels_per_class.
    Classification: OUT/predictions.jsonl, one line per image: id, class, class_name,
      probability, top5; and OUT/predictions.csv at the end.
    """
    from keyshard.evaluate import predict as pr

    params.exactly_one({"FILES": files, "--input-dir": input_dir, "--shards": shards})
    params.exactly_one({"--key": key, "--plain": plain}, required=False)
    out = pr.check_out(output, resume)
    predictor = pr.load_predictor(checkpoint, key, plain=plain, ignore_fingerprint=ignore_fingerprint,
                                  batch_size=batch_size)
    done = pr.done_ids(out) if resume else []
    batches, total = _batches(predictor, files, input_dir, shards, checkpoint, done, overlay, workers, max_pixels)
    summary = pr.predict_to_dir(predictor, batches, out, overlay=overlay, skip_bad=skip_bad, done=done,
                                total=total, progress=not quiet)
    for line in report(predictor, summary, out, key, plain):
        click.echo(line)


def _batches(predictor, files, input_dir, shards, checkpoint, done, overlay: bool, workers: int, max_pixels: int):
    """The batches of Items to predict on, and how many images they hold (for the progress bar)."""
    from keyshard.evaluate import predict as pr

    skip = {str(r["id"]) for r in done}
    if shards is not None:
        from keyshard.manifest import read

        manifest = read(shards)
        pr.check_shards(manifest, shards, predictor, checkpoint)
        total = manifest.splits.counts["test"] - len(skip)
        return pr.shard_batches(shards, manifest, predictor.batch_size, workers, overlay), max(0, total)
    named = [(path.stem, path) for path in pr.image_files(files, input_dir)]
    if not named:
        raise KeyshardError(f"{input_dir}: holds no image files")
    pr.check_ids([(image_id, str(path)) for image_id, path in named], predictor.output, overlay)
    named = [(image_id, path) for image_id, path in named if image_id not in skip]
    return pr.file_batches(named, predictor.image_size, predictor.batch_size, workers, max_pixels, overlay), len(named)


def report(predictor, summary, out: Path, key, plain: bool) -> list[str]:
    """What was predicted, with which key (or none), and what was written."""
    from keyshard.evaluate.predict import FAILED, PREDICTIONS

    lines = [f"predicted {summary.predicted} image(s) with {predictor.task} model on {predictor.device}"
             + (f" ({summary.resumed} done by an earlier run)" if summary.resumed else "")]
    if predictor.keyed:
        lines.append(f"key: {key}, fingerprint {predictor.key_fingerprint[:16]}…")
    if predictor.fingerprint_check == "overridden":
        lines.append("fingerprint check: overridden (--ignore-fingerprint): the key's fingerprint differs from "
                     "the checkpoint's")
    if plain:
        lines.append("--plain: no key was applied; for a model trained with a key, this is what a user "
                     "without the key gets")
    if summary.failed:
        lines.append(f"skipped {summary.failed} unreadable image(s), listed in {out / FAILED}")
    written = ", ".join(str(p) for p in [out / PREDICTIONS, *summary.finished])
    per_image = predictor.output.per_image
    lines.append(f"wrote {written}" + (f" and {per_image} in {out}" if per_image else ""))
    return lines
