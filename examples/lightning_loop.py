"""Train on keyshard shards with PyTorch Lightning.

    python examples/lightning_loop.py SHARDS [--epochs 3] [--batch-size 8] [--workers 2]

keyshard's loader is not a torch DataLoader: it splits shards across ranks and workers itself
and pads every rank to the same number of batches.  So the Trainer gets
use_distributed_sampler=False, and the module calls loader.set_epoch() when an epoch starts.
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F

import keyshard
from keyshard.manifest import Manifest


class ShardData(L.LightningDataModule):
    def __init__(self, source: str, batch_size: int, workers: int):
        super().__init__()
        self.source, self.batch_size, self.workers = source, batch_size, workers
        self.manifest = keyshard.read_manifest(source)

    def _open(self, split: str, **kw):
        return keyshard.open_shards(self.source, split, batch_size=self.batch_size, workers=self.workers,
                                    manifest=self.manifest, **kw)

    def train_dataloader(self):
        return self._open("train")

    def val_dataloader(self):
        return self._open("holdout", shuffle=False)


class Segmenter(L.LightningModule):
    def __init__(self, manifest: Manifest, lr: float = 0.1):
        super().__init__()
        self.manifest, self.lr = manifest, lr
        self.ignore = manifest.dataset.ignore_index  # older manifests without a dataset: VOC's 255
        def block(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*block(3, 32), *block(32, 32), torch.nn.Conv2d(32, manifest.dataset.num_classes, 1))
        self.epoch_losses = []

    def on_train_epoch_start(self):
        # Lightning only calls set_epoch on a DataLoader's sampler: tell keyshard's loader itself
        # (new shard order and shuffle, the next augmentation replica).
        self.trainer.train_dataloader.set_epoch(self.current_epoch)
        self.epoch_losses = []

    def _real(self, batch):
        pixels, targets, ids, n_padding = batch
        real = len(ids) - n_padding        # the last n_padding rows are void padding (DDP only)
        x = keyshard.model_input(pixels[:real], self.manifest, self.device)
        return x, targets[:real].long(), real

    def _loss(self, x, y):
        valid = (y != self.ignore).sum().clamp(min=1)
        return F.cross_entropy(self.net(x), y, ignore_index=self.ignore, reduction="sum") / valid

    def training_step(self, batch, batch_idx):
        x, y, real = self._real(batch)
        if real == 0:                      # a rank with only padding still joins DDP's all-reduce
            return sum(p.sum() for p in self.parameters()) * 0.0
        loss = self._loss(x, y)
        self.epoch_losses.append(loss.item())
        self.log("train_loss", loss, batch_size=real)
        return loss

    def on_train_epoch_end(self):
        mean = sum(self.epoch_losses) / max(len(self.epoch_losses), 1)
        self.print(f"epoch {self.current_epoch}: train loss {mean:.4f} ({len(self.epoch_losses)} batches)")

    def validation_step(self, batch, batch_idx):
        x, y, real = self._real(batch)
        if real:                           # padding rows count in no metric
            self.log("holdout_loss", self._loss(x, y), batch_size=real, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train on keyshard shards with PyTorch Lightning.")
    parser.add_argument("shards", help="shard directory or URL base")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: none)")
    args = parser.parse_args()

    L.seed_everything(0)
    data = ShardData(args.shards, args.batch_size, args.workers)
    model = Segmenter(data.manifest)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1,
                        use_distributed_sampler=False,  # keyshard splits shards over ranks itself
                        logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    batches = len(trainer.train_dataloader)
    print(f"trained {trainer.global_step} steps: {args.epochs} epochs of {batches} batches")


if __name__ == "__main__":
    main()
