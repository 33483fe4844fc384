"""The training loop: paper recipe or demo preset, single process or DDP (torchrun), resumable.

Method, block size, fingerprint and pixel divisor come from the shards' manifest, never from
flags.  Each epoch is one pass over the train ids (one augmentation replica); the checkpoint
with the lowest holdout loss becomes ``best.pt``, as in the paper.  Only rank 0 writes files.

The module reads top to bottom, like torchvision's ``references/segmentation/train.py``: the
configuration and the distributed set-up; the checks that turn a configuration and a manifest
into a run (pure functions, each raising one ``KeyshardError``); ``Trainer``, which only holds a
run's state; then ``train_one_epoch``, ``evaluate`` (the holdout loss), ``save_epoch`` and
``fit``, the epoch loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from keyshard import faults, tasks
from keyshard.errors import KeyshardError
from keyshard.manifest import Manifest, Provenance, read
from keyshard.train import checkpoint
from keyshard.train.augment import KeySafeAugment
from keyshard.train.data import open_shards
from keyshard.train.device import dist_backend, pick_device
from keyshard.train.presets import BLOCK_MODELS, PRESETS
from keyshard.train.step import all_reduce_sum, forward_stored, train_step


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One run's settings.  The recipe (model to aux_weight) has no defaults of its own: it comes
    from a preset (``train/presets.py``) through ``from_preset``, so it is written in one place."""

    model: str
    epochs: int
    batch_size: int                # samples per optimiser step, over all ranks together (global_batch)
    micro_batch: int               # most samples per forward pass and rank (gradient accumulation)
    lr: float
    momentum: float
    weight_decay: float
    restart_epochs: int            # cosine annealing with warm restarts every N epochs
    min_lr: float
    aux_weight: float              # FCN auxiliary loss weight (torchvision's recipe uses 0.5)
    seed: int = 0
    workers: int = 0
    shuffle_buffer: int = 256
    amp: bool = False
    channels_last: bool = False
    block_size: int | None = None  # block_aligned model on plain shards (keyed shards: the manifest's)
    block_flip: bool = False       # key-safe: flip of the block grid (train/augment.py)
    block_crop: int | None = None  # key-safe: block-aligned crop to this size
    weights: str | None = None
    preset: str = "demo"
    global_batch: bool = True      # False: batch_size per process (runs saved before global batches)
    task: str | None = None        # segmentation | classification: from the manifest (a given one must agree)
    train_fraction: float | None = None  # classification: fine-tune on a seeded subset of the train split

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "TrainConfig":
        """The preset's recipe with the ``overrides`` that are not None (unset CLI options)."""
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **values)


# -- processes ------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    torch.distributed.init_process_group(backend=dist_backend())
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def param_digest(model: nn.Module) -> str:
    """SHA-256 of all parameters and buffers: DDP ranks must hold identical models."""
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(t.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def gather_digests(model: nn.Module, dist: Dist) -> list[str]:
    """Every rank's ``param_digest``, in rank order (written to metrics.jsonl as the proof)."""
    mine = param_digest(model)
    if dist.world == 1:
        return [mine]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, mine)
    return out


# -- checks: configuration + manifest -> run ------------------------------------------------
def check_data(shards: str, manifest: Manifest, config: TrainConfig) -> None:
    """The shards hold train and holdout splits, and a key-safe crop fits their blocks and size."""
    if "train" not in manifest.splits or "holdout" not in manifest.splits:
        raise KeyshardError(f"{shards}: needs train and holdout splits (encrypt with the splits train and holdout)")
    m, size = manifest.encryption.block_size or 1, manifest.image.size
    if config.block_crop and (config.block_crop % m or not 0 < config.block_crop <= size):
        raise KeyshardError(f"`block_crop` {config.block_crop} must be a multiple of the block size {m} "
                            f"and at most the image size {size}")


