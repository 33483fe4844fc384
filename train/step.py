"""One optimiser step over a (possibly padded) batch, the same on one process and under DDP.

Padding rows (the last ``n_pad`` of a batch, added so every rank takes the same number of
steps) must change nothing, so they never reach the model:

* only the real rows are forwarded — BatchNorm's batch statistics and running buffers see
  exactly the real samples, and the loss and gradients are those of the real rows alone;
* the loss is the summed cross-entropy over valid pixels divided by the **global** count of
  valid pixels (all ranks, all micro-batches), times the world size because DDP averages
  gradients — so the update equals one over the union of every rank's real pixels;
* a global step with no valid pixel at all (every rank all padding) takes no optimiser step:
  parameters, BatchNorm buffers and optimizer state stay bit-identical;
* under DDP, a rank whose micro-batch is all padding while others have data still runs one
  forward/backward (DDP's collectives must match across ranks), in eval mode so BatchNorm
  buffers do not move, with a zero loss so it adds zero gradient.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn import functional as F

from keyshard.manifest import Manifest
from keyshard.shardformat import VOID
from keyshard.train.data import model_input


def forward_stored(model, pixels: torch.Tensor, manifest: Manifest, device: torch.device,
                   channels_last: bool = False, amp: bool = False) -> dict:
    """``model`` on stored pixels as ``train`` runs it: normalised on the device (``model_input``),
    in channels_last memory format and under autocast (CUDA only) when asked."""
    x = model_input(pixels, manifest, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        return model(x)


def segmentation_loss(outputs: dict, masks: torch.Tensor, aux_weight: float,
                      ignore_index: int | None = VOID) -> torch.Tensor:
    """Summed cross-entropy over pixels not labelled ``ignore_index`` (the dataset's,
    ``Manifest.dataset.ignore_index``; VOC's 255 by default); the caller normalises."""
    ignore = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(outputs["out"], masks, ignore_index=ignore, reduction="sum")
    if aux_weight and "aux" in outputs:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"], masks, ignore_index=ignore, reduction="sum")
    return loss


def all_reduce_sum(values: list[float], world: int, device) -> list[float]:
    """``values`` summed over the ``world`` ranks (float64; no communication on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def train_step(model, optimizer, scaler, forward, pixels, masks, n_pad: int, micro_batch: int, world: int,
               aux_weight: float = 0.0, ignore_index: int | None = VOID,
               loss_fn=None) -> tuple[float, float]:
    """Forward/backward the real rows of one batch in micro-batches, then step.

    ``model`` is the (DDP-wrapped) module, ``forward(pixels) -> outputs`` runs it on stored
    pixels; ``loss_fn``: the task's summed loss (``Task.loss``; default ``segmentation_loss``).
    Returns (summed loss over this rank's valid pixels, global valid pixel count);
    a count of 0 means no step was taken.
    """
    n_real = len(pixels) - n_pad
    masks = masks.to(next(model.parameters()).device).long()
    n_valid = float((masks[:n_real] != (-100 if ignore_index is None else ignore_index)).sum())
    total_valid = all_reduce_sum([n_valid], world, masks.device)[0]
    if total_valid == 0:
        return 0.0, 0.0
    scale = world / total_valid
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    starts = range(0, len(pixels), micro_batch)  # the same chunk count on every rank
    for i in starts:
        last = i == starts[-1]
        ctx = model.no_sync() if world > 1 and not last else nullcontext()
        end = min(i + micro_batch, n_real)
        with ctx:
            if end > i:
                out = forward(pixels[i:end])
                loss = (loss_fn or segmentation_loss)({k: v.float() for k, v in out.items()}, masks[i:end],
                                                      aux_weight, ignore_index)
                scaler.scale(loss * scale).backward()
                loss_sum += float(loss.detach())
            elif world > 1:  # keep DDP's collectives in step: no BN update, zero gradient
                model.eval()
                out = forward(pixels[i:i + 1])
                scaler.scale(sum(v.float().sum() for v in out.values()) * 0.0).backward()
                model.train()
    scaler.step(optimizer)
    scaler.update()
    return loss_sum, total_valid
