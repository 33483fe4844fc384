"""``keyshard export``: the command line of ``evaluate/export.py`` (imported lazily: no torch or
onnx until the command runs)."""

from __future__ import annotations

from pathlib import Path

import click

from keyshard import options, params
from keyshard.errors import KeyshardError


@click.command("export")
@click.option("--checkpoint", "ckpt", default=None, type=click.Path(dir_okay=False),
              help="The model to export: a checkpoint from `keyshard train` (RUN/best.pt) or `keyshard protect`.")
@click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False),
              help="The key, with --transform-only or --include-key (a model file without it holds no key).")
@click.option("--transform-only", is_flag=True,
              help="Write the key transform alone: uint8 N×H×W×3 plain pixels in, keyed pixels out (uint16 "
                   "codes for FFX), equal to encrypt. KEY MATERIAL: written with mode 0600.")
@click.option("--include-key", is_flag=True,
              help="Put the key transform inside the model, which then takes plain uint8 images. KEY MATERIAL: "
                   "written with mode 0600.")
@click.option("--image-size", type=options.IMAGE_SIZE, default=None,
              help=f"--transform-only: the image size it is for (default: the --checkpoint's, else "
                   f"{options.DEFAULT_IMAGE_SIZE}).")
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False), metavar="FILE.onnx",
              help="The ONNX file to write (one self-contained file; missing directories are created).")
@click.option("--ignore-fingerprint", is_flag=True,
              help="Export even if the key's fingerprint differs from the checkpoint's (said in the output and "
                   "in the file's metadata).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@params.names_flags
def export(ckpt, key_file, transform_only, include_key, image_size, output, ignore_fingerprint, force):
    """Write a protected model, or its key transform, as one ONNX file (opset 18).

    \b
    Three forms:
      --checkpoint C -o model.onnx                       the model takes KEYED pixels; no key inside
      --key K --transform-only -o key.onnx               the key transform alone
      --checkpoint C --key K --include-key -o model.onnx the key inside: takes plain uint8 images

    Pixels enter N×H×W×3 at the checkpoint's image size (dynamic batch); the divisor, ImageNet
    normalisation and NHWC→NCHW are inside.  Outputs: `logits` and `labels` (segmentation) or
    `logits` and `probabilities` (classification).  Each file is run in onnxruntime against torch
    (or the numpy key transform) before it is written.  The transform-only and include-key files
    are as secret as the key (mode 0600); the metadata carries the key's fingerprint, never the
    secret.
    """
    from keyshard.evaluate import export as ex

    _check_usage(ckpt, key_file, transform_only, include_key, image_size)
    if Path(output).exists() and not force:
        raise KeyshardError(f"{output}: already exists; refusing to overwrite it (--force replaces it)")
    ex.require_onnx()
    if transform_only:
        size = image_size or (None if ckpt else options.DEFAULT_IMAGE_SIZE)
        done = ex.export_transform(key_file, output, size, ckpt, ignore_fingerprint, overwrite=force)
    else:
        done = ex.export_model(ckpt, output, key_file if include_key else None, ignore_fingerprint, overwrite=force)
    for line in summary(done):
        click.echo(line)


def _check_usage(ckpt, key_file, transform_only, include_key, image_size) -> None:
    """Which form: the flags must name exactly one (one line otherwise)."""
    params.exactly_one({"--transform-only": transform_only, "--include-key": include_key}, required=False)
    if key_file and not (transform_only or include_key):
        raise KeyshardError("--key needs --transform-only or --include-key (a model exported from --checkpoint "
                            "alone takes keyed pixels and holds no key)")
    if (transform_only or include_key) and not key_file:
        raise KeyshardError(f"{'--transform-only' if transform_only else '--include-key'} needs --key")
    if transform_only:
        params.exactly_one({"--image-size": image_size, "--checkpoint": ckpt}, required=False)
        return
    if image_size is not None:
        raise KeyshardError("--image-size is for --transform-only (a model file has its checkpoint's size)")
    if not ckpt:
        raise KeyshardError("give --checkpoint (or --key with --transform-only)")


def summary(done) -> list[str]:
    """What was written, its form and its check, and the key-material warning where it applies."""
    meta, check = done.metadata, done.check
    what = f"{meta['form']}, {meta['input']}"
    if "task" in meta:
        what += f"; {meta['task']} model {meta['model']}, exported with {done.exporter}"
    lines = [f"wrote {done.path} ({what})"]
    if "key_fingerprint" in meta:
        lines.append(f"key: {meta['method']} M={meta['block_size']}, fingerprint {meta['key_fingerprint'][:16]}…")
    if meta.get("fingerprint_check") == "overridden":
        lines.append("fingerprint check: overridden (--ignore-fingerprint): the key's fingerprint differs "
                     "from the checkpoint's")
    if "max_abs_diff" in check:
        lines.append(f"checked in onnxruntime on {check['images']} images: largest logit difference "
                     f"{check['max_abs_diff']:.2g} (largest logit {check['max_abs_logit']:.3g})")
    else:
        lines.append(f"checked in onnxruntime on {check['images']} images: equal to encrypt bit for bit")
    if done.key_material:
        lines.append("KEY MATERIAL: this file reproduces the key (mode 0600); keep it as secret as the key file")
    return lines