def resolve_task(config: TrainConfig, manifest: Manifest, shards: str, world: int) -> tuple[str, TrainConfig]:
    """The task comes from the manifest; ``config.task``, if given, must agree.  The model must be
    one the task's factory builds: a preset's model that is not (the presets name segmentation
    models) is swapped for the task's own (``Task.preset_models``: classification's patch_vit with
    demo, resnet18 with paper).  Settings another task owns (``Task.own_settings``) are refused."""
    task = tasks.for_kind(manifest.dataset.kind)
    if config.task is not None and config.task != task.name:
        raise KeyshardError(f"`task={config.task}`, but {shards} holds {task.name} data "
                            f"(dataset kind {manifest.dataset.kind})")
    config = _task_model(config, task, shards)
    for other in (tasks.get(name) for name in tasks.names() if name != task.name):
        if any(getattr(config, setting) not in (None, False) for setting in other.own_settings):
            owned = "/".join(f"`{setting}`" for setting in other.own_settings)
            raise KeyshardError(f"{owned} {'is' if len(other.own_settings) == 1 else 'are'} for {other.name} shards")
    if config.train_fraction is not None and world > 1:
        raise KeyshardError("`train_fraction` runs on one process")
    return task.name, config


def _task_model(config: TrainConfig, task: tasks.Task, shards: str) -> TrainConfig:
    """``config`` with a model of ``task``: the preset's model swapped for the task's preset model
    where it has one; another task's model refused (a name no task knows is the factory's to refuse)."""
    models = task.hook("model_names")
    if config.model in models:
        return config
    if task.preset_models and config.model == PRESETS[config.preset]["model"]:
        return replace(config, model=task.hook("preset_models")[config.preset])
    owner = next((t for t in map(tasks.get, tasks.names()) if config.model in t.hook("model_names")), None)
    if owner is None:
        return config
    raise KeyshardError(f"`model={config.model}` is a {owner.model_noun}, but {shards} holds {task.name} data; "
                        f"choose {', '.join(models)}")


def model_block_size(config: TrainConfig, manifest: Manifest) -> int | None:
    """Block size a block-aligned model is built for: the shards' key, or ``config.block_size``
    on plain shards."""
    data_m, flag_m = manifest.encryption.block_size, config.block_size
    if data_m is not None and flag_m is not None and flag_m != data_m:
        raise KeyshardError(f"`block_size={flag_m}` disagrees with the shards' key (M={data_m}); "
                            "on keyed shards the manifest decides")
    m = data_m or flag_m
    if config.model in BLOCK_MODELS and m is None:
        raise KeyshardError(f"`model={config.model}` on plain shards needs `block_size` "
                            "(the block size M of the key it will be used with)")
    if m is not None and manifest.image.size % m:
        raise KeyshardError(f"block size {m} does not divide the image size {manifest.image.size}")
    return m


def batch_split(config: TrainConfig, world: int) -> tuple[int, int]:
    """Per-rank batch and micro-batch: ``batch_size`` is global (divided over the ranks, each
    accumulating micro-batches of at most ``micro_batch``); BatchNorm sees one micro-batch."""
    rank_batch = config.batch_size // world if config.global_batch else config.batch_size
    if config.global_batch and config.batch_size % world:
        raise KeyshardError(f"`batch_size` {config.batch_size} (global) is not a multiple of the {world} ranks")
    micro = min(config.micro_batch, rank_batch)
    if rank_batch % micro:
        raise KeyshardError(f"`batch_size` {config.batch_size} must be a multiple of {world} rank(s) × "
                            f"`micro_batch` {micro} = {world * micro}")
    return rank_batch, micro


def resume_state(out: Path, config: TrainConfig, data: dict, provenance: Provenance) -> tuple[dict, TrainConfig]:
    """``out/last.pt`` and the configuration to continue with: the same data, manifest and
    settings (only epochs and workers may change), and the batch meaning the run was saved with."""
    last = out / "last.pt"
    state = checkpoint.load(last, resume=True)
    if not checkpoint.same_data(state["data"], data):
        raise KeyshardError(f"{last}: was trained on other shards (key fingerprint/method/block size differ)")
    checkpoint.check_resume_provenance(state, provenance, last)
    free = ("epochs", "workers")  # may change on resume without changing the result
    saved = {"global_batch": False, **state["config"]}  # older runs: per-process batches
    config = replace(config, global_batch=saved["global_batch"])
    old = {k: v for k, v in saved.items() if k not in free}
    new = {k: v for k, v in asdict(config).items() if k not in free}
    changed = sorted(k for k in new if old.get(k) != new[k])
    if changed:
        raise KeyshardError(f"{last}: resume needs the same settings; differs in {', '.join(changed)}")
    return state, config


