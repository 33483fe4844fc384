"""Segmentation metrics from one confusion matrix accumulated over the whole split.

mIoU is the mean IoU over the classes that occur in the labels *or* the predictions (a class
absent from both is undefined and left out — torchvision's reference gives NaN for it,
torchmetrics' macro average drops it; on full VOC val every class occurs and the definitions
agree).  Pixels labelled 255 (void) are ignored.
"""

from __future__ import annotations

import torch

from keyshard.shardformat import NUM_CLASSES, VOID


class Confusion:
    """A 21×21 int64 confusion matrix (rows: label, columns: prediction) on any device."""

    def __init__(self, device="cpu", num_classes: int = NUM_CLASSES):
        self.n = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        keep = label != VOID
        idx = label[keep].long() * self.n + pred[keep].long()
        self.matrix += torch.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n)

    def scores(self) -> dict:
        m = self.matrix.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "per_class_iou": [None if v != v else round(float(v), 6) for v in iou],
            "pixels": int(total),
        }
