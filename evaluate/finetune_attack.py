"""The fine-tuning attack (the threat of the transfer-learning paper): a thief fine-tunes the
protected model on a little plain labelled data and compares it with training from scratch on
the same data.  If the stolen weights give a large head start, the key did not protect the
knowledge in them for that setting.

The subsets are small, so they are held in memory and trained with a short loop that reuses the
trainer's loss and model builder; the test split is scored with the audit's scorer.
"""

from __future__ import annotations

import torch

from keyshard import params, seeded
from keyshard.errors import KeyshardError
from keyshard.evaluate.audit import score_on_split, test_batches
from keyshard.manifest import Manifest, read
from keyshard.shardformat import VOID
from keyshard.train.data import epoch_plan
from keyshard.train.step import segmentation_loss
from keyshard.train.device import pick_device
from keyshard.train.models import build_model
from keyshard.transforms import normalize_pixels


def load_subset(shard_dir, manifest: Manifest, fraction: float, seed: int):
    """The first round(fraction·n) (≥1) train ids by sha256('<seed>|<key>'), as tensors."""
    samples = [(k, px, mk) for pxs, mks, ks, _ in test_batches(shard_dir, manifest, 64, split="train")
               for k, px, mk in zip(ks, pxs, mks.long())]
    samples = seeded.ranked(samples, seed, key=lambda s: s[0])
    n = max(1, round(fraction * len(samples)))
    chosen = samples[:n]
    return torch.stack([s[1] for s in chosen]), torch.stack([s[2] for s in chosen])


def fit(model, pixels, masks, epochs: int, lr: float, batch: int, seed: int, device,
        ignore_index: int | None = VOID) -> None:
    """SGD (momentum 0.9) on in-memory plain pixels, shuffled per epoch from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            m = masks[idx].to(device)
            out = model(normalize_pixels(pixels[idx].to(device), 255))
            loss = segmentation_loss(out, m, 0.0, ignore_index) / max(int((m != ignore_index).sum()), 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def run(ckpt_path: str, train_dir: str, test_dir: str, fractions: list[float], epochs: int, lr: float,
        batch: int, seed: int, progress: bool = True) -> dict:
    from keyshard.evaluate.audit import check_dataset
    from keyshard.train.checkpoint import dataset_of, load_model

    device = pick_device()
    stolen, state = load_model(ckpt_path, device)
    test_manifest = read(test_dir)
    if not test_manifest.encryption.plain:
        raise KeyshardError(f"{test_dir}: test shards must be plain")
    check_dataset(state, test_manifest, ckpt_path, test_dir)
    train_manifest = read(train_dir)
    if not train_manifest.encryption.plain:
        raise KeyshardError(f"{train_dir}: must hold plain shards (the attacker's labelled plain data)")
    dataset = dataset_of(state)
    before = score_on_split(stolen, [(None, 255)], test_dir, test_manifest, device, progress=False)[0]["miou"]
    rows = []
    for fraction in fractions:
        pixels, masks = load_subset(train_dir, train_manifest, fraction, seed)
        finetuned, _ = load_model(ckpt_path, device)
        fit(finetuned, pixels, masks, epochs, lr, batch, seed, device, dataset["ignore_index"])
        torch.manual_seed(seed)
        scratch = build_model(state["model_name"], block_size=state.get("model_block_size"),
                              num_classes=dataset["num_classes"]).to(device)
        fit(scratch, pixels, masks, epochs, lr, batch, seed, device, dataset["ignore_index"])
        ft, sc = (score_on_split(m, [(None, 255)], test_dir, test_manifest, device, progress=False)[0]["miou"]
                  for m in (finetuned, scratch))
        rows.append({"fraction": fraction, "images": len(pixels), "finetuned_miou": ft, "scratch_miou": sc,
                     "head_start": ft - sc, "weak": ft - sc > 0.1})
        if progress:
            print(f"fraction {fraction:g} ({len(pixels)} images): fine-tuned stolen model {ft:.4f} mIoU, "
                  f"from scratch {sc:.4f}", flush=True)
    return {"checkpoint": str(ckpt_path), "plain_miou_before": before, "epochs": epochs, "lr": lr,
            "rows": rows, "test_images": epoch_plan(test_dir, test_manifest, "test", 0, 0, shuffle=False).samples}


def parse_fractions(text: str) -> list[float]:
    """``"0.01,0.05"`` → [0.01, 0.05], each a train-subset fraction (``params.SUBSET_FRACTION``)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise KeyshardError(f"`fraction` {text!r}: expected comma-separated numbers such as 0.01,0.05,0.1")
    return [params.SUBSET_FRACTION.check(v) for v in values]
