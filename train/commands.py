"""``keyshard train``."""

from __future__ import annotations

import click

from keyshard import options, params, tasks
from keyshard.errors import KeyshardError
from keyshard.train.presets import (CLASSIFIERS, CLASSIFY_MODELS, PRESETS, SEGMENTATION_MODELS, by_preset,
                                    micro_batch_for, micro_batch_rule)


@click.command("train")
@click.option("--shards", required=True, type=click.Path(), help="Shards from `keyshard encrypt`: a directory or a URL base (http(s)://host/dir/, s3://bucket/prefix/).")
@options.output_option(required=True, type=click.Path(), metavar="DIR",
                       help="Run directory to create (best.pt, last.pt, metrics.jsonl); with --resume, the run to continue.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="demo", show_default=True,
              help="Defaults of the model and its recipe (each option below names both presets' values). "
                   "paper: the paper's FCN-ResNet50 recipe (plain cross-entropy, SGD with cosine warm restarts, "
                   "global batch 256). demo: a small network that trains on the CPU in minutes.")
@click.option("--model", type=click.Choice([*SEGMENTATION_MODELS, *CLASSIFIERS]),
              default=None,
              help="Override the preset's model. block_aligned: a stem that sees whole key blocks "
                   "(no accuracy loss from the key; see `keyshard protect`). Classification: patch_vit (ViT-style, "
                   "patch = a multiple of the block size; the demo's) or resnet18 (torchvision; the paper's). "
                   f"Default: {by_preset('model')} (classification shards: "
                   f"{', '.join(f'{CLASSIFY_MODELS[p]} with --preset {p}' for p in PRESETS)}).")
@click.option("--task", type=click.Choice(tasks.names()), default=None,
              help="Inferred from the shards' manifest (default); if given it must agree.")
@click.option("--train-fraction", type=params.Fraction(params.SUBSET_FRACTION), default=None, metavar="F",
              help="Classification: train on a seeded subset (fraction F, 0 < F <= 1) of the train split, e.g. 0.1 "
                   "with --weights PLAIN.pt (the transfer-learning paper's fine-tuning setting). Default: all of it.")
@click.option("--block-size", type=options.BLOCK_SIZE, default=None,
              help="block_aligned on PLAIN shards: the block size M of the key it will be used with "
                   "(on keyed shards the manifest's is used, the default).")
@click.option("--epochs", type=options.EPOCHS, default=None,
              help=f"Passes over the train split (one augmentation replica each). Default: {by_preset('epochs')}.")
@click.option("--batch-size", type=options.BATCH, default=None,
              help="Samples per optimiser step over ALL ranks, divided by the world size. "
                   f"Default: {by_preset('batch_size')}.")
@click.option("--micro-batch", type=options.BATCH, default=None,
              help="Most samples per forward pass and rank (what BatchNorm sees); gradients are accumulated "
                   f"up to the rank's share of --batch-size. Default: {by_preset('micro_batch')}; with --batch-size "
                   f"B: {micro_batch_rule()}.")
@click.option("--lr", type=options.POSITIVE, default=None,
              help=f"Peak learning rate (SGD; > 0). Default: {by_preset('lr')}.")
@click.option("--momentum", type=options.FiniteFloat(0, 1, max_open=True), default=None,
              help=f"SGD momentum, 0 <= m < 1. Default: {by_preset('momentum')}.")
@click.option("--weight-decay", type=options.NON_NEGATIVE, default=None,
              help=f"SGD weight decay (L2), >= 0. Default: {by_preset('weight_decay')}.")
@click.option("--restart-epochs", type=options.EPOCHS, default=None,
              help=f"Cosine warm-restart period in epochs. Default: {by_preset('restart_epochs')}.")
@click.option("--min-lr", type=options.NON_NEGATIVE, default=None,
              help=f"Floor of the cosine schedule, >= 0. Default: {by_preset('min_lr')}.")
@click.option("--aux-weight", type=options.NON_NEGATIVE, default=None,
              help=f"Weight of the FCN auxiliary loss, >= 0 (torchvision's recipe uses 0.5). "
                   f"Default: {by_preset('aux_weight')}.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone/model weights (torchvision ResNet-50 state dict or keyshard checkpoint). "
                   "Nothing is downloaded; without it the model trains from scratch.")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Seed of the initial weights, the shard order, the shuffle buffers and --train-fraction's subset.")
@click.option("--workers", type=options.WORKERS, default=2, show_default=True, help="DataLoader workers per process.")
@click.option("--shuffle-buffer", type=click.IntRange(0, options.MAX_IMAGES), default=256, show_default=True,
              metavar="N", help="Samples each DataLoader worker holds to shuffle within shards (0 or 1: shard "
                                "order only).")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format (helps on recent GPUs).")
