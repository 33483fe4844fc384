"""``keyshard train``."""

from __future__ import annotations

import click

from keyshard.errors import KeyshardError


@click.command("train")
@click.option("--shards", required=True, type=click.Path(), help="Shard directory from `keyshard encrypt`.")
@click.option("--out", "out", required=True, type=click.Path(), help="Run directory (best.pt, last.pt, metrics.jsonl).")
@click.option("--preset", type=click.Choice(["paper", "demo"]), default="demo", show_default=True,
              help="paper: FCN-ResNet50, SGD lr 0.1, wd 0.005, cosine restarts every 10 epochs, batch 256, "
                   "100 epochs. demo: a small network that trains on the CPU in minutes.")
@click.option("--model", type=click.Choice(["fcn_resnet50", "small"]), default=None, help="Override the preset's model.")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per optimiser step (per process).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Samples per forward pass; gradients are accumulated up to --batch-size.")
@click.option("--lr", type=float, default=None)
@click.option("--momentum", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--restart-epochs", type=click.IntRange(min=1), default=None, help="Cosine warm-restart period.")
@click.option("--min-lr", type=float, default=None)
@click.option("--aux-weight", type=float, default=None, help="FCN auxiliary loss weight.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone/model weights (torchvision ResNet-50 state dict or keyshard checkpoint). "
                   "Nothing is downloaded; without it the model trains from scratch.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers per process.")
@click.option("--shuffle-buffer", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format (helps on recent GPUs).")
@click.option("--block-flip", is_flag=True,
              help="Key-safe augmentation: randomly reverse the order of block columns (commutes with any key).")
@click.option("--block-crop", type=click.IntRange(min=1), default=None, metavar="SIZE",
              help="Key-safe augmentation: random SIZExSIZE crop at block-aligned offsets (a multiple of M).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt (same settings; --epochs may grow).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def train(shards, out, preset, model, epochs, batch_size, micro_batch, lr, momentum, weight_decay,
          restart_epochs, min_lr, aux_weight, weights, seed, workers, shuffle_buffer, amp, channels_last,
          block_flip, block_crop, resume, quiet):
    """Train a segmentation model by streaming (plain or keyed) shards.

    Method, block size, key fingerprint and pixel divisor come from the shards' manifest.  Runs on
    the GPU when there is one.  For several GPUs or nodes, launch with torchrun:

    \b
      torchrun --nproc-per-node 4 -m keyshard.cli train --shards S --out RUN --preset paper
    """
    from keyshard.train.loop import TrainConfig, Trainer

    if micro_batch is None and batch_size is not None:
        micro_batch = batch_size if preset == "demo" else min(batch_size, 32)
    config = TrainConfig.from_preset(
        preset, model=model, epochs=epochs, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
        momentum=momentum, weight_decay=weight_decay, restart_epochs=restart_epochs, min_lr=min_lr,
        aux_weight=aux_weight, weights=weights, seed=seed, workers=workers, shuffle_buffer=shuffle_buffer,
        amp=amp, channels_last=channels_last, block_flip=block_flip, block_crop=block_crop)
    if config.batch_size % config.micro_batch:
        raise KeyshardError(f"--batch-size {config.batch_size} must be a multiple of --micro-batch {config.micro_batch}")
    result = Trainer(shards, out, config, resume=resume, progress=not quiet, log=click.echo).fit()
    if result["history"]:
        click.echo(f"best holdout loss {result['best_holdout_loss']:.4f}; checkpoints in {out}/best.pt and {out}/last.pt")
