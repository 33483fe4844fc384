"""Labelled image grids for ``keyshard preview`` (the paper's Fig. 4) and the audit's
``predictions.png`` (Fig. 5), composed with Pillow so every tile holds its pixels exactly (only an
integer nearest-neighbour upscale for small images): a resampling plotter would blur the M=2
block patterns the figure is there to show.
"""

from __future__ import annotations

import io
import math

import numpy as np

TILE_MIN = 128   # small images (toy data) are upscaled by an integer factor to about this size
GAP = 6
PAD = 8
FONT_SIZE = 13


def display_pixels(x, divisor: int) -> np.ndarray:
    """Stored or model-input pixels (H×W×3 or N×H×W×3, uint8 or FFX codes) → uint8 for display:
    ``round(v / divisor * 255)`` in float64, FFX codes scaled to 0–255 (for display only; identity for
    uint8 values with divisor 255)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if divisor == 255 and x.dtype == np.uint8:
        return x.copy()
    return np.clip(np.round(x.astype(np.float64) / divisor * 255), 0, 255).astype(np.uint8)


def colorize(mask, ignore_index: int | None = None) -> np.ndarray:
    """A label map (class ids) in the VOC colour palette: H×W → H×W×3 uint8.  Pixels equal to
    ``ignore_index`` (the dataset's, e.g. 10 with ``--num-classes 5 --ignore-index 10``; VOC's 255
    is already the palette's void) get VOC's void colour, not the palette's colour for that id."""
    from keyshard.shardformat import VOID, voc_palette

    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask, dtype=np.uint8)
    lut = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    out = lut[mask]
    if ignore_index is not None and ignore_index != VOID:
        out[mask == ignore_index] = lut[VOID]
    return out


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(FONT_SIZE)  # FreeType build: a scalable font
    except (TypeError, OSError):  # no FreeType: Pillow's small bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return right - left, bottom - min(top, 0)


def grid_png(rows: list[list], col_labels: list[str] | None = None, row_labels: list[str] | None = None,
             title: str | None = None) -> bytes:
    """A labelled grid as PNG bytes.

    ``rows``: a list of rows, each a list of cells; a cell is None (left blank) or ``(image,
    caption)`` with an H×W×3 uint8 image and a caption (or None) written under it.  Column
    labels go above the first row, row labels to the left.  Tiles are drawn at an integer
    scale (nearest neighbour) so images smaller than ``TILE_MIN`` stay visible.
    """
    from PIL import Image, ImageDraw

    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("an empty grid")
    th = max(c[0].shape[0] for c in cells)
    tw = max(c[0].shape[1] for c in cells)
    scale = max(1, math.ceil(TILE_MIN / max(th, tw)))
    th, tw = th * scale, tw * scale
    ncols = max(len(r) for r in rows)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_h = max([_text_size(probe, c[1] or "", font)[1] for c in cells] + [0])
    cap_h = cap_h + 8 if cap_h else 0
    head_h = max([_text_size(probe, t or "", font)[1] for t in (col_labels or [])] + [0])
    head_h = head_h + 6 if head_h else 0
    left_w = max([_text_size(probe, t or "", font)[0] for t in (row_labels or [])] + [0])
    left_w = left_w + 10 if left_w else 0
    title_h = _text_size(probe, title, font)[1] + 10 if title else 0
    width = PAD * 2 + left_w + ncols * tw + (ncols - 1) * GAP
    height = PAD * 2 + title_h + head_h + len(rows) * (th + cap_h) + (len(rows) - 1) * GAP
    if title:
        width = max(width, _text_size(probe, title, font)[0] + 2 * PAD)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.multiline_text((PAD, PAD), title, fill="black", font=font, spacing=2)
    x0, y0 = PAD + left_w, PAD + title_h + head_h
    for j, label in enumerate(col_labels or []):
        if label:
            w, h = _text_size(draw, label, font)
            draw.multiline_text((x0 + j * (tw + GAP) + (tw - w) // 2, y0 - head_h), label, fill="black",
                                font=font, spacing=2, align="center")
    for i, row in enumerate(rows):
        top = y0 + i * (th + cap_h + GAP)
        if row_labels and i < len(row_labels) and row_labels[i]:
            w, h = _text_size(draw, row_labels[i], font)
            draw.multiline_text((PAD + left_w - 10 - w, top + (th - h) // 2), row_labels[i], fill="black",
                                font=font, spacing=2, align="right")
        for j, cell in enumerate(row):
            if cell is None:
                continue
            image, caption = cell
            image = np.ascontiguousarray(image, dtype=np.uint8)
            if scale > 1:
                image = image.repeat(scale, axis=0).repeat(scale, axis=1)
            left = x0 + j * (tw + GAP)
            canvas.paste(Image.fromarray(image), (left, top))
            if caption:
                w, _ = _text_size(draw, caption, font)
                draw.multiline_text((left + (tw - w) // 2, top + image.shape[0] + 3), caption, fill="black",
                                    font=font, spacing=2, align="center")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
