"""CLI commands of the data pipeline: ``toy-voc``, ``encrypt``, ``verify``, ``decrypt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from keyshard import keys, options, params, signing, sources
from keyshard.errors import KeyshardError
from keyshard.methods import defaults
from keyshard.pipeline.splits import SPLITS
from keyshard.pipeline.workers import BACKENDS, DEFAULT_BACKEND


def _in_split_order(ctx, param, value):
    """The chosen splits in the order encrypt writes them (train, holdout, test)."""
    return tuple(s for s in SPLITS if s in value)


def _parse_scale(ctx, param, value):
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("expected MIN,MAX such as 0.08,1.0") from None
    if not 0 < lo <= hi <= 1:
        raise click.BadParameter("need 0 < MIN <= MAX <= 1")
    return (lo, hi)


@click.command("toy-voc")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", type=click.IntRange(3, options.MAX_IMAGES), default=60, show_default=True, metavar="N",
              help="Number of images, split about evenly into train.txt and val.txt.")
@click.option("--voc-sizes", is_flag=True, help="Exactly VOC2012's 1464 train / 1449 val ids instead of --images.")
@click.option("--tar", "make_tar", is_flag=True, help="Also pack it as OUT/VOCtrainval_11-May-2012.tar (official layout).")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Seed of the shapes, colours and sizes (the same seed gives the same files).")
@click.option("--min-side", type=click.IntRange(8, options.MAX_IMAGE_SIZE), default=48, show_default=True,
              help="Smallest image side in pixels.")
@click.option("--max-side", type=click.IntRange(8, options.MAX_IMAGE_SIZE), default=96, show_default=True,
              help="Largest image side in pixels.")
@click.option("--classes", type=click.IntRange(2, 255), default=21, show_default=True, metavar="K",
              help="Number of classes K including background 0 (objects are 1..K-1). With K != 21 encrypt it "
                   "with --image-dir OUT/VOCdevkit/VOC2012/JPEGImages --mask-dir .../SegmentationClass --num-classes K.")
@params.names_flags
def toy_voc(out, images, voc_sizes, make_tar, seed, min_side, max_side, classes):
    """Write a small synthetic dataset in the exact VOC2012 layout (OUT/VOCdevkit/VOC2012)."""
    from keyshard.pipeline.toy_voc import TAR_NAME, make_toy_voc

    if not 8 <= min_side <= max_side:
        raise KeyshardError("--min-side must be at least 8 and not above --max-side")
    root = make_toy_voc(out, images, seed, voc_sizes, make_tar, min_side, max_side, classes=classes)
    click.echo(f"wrote {root}" + (f" and {Path(out) / TAR_NAME}" if make_tar else ""))


@click.command("encrypt")
@click.option("--voc", default=None, type=click.Path(), metavar="PATH",
              help="VOCdevkit/VOC2012 (or a folder above it), or the official VOC tar read in place.")
@click.option("--image-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Segmentation, any dataset: folder of images (with --mask-dir; paired by file stem).")
@click.option("--mask-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of single-channel PNG label maps, one per image (palette PNGs read as indices).")
@click.option("--num-classes", type=click.IntRange(1, 255), default=None, metavar="K",
              help="With --image-dir: number of classes K (labels 0..K-1; masks are 8-bit).")
@click.option("--ignore-index", type=click.IntRange(0, 255), default=None, metavar="V",
              help="With --image-dir: label of unlabelled pixels, ignored by loss and metrics.  [default: 255]")
@click.option("--label-map", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="With --image-dir: JSON object raw id -> class id or the ignore index (Cityscapes-style "
                   "ids); values it does not list stay as they are.")
@click.option("--reduce-zero-label", is_flag=True,
              help="With --image-dir (ADE20K): label 0 becomes the ignore index, 1..K become 0..K-1.")
@click.option("--class-names", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="With --image-dir: K class names, one a line or a JSON list (default class_0, class_1, ...).")
@click.option("--image-folder", "image_folder", default=None, type=click.Path(file_okay=False),
              help="Classification: a torchvision ImageFolder layout (one sub-folder per class); samples hold "
                   "the keyed image and its class index (<key>.cls).")
@click.option("--val-fraction", type=params.Fraction(params.VAL_FRACTION), default=None, metavar="F",
              help="Without split files: the fraction drawn (seeded by --split-seed) as the test split; "
                   "--image-folder: per class (default 0.2).")
@click.option("--splits-from", "splits_from", type=params.SplitFiles(), default=None, metavar="train=FILE,val=FILE",
              help="Split lists (one id a line: --image-folder the path relative to the folder, --image-dir the "
                   "file stem); holdout is drawn from train.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="Key file from `keyshard keygen`.")
@click.option("--plain", is_flag=True, help="Write the unencrypted baseline instead (same format).")
@click.option("--output", "-o", required=True, type=click.Path(), metavar="DIR", help="Output directory (new, or --resume).")
@click.option("--splits", type=options.CommaList(click.Choice(SPLITS)), default="train,holdout,test", show_default=True,
              callback=_in_split_order,
              help="Which splits to write: train/holdout come from train.txt, test is val.txt.")
@options.image_size_option(default=options.DEFAULT_IMAGE_SIZE, show_default=True, metavar="SIZE",
                           help="Images and masks are resized to SIZE x SIZE pixels (the key's block size must divide it).")
@click.option("--shard-size", type=click.IntRange(1, options.MAX_IMAGES), default=128, show_default=True, metavar="N",
              help="Samples per shard.")
@click.option("--jobs", "-j", type=options.JOBS, default=-1, show_default=True,
              help="Parallel workers: -1 = all cores, else 1 or more.")
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, show_default=True,
              help="processes: worker processes forked from this one (Linux; elsewhere loky). "
                   "Or a joblib backend: loky, multiprocessing, threading, sequential, dask "
                   "(dask needs dask[distributed]).")
@click.option("--dask-scheduler", default=None, metavar="ADDRESS",
              help="With --backend dask: address of a running dask scheduler (tcp://host:8786). "
                   "Without it a local cluster is started.")
@click.option("--augment-copies", type=click.IntRange(0, 1000), default=0, show_default=True, metavar="N",
              help="Extra randomly augmented replicas of each train image (random resized crop + hflip, "
                   "made before encryption). Replica r goes to its own shards.")
@click.option("--augment-seed", type=options.SEED, default=0, show_default=True, help="Seed of the replicas' randomness.")
@click.option("--crop-scale", default="0.08,1.0", show_default=True, callback=_parse_scale,
              help="Area range of the random resized crop.")
@click.option("--split-seed", type=options.SEED, default=0, show_default=True, help="Seed of the train/holdout draw.")
@click.option("--holdout", type=click.IntRange(0, options.MAX_IMAGES), default=None, metavar="N",
              help="Holdout size (default: round(n x 146/1464), at least 1).")
@click.option("--skip-bad", is_flag=True,
              help="Skip unreadable samples and list them in the manifest instead of stopping.")
@options.max_pixels_option(help="Largest image or label map (width x height, read from its header before "
                                "decoding) accepted; larger ones are bad samples. Default: Pillow's limit.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUTPUT (same settings required).")
@click.option("--sign-with", "sign_with", type=click.Path(dir_okay=False), default=None, metavar="NAME",
              help="Ed25519 signing key from `keyshard signing-key -o NAME`: also write manifest.json.sig, "
                   "a detached signature over the exact bytes of manifest.json (checked before any work).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@params.names_flags
def encrypt(voc, image_dir, mask_dir, num_classes, ignore_index, label_map, reduce_zero_label, class_names,
            image_folder, val_fraction, splits_from, key_file, plain, output, splits, image_size, shard_size, jobs,
            backend, dask_scheduler, augment_copies, augment_seed, crop_scale, split_seed, holdout, skip_bad,
            max_pixels, resume, sign_with, quiet):
    """Encrypt a dataset into keyed WebDataset shards (or --plain shards) with a manifest.

    One source: --voc PATH; --image-dir DIR --mask-dir DIR (any segmentation dataset, with
    --num-classes K and --splits-from or --val-fraction); or --image-folder DIR (classification).

    Output: OUTPUT/<split>-NNNNNN.tar and OUTPUT/manifest.json (written last).  The same input,
    key and options give byte-identical shards whatever --jobs.  Bad input stops the run with one
    line naming the file and leaves no manifest; --resume then continues it.

    \b
    On a dask cluster (shared file system for VOC and OUTPUT):
      dask scheduler  &   dask worker tcp://HOST:8786  (on each node)
      keyshard encrypt ... --backend dask --dask-scheduler tcp://HOST:8786 --jobs -1
    """
    from keyshard.pipeline import encrypt_job

    params.exactly_one({"--voc PATH": voc, "--image-dir DIR with --mask-dir DIR": image_dir or mask_dir,
                        "--image-folder DIR": image_folder}, "source")
    seg_only = [name for name, v in (("--num-classes", num_classes), ("--ignore-index", ignore_index),
                                     ("--label-map", label_map), ("--reduce-zero-label", reduce_zero_label),
                                     ("--class-names", class_names)) if v is not None and v is not False]
    if seg_only and not (image_dir or mask_dir):
        raise KeyshardError(f"{seg_only[0]} is for --image-dir/--mask-dir datasets")
    if voc is not None and (val_fraction is not None or splits_from is not None):
        raise KeyshardError("--splits-from and --val-fraction are not for --voc (VOC's splits are its "
                            "ImageSets/Segmentation files)")
    params.exactly_one({"--key KEY_FILE": key_file, "--plain": plain})
    if image_folder is not None:
        from keyshard.pipeline.classify_commands import image_folder_dataset

        folders = image_folder_dataset(image_folder, val_fraction, splits_from)
    elif voc is None:
        folders = _folder_dataset(image_dir, mask_dir, num_classes, ignore_index, label_map, reduce_zero_label,
                                  class_names, splits_from, val_fraction)
    else:
        folders = None
    key = keys.load(key_file) if key_file else None
    if key is not None and (weak := defaults.ciphertext_only_warning(key.method, key.block_size)) is not None:
        click.echo(f"warning: {weak}", err=True)  # the ciphertext-only benchmark's verdict on this kind of key
    signer = signing.load_private(sign_with) if sign_with else None  # a bad key fails before any work
    if sign_with and (warning := signing.check_file_mode(sign_with)):
        click.echo(f"warning: {warning}", err=True)
    options = encrypt_job.EncryptOptions(size=image_size, splits=splits, shard_size=shard_size,
                                         augment_copies=augment_copies, augment_seed=augment_seed,
                                         crop_scale=crop_scale, split_seed=split_seed, holdout=holdout,
                                         skip_bad=skip_bad, max_pixels=max_pixels)
    client = _dask_client(dask_scheduler, jobs) if backend == "dask" else None
    try:
        doc = encrypt_job.run(voc, output, key, options, jobs=jobs, backend=backend, resume=resume,
                              command=["keyshard", *sys.argv[1:]], progress=not quiet, folders=folders)
    finally:
        if client is not None:
            client.close()
    n = sum(s["samples"] for s in doc["shards"])
    counts = ", ".join(f"{k} {v}" for k, v in doc["splits"]["counts"].items())
    classes = f" ({doc['dataset']['num_classes']} classes)" if image_folder else ""  # found in its folders
    click.echo(f"wrote {n} samples{classes} in {len(doc['shards'])} shards to {output} ({counts}); "
               "manifest.json written")
    if signer is not None:
        sig = signing.write_signature(Path(output) / "manifest.json", signer)
        click.echo(f"signed: {sig} (signer {signing.fingerprint(signer.public_key())})")
    if doc["failed"]:
        click.echo(f"warning: skipped {len(doc['failed'])} bad samples (listed in manifest.json 'failed')", err=True)


def _folder_dataset(image_dir, mask_dir, num_classes, ignore_index, label_map, reduce_zero_label, class_names,
                    splits_from, val_fraction):
    """The --image-dir/--mask-dir dataset, checked (label map, class names) before any work."""
    from keyshard.pipeline.folders import FolderDataset

    if not (image_dir and mask_dir):
        raise KeyshardError("--image-dir and --mask-dir go together (images and their label maps, paired by stem)")
    if num_classes is None:
        raise KeyshardError("--image-dir needs --num-classes K")
    folders = FolderDataset(image_dir, mask_dir, num_classes, 255 if ignore_index is None else ignore_index,
                            label_map, reduce_zero_label, class_names, splits_from, val_fraction)
    folders.check()
    return folders


def _dask_client(address, jobs):
    try:
        from dask.distributed import Client
    except ImportError:
        raise KeyshardError("--backend dask needs dask: pip install 'keyshard[dask]'") from None
    if address:
        try:
            return Client(address)
        except (OSError, TypeError, ValueError) as exc:  # unreachable, bad address, TLS not configured
            raise KeyshardError(f"--dask-scheduler {address}: cannot connect ({exc})") from None
    return Client(n_workers=(os.cpu_count() if jobs < 1 else jobs), threads_per_worker=1, processes=True)


@click.command("verify")
@click.argument("shards", type=click.Path())
@click.option("--public-key", "--trust", "public_key", type=click.Path(dir_okay=False), default=None,
              metavar="NAME.pub",
              help="Also require manifest.json.sig to be a valid signature by this public key "
                   "(from `keyshard signing-key`); an unsigned or changed manifest is refused.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(shards, public_key, quiet):
    """Re-hash every shard against manifest.json and recount samples (exit 1 on any mismatch).

    SHARDS is a directory or a URL base (http(s)://host/dir/, s3://bucket/prefix/ with the s3
    extra); remote shards are streamed front to back, never downloaded to disk.  With
    --public-key the manifest's signature is checked first, and the shards against that manifest.
    """
    from keyshard.manifest import read
    from keyshard.pipeline.manifest import verify as verify_dir

    manifest = read(shards, public_key)
    problems = verify_dir(shards, progress=not quiet, doc=manifest)
    for line in problems:
        click.echo(f"keyshard: verify: {line}", err=True)
    if problems:
        raise SystemExit(1)
    n, provenance = sum(s.samples for s in manifest.shards), manifest.provenance
    click.echo(f"OK: {len(manifest.shards)} shards, {n} samples match {sources.join(shards, 'manifest.json')}"
               f" (sha256 {provenance.manifest_sha256[:16]}…)")
    if provenance.signature_verified:
        click.echo(f"OK: signature verified, signer {provenance.signer_fingerprint} ({public_key})")
    elif not sources.is_url(shards) and (Path(shards) / signing.SIGNATURE_FILE).exists():
        click.echo(f"note: {signing.SIGNATURE_FILE} not checked (give --public-key NAME.pub)")


@click.command("decrypt")
@click.argument("shards", type=click.Path())
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False),
              help="The key the shards were encrypted with (its fingerprint must match the manifest's).")
@click.option("--sample", "sample_key", required=True, help="Sample key, e.g. 2007_000032 or 2007_000032_a1.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write (missing directories are created; an existing file is not replaced).")
def decrypt(shards, key_file, sample_key, output):
    """Invert one encrypted sample with its key and save the plain image as PNG (for audits)."""
    import io

    from PIL import Image

    from keyshard.fsutil import check_output, write_output
    from keyshard.manifest import read
    from keyshard.shardformat import decode_npy, stream_shard
    from keyshard.transforms import compile_plan

    manifest = read(shards)
    if manifest.encryption.plain:
        raise KeyshardError(f"{shards}: holds plain shards; nothing to decrypt")
    key = keys.load(key_file)
    if key.fingerprint != manifest.encryption.key_fingerprint:
        raise KeyshardError(f"{key_file}: fingerprint does not match {shards}/manifest.json (another key)")
    check_output(output)  # exists, a directory, a read-only place: refused before the shards are read
    for shard in manifest.shards:
        for name, files in stream_shard(sources.join(shards, shard.file), shard.entry()):
            if name == sample_key:
                pixels = decode_npy(files["img.npy"])
                plan = compile_plan(key.material, pixels.shape[0], pixels.shape[1])
                try:
                    plain = plan.decrypt(pixels)
                except ValueError as exc:  # codes no key could produce, another shape: damaged data
                    raise KeyshardError(f"{sources.join(shards, shard.file)}: sample {sample_key!r}: {exc}") from None
                buf = io.BytesIO()
                Image.fromarray(plain).save(buf, format="PNG")
                write_output(output, buf.getvalue())
                click.echo(f"wrote {output}")
                return
    raise KeyshardError(f"{shards}: no sample {sample_key!r}")
