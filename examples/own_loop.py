"""Train your own segmentation model on keyshard shards with a plain PyTorch loop.

    python examples/own_loop.py SHARDS [--epochs 3] [--batch-size 8] [--workers 2]

SHARDS is what `keyshard encrypt` wrote (keyed or plain, with train and holdout splits):
a directory or a URL base (https://host/dir/, s3://bucket/prefix/).
"""

import argparse

import torch
import torch.nn.functional as F

import keyshard


def small_net(num_classes: int) -> torch.nn.Module:
    """Any model that maps N×3×H×W floats to N×K×H×W logits will do."""
    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
    return torch.nn.Sequential(*block(3, 32), *block(32, 32), torch.nn.Conv2d(32, num_classes, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description="Train on keyshard shards with your own loop.")
    parser.add_argument("shards", help="shard directory or URL base")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: none)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--no-verify", action="store_true",
                        help="do not hash shards while streaming (a trusted local disk only)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = keyshard.read_manifest(args.shards)        # checked against the schema; typed records
    enc, data = manifest.encryption, manifest.dataset     # older manifests without a dataset: VOC's
    ignore = data.ignore_index                            # void label: no loss, no metric
    print("plain images" if enc.plain else f"{enc.method} M={enc.block_size} key {enc.key_fingerprint[:16]}…")

    model = small_net(data.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    common = dict(batch_size=args.batch_size, workers=args.workers, manifest=manifest,
                  verify_stream=not args.no_verify)
    train = keyshard.open_shards(args.shards, "train", **common)
    holdout = keyshard.open_shards(args.shards, "holdout", shuffle=False, **common)

    for epoch in range(args.epochs):
        train.set_epoch(epoch)            # new shard order and shuffle; the next augmentation replica
        model.train()
        total = 0.0
        for pixels, targets, ids, n_padding in train:
            real = len(ids) - n_padding   # the last n_padding rows are void padding (DDP only)
            if real == 0:                 # a rank with only padding still joins DDP's all-reduce
                loss = sum(p.sum() for p in model.parameters()) * 0.0
            else:
                x = keyshard.model_input(pixels[:real], manifest, device)  # ÷ divisor, ImageNet norm
                y = targets[:real].to(device).long()
                valid = (y != ignore).sum().clamp(min=1)
                loss = F.cross_entropy(model(x), y, ignore_index=ignore, reduction="sum") / valid
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()

        model.eval()
        loss_sum, correct, counted = 0.0, 0, 0
        with torch.no_grad():
            for pixels, targets, ids, n_padding in holdout:
                real = len(ids) - n_padding
                if real == 0:
                    continue              # no forward pass needs to stay in step here
                logits = model(keyshard.model_input(pixels[:real], manifest, device))
                y = targets[:real].to(device).long()
                mask = y != ignore        # void pixels count nowhere
                loss_sum += F.cross_entropy(logits, y, ignore_index=ignore, reduction="sum").item()
                correct += (logits.argmax(1)[mask] == y[mask]).sum().item()
                counted += mask.sum().item()
        print(f"epoch {epoch}: train loss {total / len(train):.4f} ({len(train)} batches), "
              f"holdout loss {loss_sum / max(counted, 1):.4f}, "
              f"holdout pixel accuracy {correct / max(counted, 1):.4f}")


if __name__ == "__main__":
    main()