def create_run_dir(out: Path, main: bool) -> None:
    """A new run needs an empty or absent directory; rank 0 creates it."""
    if out.exists() and any(out.iterdir()):
        raise KeyshardError(f"{out}: exists and is not empty (`resume=True` continues a run there)")
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyshardError(f"{out}: cannot create run directory ({exc.strerror})") from None


# -- building -------------------------------------------------------------------------------
def build_training_model(config: TrainConfig, task: str, manifest: Manifest, model_block: int | None,
                         device) -> nn.Module:
    """The task's model (its ``Task.model`` factory) on ``device`` (channels_last when asked),
    from ``config.weights`` if given."""
    build = tasks.get(task).hook("model")
    model = build(config.model, num_classes=manifest.dataset.num_classes, block_size=model_block,
                  image_size=manifest.image.size, weights=config.weights, aux_loss=config.aux_weight > 0)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def build_optimizer(model: nn.Module, config: TrainConfig, device):
    """SGD with cosine warm restarts (the paper's recipe), and the AMP loss scaler (CUDA only)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.restart_epochs, eta_min=config.min_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    return optimizer, scheduler, scaler


def wrap_ddp(model: nn.Module, dist: Dist, device) -> nn.Module:
    """The module the training steps run: DDP around ``model`` under torchrun, else ``model``."""
    if dist.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# -- the run's state --------------------------------------------------------------------------
class Trainer:
    """A run's state, built in the order below (each step may refuse the run with one line):
    the processes and device, the trusted manifest, the checks, the run directory (new, or
    ``last.pt`` to resume), the seeded model, optimiser, scheduler and scaler.  ``fit()`` trains.

    ``trust``: a public signing key; the manifest's signature must verify (``keyshard/signing.py``).
    """

    def __init__(self, shards: str, out: str, config: TrainConfig, resume: bool = False,
                 progress: bool = True, log=print, trust: str | None = None):
        self.shards, self.out, self.progress, self.log = str(shards), Path(out), progress, log
        self.dist = setup_distributed()
        self.device = pick_device(self.dist.local_rank)
        self.manifest = read(self.shards, trust)  # read once; everything below takes this object
        self.data = checkpoint.data_identity(self.manifest)
        check_data(self.shards, self.manifest, config)
        self.task, config = resolve_task(config, self.manifest, self.shards, self.dist.world)
        self.loss_fn = tasks.get(self.task).hook("loss")  # resolved once, not per step
        self.model_block = model_block_size(config, self.manifest)
        self.start_epoch, self.history, self.best_loss = 0, [], math.inf
        self.loaders = {}  # split -> its ShardLoader, workers kept across epochs
        previous = None
        if resume:  # a resumed run keeps the batch meaning it was saved with
            previous, config = resume_state(self.out, config, self.data, self.manifest.provenance)
        else:
            create_run_dir(self.out, self.dist.main)
        self.cfg = config
        self.rank_batch, self.micro_batch = batch_split(config, self.dist.world)
        torch.manual_seed(config.seed)
        self.model = build_training_model(config, self.task, self.manifest, self.model_block, self.device)
        self.optimizer, self.scheduler, self.scaler = build_optimizer(self.model, config, self.device)
        if previous is not None:
            restore(self, previous)
        self.ddp = wrap_ddp(self.model, self.dist, self.device)

    def fit(self) -> dict:
        return fit(self)


def restore(run: Trainer, state: dict) -> None:
    """Continue from ``last.pt``: weights, optimiser, scheduler, RNG, metrics and best loss."""
    last = run.out / "last.pt"
    checkpoint.fit_state_dict(run.model, state["model"], last, f"model weights for {run.cfg.model}")
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # a damaged or hand-made last.pt
        raise KeyshardError(f"{last}: optimizer, scheduler or RNG state does not fit this run "
                            f"({type(exc).__name__})") from None
    run.start_epoch = state["epoch"] + 1
    run.history = list(state["metrics"])
    run.best_loss = state["best_holdout_loss"]


# -- one epoch --------------------------------------------------------------------------------
def epoch_batches(run: Trainer, split: str, epoch: int, shuffle: bool):
    """The split's loader (one per split, its workers kept across epochs), set to ``epoch``."""
    loader = run.loaders.get(split)
    if loader is None:
        cfg, augment = run.cfg, None
        if split == "train" and (cfg.block_flip or cfg.block_crop):
            augment = KeySafeAugment(run.manifest.encryption.block_size or 1, cfg.block_flip, cfg.block_crop,
                                     cfg.seed)
        loader = open_shards(run.shards, split, batch_size=run.rank_batch, seed=cfg.seed, workers=cfg.workers,
                             shuffle_buffer=cfg.shuffle_buffer, rank=run.dist.rank, world=run.dist.world,
                             augment=augment, shuffle=shuffle, manifest=run.manifest)
        if split == "train" and cfg.train_fraction is not None:
            from keyshard.train.classify import subset_filter

            loader.set_keep(subset_filter(cfg.train_fraction, cfg.seed))
        run.loaders[split] = loader
    loader.set_epoch(epoch)
    return loader.plan, loader


