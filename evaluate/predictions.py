"""``evaluate --save-predictions N``: the paper's Fig. 5 for the first N test images.

The audit fills a ``Capture`` during the passes it makes anyway (``audit.score_on_split``): the
first N images in manifest order, the model's input, its prediction and that image's mIoU for the
correct key and plain images (first pass) and for the first random wrong key (whichever pass
scores it).  Nothing is re-read or re-run, and only N images are kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from keyshard.figures import colorize, display_pixels, grid_png

class Capture:
    """The first ``n`` test images as the audit sees them, for ``predictions.png``."""

    def __init__(self, n: int):
        self.n = n
        self.ids: list[str] = []
        self.images: list[np.ndarray] = []   # plain pixels, H×W×3 uint8
        self.labels: list[np.ndarray] = []   # ground truth, H×W uint8
        self.panels: dict[str, dict] = {}    # condition → {"input", "pred", "miou"} lists
        self.wrong_fingerprint: str | None = None
        self.ignore_index: int | None = None  # the dataset's unlabelled value, drawn in VOC's void colour

    def wants(self, start: int) -> bool:
        """Whether a batch starting at real image ``start`` holds an image still to capture."""
        return start < self.n

    def add_images(self, start: int, ids, pixels, masks, ignore_index: int | None = None) -> None:
        """Plain pixels and labels of a batch's real rows (kept once, from the first pass)."""
        if len(self.ids) != start or start >= self.n:
            return
        self.ignore_index = ignore_index
        take = min(self.n - start, len(ids))
        self.ids += [str(i) for i in ids[:take]]
        self.images += list(pixels[:take].cpu().numpy())
        self.labels += list(masks[:take].cpu().numpy())

    def add(self, name: str, start: int, inputs, divisor: int, preds, mious) -> None:
        """One condition's model input (for display), prediction and per-image mIoU."""
        panel = self.panels.setdefault(name, {"input": [], "pred": [], "miou": []})
        if len(panel["pred"]) != start or start >= self.n:
            return
        take = min(self.n - start, len(preds))
        panel["input"] += list(display_pixels(inputs[:take], divisor))
        panel["pred"] += list(preds[:take].to("cpu", torch.uint8).numpy())
        panel["miou"] += [float(v) for v in mious[:take].cpu()]

    def record(self) -> dict:
        """What audit.json says about the figure."""
        out = {"file": "predictions.png", "images": len(self.ids), "ids": list(self.ids)}
        if self.wrong_fingerprint is not None:
            out["wrong_key_fingerprint"] = self.wrong_fingerprint
        return out


def _caption(miou: float) -> str:
    return "no labelled pixel" if math.isnan(miou) else f"mIoU {miou:.3f}"


def figure_png(capture: Capture, audit: dict) -> bytes:
    """Fig. 5 as PNG bytes: one row per image — for a keyed audit the plain image, the model's
    input with the correct key (FFX codes scaled to 0–255), the ground truth, and the predictions
    with the correct key, plain images and one wrong key, each captioned with its per-image mIoU;
    for a baseline audit the image, the ground truth and the prediction."""
    n = len(capture.ids)
    if audit.get("kind") == "baseline":
        cols = ["image", "ground truth", "prediction"]
        plain = capture.panels["plain"]
        rows = [[(capture.images[i], None), (colorize(capture.labels[i], capture.ignore_index), None),
                 (colorize(plain["pred"][i]), _caption(plain["miou"][i]))] for i in range(n)]
        title = f"{audit['checkpoint']['model']} trained on plain images"
    else:
        k = audit["key"]
        cols = ["image", "model input\n(correct key)", "ground truth", "prediction\ncorrect key",
                "prediction\nplain image", "prediction\nwrong key"]
        rows = []
        for i in range(n):
            row = [(capture.images[i], None), (capture.panels["correct"]["input"][i], None),
                   (colorize(capture.labels[i], capture.ignore_index), None)]
            for name in ("correct", "plain", "wrong"):
                p = capture.panels.get(name)
                row.append(None if p is None or i >= len(p["pred"]) else (colorize(p["pred"][i]), _caption(p["miou"][i])))
            rows.append(row)
        title = f"{k['method'].upper()} M={k['block_size']}, {audit['checkpoint']['model']}"
        if capture.wrong_fingerprint:
            title += f"; wrong key {capture.wrong_fingerprint[:12]}..."
    title += ": per-image mIoU under each prediction"
    return grid_png(rows, col_labels=cols, row_labels=list(capture.ids), title=title)
