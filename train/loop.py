"""The training loop: paper recipe or demo preset, single process or DDP (torchrun), resumable.

Method, block size, fingerprint and pixel divisor come from the shards' manifest, never from
flags.  Each epoch is one pass over the train ids (one augmentation replica); the checkpoint
with the lowest holdout loss becomes ``best.pt``, as in the paper.  Only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from keyshard.errors import KeyshardError
from keyshard.pipeline.manifest import load_trusted
from keyshard.train import checkpoint
from keyshard.train.augment import KeySafeAugment
from keyshard.shardformat import VOID, dataset_info
from keyshard.train.data import open_shards
from keyshard.train.device import dist_backend, pick_device
from keyshard.train.models import build_model
from keyshard.train.presets import CLASSIFY_MODELS, PRESETS
from keyshard.train.step import forward_stored, segmentation_loss, train_step


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small"
    epochs: int = 12
    batch_size: int = 16           # samples per optimiser step, over all ranks together (global_batch)
    micro_batch: int = 16          # most samples per forward pass and rank (gradient accumulation)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    restart_epochs: int = 10       # cosine annealing with warm restarts every N epochs
    min_lr: float = 1e-4
    aux_weight: float = 0.0        # FCN auxiliary loss weight (torchvision's recipe uses 0.5)
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
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **values)


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


def all_reduce_sum(values: list[float], dist: Dist, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


_KILL_AFTER = int(os.environ.get("KEYSHARD_TEST_KILL_AFTER_STEPS", "0") or 0)
_steps_done = 0


def _kill_hook() -> None:
    """Test hook: SIGKILL this process after N optimiser steps (``KEYSHARD_TEST_KILL_AFTER_STEPS``),
    so the kill-and-resume test dies at an exact point instead of after a sleep."""
    global _steps_done
    _steps_done += 1
    if _KILL_AFTER and _steps_done >= _KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


def param_digest(model: nn.Module) -> str:
    """SHA-256 of all parameters and buffers: DDP ranks must hold identical models."""
    sha = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(t.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


class Trainer:
    def __init__(self, shards: str, out: str, config: TrainConfig, resume: bool = False,
                 progress: bool = True, log=print, trust: str | None = None):
        self.shards, self.out, self.cfg, self.progress, self.log = str(shards), Path(out), config, progress, log
        self.dist = setup_distributed()
        self.device = pick_device(self.dist.local_rank)
        # trust: a public signing key; the manifest's signature must verify (keyshard/signing.py)
        self.manifest, self.provenance = load_trusted(self.shards, trust)
        self.data = checkpoint.data_identity(self.manifest)
        if "train" not in self.manifest["splits"]["counts"] or "holdout" not in self.manifest["splits"]["counts"]:
            raise KeyshardError(f"{self.shards}: needs train and holdout splits (encrypt --splits train,holdout,...)")
        m, size = self.data["block_size"] or 1, self.data["image_size"]
        if config.block_crop and (config.block_crop % m or not 0 < config.block_crop <= size):
            raise KeyshardError(f"--block-crop {config.block_crop} must be a multiple of the block size {m} "
                                f"and at most the image size {size}")
        self._check_task()
        self.model_block = self._model_block_size()
        self.start_epoch, self.history, self.best_loss = 0, [], math.inf
        self._loaders = {}
        previous = self._prepare_out(resume)
        config = self.cfg  # a resumed run keeps the batch meaning it was saved with
        self.rank_batch, self.micro_batch = self._batch_split()
        torch.manual_seed(config.seed)
        if self.task == "classification":
            from keyshard.train.classifiers import build_classifier

            self.model = build_classifier(config.model, dataset_info(self.manifest)["num_classes"], self.model_block,
                                          self.data["image_size"], config.weights).to(self.device)
        else:
            self.model = build_model(config.model, config.weights, aux_loss=config.aux_weight > 0,
                                     block_size=self.model_block,
                                     num_classes=self.data["dataset"]["num_classes"]).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=config.restart_epochs, eta_min=config.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and self.device.type == "cuda")
        if previous is not None:
            self._restore(previous)
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.dist.world > 1 else self.model)

    # -- set-up ----------------------------------------------------------------------------
    def _check_task(self) -> None:
        """The task comes from the manifest; --task, if given, must agree.  Classification swaps the
        preset's segmentation model for its classifier (demo: patch_vit, paper: resnet18)."""
        from keyshard.train.classifiers import CLASSIFIERS

        self.task = dataset_info(self.manifest)["task"]
        if self.cfg.task is not None and self.cfg.task != self.task:
            raise KeyshardError(f"--task {self.cfg.task}, but {self.shards} holds {self.task} data "
                                f"(dataset kind {dataset_info(self.manifest)['kind']})")
        if self.task == "classification":
            if self.cfg.model not in CLASSIFIERS:
                if self.cfg.model != PRESETS[self.cfg.preset]["model"]:
                    raise KeyshardError(f"--model {self.cfg.model} is a segmentation model; for classification "
                                        f"choose {' or '.join(CLASSIFIERS)}")
                self.cfg = replace(self.cfg, model=CLASSIFY_MODELS[self.cfg.preset])
            if self.cfg.block_flip or self.cfg.block_crop:
                raise KeyshardError("--block-flip/--block-crop are for segmentation shards")
        else:
            if self.cfg.model in CLASSIFIERS:
                raise KeyshardError(f"--model {self.cfg.model} is a classifier, but {self.shards} holds segmentation data")
            if self.cfg.train_fraction is not None:
                raise KeyshardError("--train-fraction is for classification shards")
        if self.cfg.train_fraction is not None and self.dist.world > 1:
            raise KeyshardError("--train-fraction runs on one process")

    def _model_block_size(self) -> int | None:
        """Block size a block-aligned model is built for: the shards' key, or --block-size on plain shards."""
        data_m, flag_m = self.data["block_size"], self.cfg.block_size
        if data_m is not None and flag_m is not None and flag_m != data_m:
            raise KeyshardError(f"--block-size {flag_m} disagrees with the shards' key (M={data_m}); "
                                "on keyed shards the manifest decides")
        m = data_m or flag_m
        if self.cfg.model == "patch_vit" and m is None:
            raise KeyshardError("--model patch_vit on plain shards needs --block-size M (the key it will be used with)")
        if self.cfg.model == "block_aligned" and m is None:
            raise KeyshardError("--model block_aligned on plain shards needs --block-size M (the key it will be used with)")
        if m is not None and self.data["image_size"] % m:
            raise KeyshardError(f"block size {m} does not divide the image size {self.data['image_size']}")
        return m

    def _batch_split(self) -> tuple[int, int]:
        """Per-rank batch and micro-batch: --batch-size is global (divided over the ranks, each
        accumulating micro-batches of at most --micro-batch); BatchNorm sees one micro-batch."""
        cfg, world = self.cfg, self.dist.world
        rank_batch = cfg.batch_size // world if cfg.global_batch else cfg.batch_size
        if cfg.global_batch and cfg.batch_size % world:
            raise KeyshardError(f"--batch-size {cfg.batch_size} (global) is not a multiple of the {world} ranks")
        micro = min(cfg.micro_batch, rank_batch)
        if rank_batch % micro:
            raise KeyshardError(f"--batch-size {cfg.batch_size} must be a multiple of {world} rank(s) × "
                                f"--micro-batch {micro} = {world * micro}")
        return rank_batch, micro

    def _prepare_out(self, resume: bool):
        last = self.out / "last.pt"
        if resume:
            state = checkpoint.load(last, resume=True)
            if not checkpoint.same_data(state["data"], self.data):
                raise KeyshardError(f"{last}: was trained on other shards (key fingerprint/method/block size differ)")
            checkpoint.check_resume_provenance(state, self.provenance, last)
            free = ("epochs", "workers")  # may change on resume without changing the result
            saved = {"global_batch": False, **state["config"]}  # older runs: per-process batches
            self.cfg = replace(self.cfg, global_batch=saved["global_batch"])
            old = {k: v for k, v in saved.items() if k not in free}
            new = {k: v for k, v in asdict(self.cfg).items() if k not in free}
            changed = sorted(k for k in new if old.get(k) != new[k])
            if changed:
                raise KeyshardError(f"{last}: resume needs the same settings; differs in {', '.join(changed)}")
            return state
        if self.out.exists() and any(self.out.iterdir()):
            raise KeyshardError(f"{self.out}: exists and is not empty (use --resume to continue a run there)")
        if self.dist.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise KeyshardError(f"{self.out}: cannot create run directory ({exc.strerror})") from None
        return None

    def _restore(self, state: dict) -> None:
        last = self.out / "last.pt"
        checkpoint.fit_state_dict(self.model, state["model"], last, f"model weights for {self.cfg.model}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # a damaged or hand-made last.pt
            raise KeyshardError(f"{last}: optimizer, scheduler or RNG state does not fit this run "
                                f"({type(exc).__name__})") from None
        self.start_epoch = state["epoch"] + 1
        self.history = list(state["metrics"])
        self.best_loss = state["best_holdout_loss"]

    # -- one epoch --------------------------------------------------------------------------
    def _batches(self, split: str, epoch: int, shuffle: bool):
        """The split's loader (one per split, its workers kept across epochs), set to ``epoch``."""
        loader = self._loaders.get(split)
        if loader is None:
            augment = None
            if split == "train" and (self.cfg.block_flip or self.cfg.block_crop):
                augment = KeySafeAugment(self.data["block_size"] or 1, self.cfg.block_flip, self.cfg.block_crop,
                                         self.cfg.seed)
            loader = open_shards(self.shards, split, batch_size=self.rank_batch, seed=self.cfg.seed,
                                 workers=self.cfg.workers, shuffle_buffer=self.cfg.shuffle_buffer,
                                 rank=self.dist.rank, world=self.dist.world, augment=augment, shuffle=shuffle,
                                 manifest=self.manifest)
            if split == "train" and self.cfg.train_fraction is not None:
                from keyshard.train.classify import subset_filter

                loader.set_keep(subset_filter(self.cfg.train_fraction, self.cfg.seed))
            self._loaders[split] = loader
        loader.set_epoch(epoch)
        return loader.plan, loader

    def _forward(self, pixels, model=None):
        return forward_stored(model or self.ddp, pixels, self.manifest, self.device, self.cfg.channels_last,
                              self.cfg.amp)

    def train_epoch(self, epoch: int) -> dict:
        from tqdm import tqdm

        self.ddp.train()
        plan, batches = self._batches("train", epoch, shuffle=True)
        steps = math.ceil(plan.target / self.rank_batch)
        loss_sum = pixels_sum = 0.0
        padding = skipped = 0
        t0 = time.perf_counter()
        bar = tqdm(total=plan.target * self.dist.world, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   unit="img", disable=not (self.progress and self.dist.main), file=sys.stderr)
        for step, (pixels, masks, _, n_pad) in enumerate(batches):
            batch_loss, valid = train_step(self.ddp, self.optimizer, self.scaler, self._forward, pixels, masks,
                                           n_pad, self.micro_batch, self.dist.world, self.cfg.aux_weight,
                                           ignore_index=self.data["dataset"]["ignore_index"])
            self.scheduler.step(epoch + (step + 1) / steps)  # cosine within the epoch, restarts every N
            loss_sum += batch_loss
            pixels_sum += valid / self.dist.world  # summed over ranks below
            padding += n_pad
            skipped += valid == 0
            bar.update(len(pixels) * self.dist.world)
            bar.set_postfix(loss=f"{self.dist.world * batch_loss / max(valid, 1):.3f}")
            _kill_hook()
        bar.close()
        if self.dist.world > 1:  # DDP broadcasts rank 0's BatchNorm buffers at each forward; end there too
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)
        loss_sum, pixels_sum, padding, samples = all_reduce_sum(
            [loss_sum, pixels_sum, padding, plan.samples], self.dist, self.device)
        elapsed = time.perf_counter() - t0
        return {"train_loss": loss_sum / max(pixels_sum, 1), "train_samples": int(samples),
                "train_padding": int(padding), "steps": steps, "padding_only_steps": skipped,
                "samples_per_s": samples / elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def holdout_loss(self, epoch: int) -> float:
        self.ddp.eval()
        _, batches = self._batches("holdout", epoch, shuffle=False)
        loss_sum = pixels_sum = 0.0
        for pixels, masks, _, n_pad in batches:
            n_real = len(pixels) - n_pad
            if not n_real:
                continue
            masks = masks[:n_real].to(self.device).long()
            out = self._forward(pixels[:n_real], self.model)  # the plain module: no DDP collectives
            ignore = self.data["dataset"]["ignore_index"]
            loss_sum += float(segmentation_loss({"out": out["out"].float()}, masks, 0.0, ignore))
            pixels_sum += float((masks != (-100 if ignore is None else ignore)).sum())
        loss_sum, pixels_sum = all_reduce_sum([loss_sum, pixels_sum], self.dist, self.device)
        return loss_sum / max(pixels_sum, 1)

    # -- driver -----------------------------------------------------------------------------
    def fit(self) -> dict:
        if self.dist.main:
            mode = "plain images" if self.data["plain"] else f"{self.data['method']} M={self.data['block_size']} key {self.data['key_fingerprint'][:16]}…"
            init = f"weights from {self.cfg.weights}" if self.cfg.weights else "from scratch (no --weights given)"
            self.log(f"training {self.cfg.model} on {mode}, {init}, {self.dist.world} process(es) on {self.device}")
            kind = "global" if self.cfg.global_batch else "per process (saved run)"
            self.log(f"batch {self.cfg.batch_size} {kind}: {self.rank_batch} per rank × {self.dist.world} rank(s), "
                     f"micro-batches of {self.micro_batch} — BatchNorm sees {self.micro_batch} images at a time")
            if self.cfg.preset == "paper" and not self.data["plain"] and not self.manifest["augmentation"]["copies"]:
                self.log("warning: the paper augments every epoch (random resized crop + horizontal flip), but "
                         "these keyed shards have no augmentation replicas; re-encrypt with --augment-copies R "
                         "(e.g. 9: each epoch reads one of R+1 views, the resized crops made before encryption)")
        for epoch in range(self.start_epoch, self.cfg.epochs):
            stats = self.train_epoch(epoch)
            stats["holdout_loss"] = self.holdout_loss(epoch)
            stats["epoch"] = epoch + 1
            self.history.append(stats)
            improved = stats["holdout_loss"] < self.best_loss
            if improved:
                self.best_loss = stats["holdout_loss"]
            if self.dist.main:
                self._write(epoch, stats, improved)
                self.log(f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {stats['train_loss']:.4f}, "
                         f"holdout loss {stats['holdout_loss']:.4f}{' (best)' if improved else ''}, "
                         f"{stats['samples_per_s']:.1f} samples/s, lr {stats['lr']:.4g}"
                         + (f", padding {stats['train_padding']}" if stats["train_padding"] else ""))
        digests = self._gather_digests()
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"final": True, "rank_param_sha256": digests}) + "\n")
        if self.dist.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return {"history": self.history, "best_holdout_loss": self.best_loss, "rank_param_sha256": digests}

    def _gather_digests(self) -> list[str]:
        mine = param_digest(self.model)
        if self.dist.world == 1:
            return [mine]
        out = [None] * self.dist.world
        torch.distributed.all_gather_object(out, mine)
        return out

    def _write(self, epoch: int, stats: dict, improved: bool) -> None:
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
            "epoch": epoch, "model_name": self.cfg.model, "model_block_size": self.model_block,
            "config": asdict(self.cfg),
            "metrics": self.history, "best_holdout_loss": self.best_loss, "data": self.data,
            "manifest": self.provenance,
            "world_size": self.dist.world,
        }
        checkpoint.save(self.out / "last.pt", state)
        if improved:
            checkpoint.save(self.out / "best.pt", state)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(stats) + "\n")