def forward(run: Trainer, pixels, model=None):
    """``model`` (default: the DDP-wrapped one) on stored pixels, as every step runs it."""
    return forward_stored(model or run.ddp, pixels, run.manifest, run.device, run.cfg.channels_last, run.cfg.amp)


def train_one_epoch(run: Trainer, epoch: int) -> dict:
    """One pass over this rank's train batches, stepping the scheduler within the epoch; the
    statistics summed over the ranks."""
    from tqdm import tqdm

    run.ddp.train()
    world = run.dist.world
    plan, batches = epoch_batches(run, "train", epoch, shuffle=True)
    steps = math.ceil(plan.target / run.rank_batch)
    loss_sum = pixels_sum = 0.0
    padding = skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(total=plan.target * world, desc=f"epoch {epoch + 1}/{run.cfg.epochs}",
               unit="img", disable=not (run.progress and run.dist.main), file=sys.stderr)
    for step, (pixels, masks, _, n_pad) in enumerate(batches):
        batch_loss, valid = train_step(run.ddp, run.optimizer, run.scaler, lambda x: forward(run, x), pixels,
                                       masks, n_pad, run.micro_batch, world, run.cfg.aux_weight,
                                       ignore_index=run.manifest.dataset.ignore_index,
                                       loss_fn=run.loss_fn)
        run.scheduler.step(epoch + (step + 1) / steps)  # cosine within the epoch, restarts every N
        loss_sum += batch_loss
        pixels_sum += valid / world  # summed over ranks below
        padding += n_pad
        skipped += valid == 0
        bar.update(len(pixels) * world)
        bar.set_postfix(loss=f"{world * batch_loss / max(valid, 1):.3f}")
        faults.point("train.step")
    bar.close()
    if world > 1:  # DDP broadcasts rank 0's BatchNorm buffers at each forward; end there too
        for buffer in run.model.buffers():
            torch.distributed.broadcast(buffer, 0)
    loss_sum, pixels_sum, padding, samples = all_reduce_sum(
        [loss_sum, pixels_sum, padding, plan.samples], world, run.device)
    elapsed = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(pixels_sum, 1), "train_samples": int(samples),
            "train_padding": int(padding), "steps": steps, "padding_only_steps": skipped,
            "samples_per_s": samples / elapsed, "lr": run.optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(run: Trainer, epoch: int) -> float:
    """The holdout loss: summed cross-entropy over the real rows' valid pixels, over all ranks."""
    run.ddp.eval()
    _, batches = epoch_batches(run, "holdout", epoch, shuffle=False)
    ignore, loss_fn = run.manifest.dataset.ignore_index, run.loss_fn
    loss_sum = pixels_sum = 0.0
    for pixels, masks, _, n_pad in batches:
        n_real = len(pixels) - n_pad
        if not n_real:
            continue
        masks = masks[:n_real].to(run.device).long()
        out = forward(run, pixels[:n_real], run.model)  # the plain module: no DDP collectives
        loss_sum += float(loss_fn({"out": out["out"].float()}, masks, 0.0, ignore))
        pixels_sum += float((masks != (-100 if ignore is None else ignore)).sum())
    loss_sum, pixels_sum = all_reduce_sum([loss_sum, pixels_sum], run.dist.world, run.device)
    return loss_sum / max(pixels_sum, 1)


