"""Audit metrics: segmentation's from one confusion matrix accumulated over the whole split, and
each task's scorer (``SegmentationScorer``, ``TopOneScorer``), which the one audit loop feeds.

mIoU is the mean IoU over the classes that occur in the labels *or* the predictions (a class
absent from both is undefined and left out — torchvision's reference gives NaN for it,
torchmetrics' macro average drops it; on full VOC val every class occurs and the definitions
agree).  Pixels labelled 255 (void) are ignored.

The same definition applied to one image gives its *per-image* mIoU (the classes present in that
image's labels or its prediction at labelled pixels); ``per_image_miou`` computes it for a whole
batch from one ``bincount`` over ``image * C² + label * C + prediction``, without a Python loop
per image.  An image with no labelled pixel has no per-image mIoU (NaN): callers skip and count
it.  The dataset-level mIoU (one matrix summed over the split) and the mean of the per-image
mIoUs are different aggregations and can differ a lot; the audit reports both.
"""

from __future__ import annotations

import torch

from keyshard.shardformat import NUM_CLASSES, VOID


class Confusion:
    """A K×K int64 confusion matrix (rows: label, columns: prediction) on any device; pixels
    labelled ``ignore_index`` are left out.  K and the ignore index are the dataset's
    (``shardformat.dataset_info``); the defaults are VOC's (21, 255)."""

    def __init__(self, device="cpu", num_classes: int = NUM_CLASSES, ignore_index: int | None = VOID):
        self.n, self.ignore = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        keep = label != self.ignore if self.ignore is not None else torch.ones_like(label, dtype=torch.bool)
        idx = label[keep].long() * self.n + pred[keep].long()
        self.matrix += torch.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n)

    def update_images(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``update`` for a batch (B×H×W) that also returns each image's mIoU (float64, on the
        device; NaN for an image without a labelled pixel).  The matrix gains exactly what
        ``update`` would add: the sum of the per-image matrices."""
        per = image_confusions(pred, label, self.n, self.ignore)
        self.matrix += per.sum(0)
        return miou_of(per)

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


def image_confusions(pred: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES,
                     ignore_index: int | None = VOID) -> torch.Tensor:
    """One confusion matrix per image of a batch (B×H×W predictions and labels, void ignored):
    B×C×C int64, from a single ``bincount`` over ``image * C² + label * C + prediction``."""
    n, b = num_classes, pred.shape[0]
    keep = label != ignore_index if ignore_index is not None else torch.ones_like(label, dtype=torch.bool)
    image = torch.arange(b, device=label.device).view(b, *([1] * (label.dim() - 1))).expand_as(label)
    idx = (image[keep] * n + label[keep].long()) * n + pred[keep].long()
    return torch.bincount(idx, minlength=b * n * n).reshape(b, n, n)


def miou_of(matrices: torch.Tensor) -> torch.Tensor:
    """The project's mIoU of each matrix of a (..., C, C) stack: the mean IoU over the classes
    present in the labels or the predictions; NaN where the matrix is empty (no labelled pixel)."""
    m = matrices.double()
    tp = m.diagonal(dim1=-2, dim2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    return iou.sum(-1) / present.sum(-1)  # 0 / 0 = NaN for an empty matrix


def per_image_miou(pred: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES,
                   ignore_index: int | None = VOID) -> torch.Tensor:
    """Each image's mIoU (B float64; NaN for an image with no labelled pixel)."""
    return miou_of(image_confusions(pred, label, num_classes, ignore_index))


class PerImage:
    """Per-image mIoUs of one condition over a split: their mean (images without a labelled pixel
    skipped and counted) and, with ``keep``, the list of (id, mIoU).  Sums stay on the device, so
    nothing is copied to the host per batch unless the list is kept."""

    def __init__(self, device="cpu", keep: bool = False):
        self.keep = keep
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.scored = torch.zeros((), dtype=torch.int64, device=device)
        self.images = 0
        self._ids: list[str] = []
        self._values: list[torch.Tensor] = []

    def add(self, mious: torch.Tensor, ids) -> None:
        """``mious``: the batch's per-image mIoUs (real rows only, NaN = no labelled pixel)."""
        ok = ~torch.isnan(mious)
        self.total += torch.where(ok, mious, torch.zeros_like(mious)).sum()
        self.scored += ok.sum()
        self.images += len(mious)
        if self.keep:
            self._ids += list(ids)
            self._values.append(mious.detach())

    def scores(self) -> dict:
        scored = int(self.scored)
        out = {"miou_per_image_mean": float(self.total) / scored if scored else None,
               "images_scored": scored, "images_unlabelled": self.images - scored}
        if self.keep:
            values = torch.cat(self._values).cpu().tolist() if self._values else []
            out["per_image"] = [{"id": i, "miou": v} for i, v in zip(self._ids, values) if v == v]
        return out


# -- scorers: what the audit loop (``audit.score_on_split``) accumulates per condition ------------
# A task names its scorer (``keyshard/tasks/``: ``Task.scorer``); every scorer takes
# ``(device, num_classes, ignore_index, keep_per_image)``, is given each batch's predictions and
# targets (real rows only) with ``add`` and reports with ``scores()``.


class SegmentationScorer:
    """One condition's segmentation scores over a split: the dataset-level confusion matrix
    (``Confusion``) and the per-image mIoUs (``PerImage``), both from one batched ``bincount``."""

    def __init__(self, device, num_classes: int, ignore_index: int | None, keep_per_image: bool = False):
        self.confusion = Confusion(device, num_classes, ignore_index)
        self.per_image = PerImage(device, keep=keep_per_image)

    def add(self, pred: torch.Tensor, masks: torch.Tensor, ids) -> torch.Tensor:
        """Adds a batch; returns each image's mIoU (for the predictions figure)."""
        mious = self.confusion.update_images(pred, masks)
        self.per_image.add(mious, ids)
        return mious

    def scores(self) -> dict:
        return {**self.confusion.scores(), **self.per_image.scores()}


class TopOneScorer:
    """One condition's top-1 accuracy over a split: images whose predicted class is their label."""

    def __init__(self, device, num_classes: int, ignore_index: int | None, keep_per_image: bool = False):
        self.correct = 0
        self.images = 0

    def add(self, pred: torch.Tensor, labels: torch.Tensor, ids) -> None:
        self.correct += int((pred == labels).sum())
        self.images += len(ids)

    def scores(self) -> dict:
        return {"top1_acc": self.correct / max(self.images, 1), "correct": self.correct, "images": self.images}