@click.option("--block-flip", is_flag=True,
              help="Key-safe augmentation: randomly reverse the order of block columns (commutes with any key).")
@click.option("--block-crop", type=options.IMAGE_SIZE, default=None, metavar="SIZE",
              help="Key-safe augmentation: random SIZExSIZE crop at block-aligned offsets (a multiple of M).")
@click.option("--resume", is_flag=True, help="Continue the run in --output from last.pt (same settings; --epochs may grow).")
@click.option("--trust", type=click.Path(dir_okay=False), default=None, metavar="NAME.pub",
              help="Public signing key of the data publisher: refuse the shards unless manifest.json.sig is "
                   "its valid signature over manifest.json. Checkpoints record the result.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@params.names_flags
def train(shards, output, resume, trust, quiet, **settings):
    """Train a segmentation model by streaming (plain or keyed) shards.

    Method, block size, key fingerprint and pixel divisor come from the shards' manifest.  Runs on
    the GPU when there is one.  For several GPUs or nodes, launch with torchrun:

    \b
      torchrun --nproc-per-node 4 -m keyshard.cli train --shards S -o RUN --preset paper

    --batch-size is the global batch (the paper's 256 = 4 ranks × 64 here).
    """
    from keyshard.train.loop import TrainConfig, Trainer

    # every other option is a TrainConfig field of the same name (None: the preset's value)
    if settings["micro_batch"] is None and settings["batch_size"] is not None:  # each rank: min(this, its share)
        settings["micro_batch"] = micro_batch_for(settings["preset"], settings["batch_size"])
    config = TrainConfig.from_preset(**settings)
    trainer = Trainer(shards, output, config, resume=resume, progress=not quiet, log=click.echo, trust=trust)
    provenance = trainer.manifest.provenance
    if trainer.dist.main and provenance.signature_verified:
        click.echo(f"manifest signature verified: signer {provenance.signer_fingerprint} ({trust})")
    result = trainer.fit()
    if result["history"]:
        click.echo(f"best holdout loss {result['best_holdout_loss']:.4f}; checkpoints in {output}/best.pt and {output}/last.pt")


@click.command("protect")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(dir_okay=False),
              help="A block_aligned model trained on PLAIN shards (RUN/best.pt).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False), help="SHF or NP key to fold in.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Protected checkpoint to write.")
def protect(ckpt, key_file, output):
    """Turn a plain block-aligned model into one that expects images encrypted with KEY.

    The key is folded into the stem's weights (permuted for SHF, negated and re-biased for NP):
    on encrypted images the protected model gives the plain model's outputs on plain images, up
    to float rounding.  FFX is not linear and is refused.  If the plain checkpoint is public,
    anyone comparing the two stems reads the key off them: fine-tune after protecting, or train
    from scratch on keyed shards.
    """
    from pathlib import Path

    from keyshard import keys
    from keyshard.train.checkpoint import load_model
    from keyshard.fsutil import sha256_file
    from keyshard.train import checkpoint as ckpt_mod
    from keyshard.train.protect import protect_model
    from keyshard.fsutil import check_output, make_parent

    out = check_output(output)  # before any work: exists, a directory, read-only, ...
    model, state = load_model(ckpt, "cpu")
    if not state["data"]["plain"]:
        raise KeyshardError(f"{ckpt}: was trained on keyed shards already; protect starts from a plain model")
    key = keys.load(key_file)
    if state["data"]["image_size"] % key.block_size:
        raise KeyshardError(f"{key_file}: block size {key.block_size} does not divide the model's image size")
    protect_model(model, key.material)
    data = {**state["data"], "plain": False, "method": key.method, "block_size": key.block_size,
            "key_fingerprint": key.fingerprint, "key_derivation": key.derivation,
            "pixel_divisor": key.material.divisor}
    protected = {k: v for k, v in state.items() if k not in ("format", "optimizer", "scheduler", "rng")}
    protected.update(model=model.state_dict(), data=data,
                     protected_from={"path": str(ckpt), "sha256": sha256_file(Path(ckpt))})
    make_parent(out)
    try:
        ckpt_mod.save(out, protected)
    except OSError as exc:
        raise KeyshardError(f"{out}: cannot write ({exc.strerror or type(exc).__name__})") from None
    click.echo(f"wrote {out}: {state['model_name']} protected with {key.method} M={key.block_size} "
               f"(fingerprint {key.short_fingerprint}…)")