def save_epoch(run: Trainer, epoch: int, stats: dict, improved: bool) -> None:
    """``last.pt`` (and ``best.pt`` when the holdout loss improved), then the epoch's metrics line."""
    state = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(),
        "epoch": epoch, "model_name": run.cfg.model, "model_block_size": run.model_block,
        "config": asdict(run.cfg),
        "metrics": run.history, "best_holdout_loss": run.best_loss, "data": run.data,
        "manifest": run.manifest.provenance.record(),
        "world_size": run.dist.world,
    }
    checkpoint.save(run.out / "last.pt", state)
    if improved:
        checkpoint.save(run.out / "best.pt", state)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(stats) + "\n")


# -- the run ----------------------------------------------------------------------------------
def log_start(run: Trainer) -> None:
    """What is trained on what, how the batch is split, and the paper preset's augmentation warning."""
    cfg, enc, world = run.cfg, run.manifest.encryption, run.dist.world
    mode = ("plain images" if enc.plain
            else f"{enc.method} M={enc.block_size} key {enc.key_fingerprint[:16]}…")
    init = f"weights from {cfg.weights}" if cfg.weights else "from scratch (no --weights given)"
    run.log(f"training {cfg.model} on {mode}, {init}, {world} process(es) on {run.device}")
    kind = "global" if cfg.global_batch else "per process (saved run)"
    run.log(f"batch {cfg.batch_size} {kind}: {run.rank_batch} per rank × {world} rank(s), "
            f"micro-batches of {run.micro_batch} — BatchNorm sees {run.micro_batch} images at a time")
    if cfg.preset == "paper" and not enc.plain and not run.manifest.augmentation.copies:
        run.log("warning: the paper augments every epoch (random resized crop + horizontal flip), but "
                "these keyed shards have no augmentation replicas; re-encrypt with --augment-copies R "
                "(e.g. 9: each epoch reads one of R+1 views, the resized crops made before encryption)")


def log_epoch(run: Trainer, stats: dict, improved: bool) -> None:
    run.log(f"epoch {stats['epoch']}/{run.cfg.epochs}: train loss {stats['train_loss']:.4f}, "
            f"holdout loss {stats['holdout_loss']:.4f}{' (best)' if improved else ''}, "
            f"{stats['samples_per_s']:.1f} samples/s, lr {stats['lr']:.4g}"
            + (f", padding {stats['train_padding']}" if stats["train_padding"] else ""))


def fit(run: Trainer) -> dict:
    """Train from ``run.start_epoch`` to ``cfg.epochs``: an epoch, its holdout loss, its checkpoint;
    then every rank's parameter digest, and the process group closed."""
    if run.dist.main:
        log_start(run)
    for epoch in range(run.start_epoch, run.cfg.epochs):
        stats = train_one_epoch(run, epoch)
        stats["holdout_loss"] = evaluate(run, epoch)
        stats["epoch"] = epoch + 1
        run.history.append(stats)
        improved = stats["holdout_loss"] < run.best_loss
        if improved:
            run.best_loss = stats["holdout_loss"]
        if run.dist.main:
            save_epoch(run, epoch, stats, improved)
            log_epoch(run, stats, improved)
    digests = gather_digests(run.model, run.dist)
    if run.dist.main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"final": True, "rank_param_sha256": digests}) + "\n")
    if run.dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"history": run.history, "best_holdout_loss": run.best_loss, "rank_param_sha256": digests}
