"""keyshard.label_png: the shard masks' PNG writer and the plain-PNG reader, against Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from keyshard import label_png, shardformat


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (13, 1), (37, 23), (256, 256), (375, 500)])
def test_encode_is_a_png_pillow_reads_back_exactly(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for values in (rng.integers(0, 256, shape, dtype=np.uint8),          # every byte value
                   np.where(rng.random(shape) < 0.9, 0, 255).astype(np.uint8)):  # mask-like
        data = label_png.encode(values)
        im = Image.open(io.BytesIO(data))
        assert (im.format, im.mode, im.size) == ("PNG", "L", shape[::-1])
        Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
        assert np.array_equal(np.asarray(im), values)
        assert np.array_equal(label_png.plain_values(data), values)  # the fast reader takes it
        assert np.array_equal(shardformat.decode_mask(data), values)
        assert label_png.encode(values) == data  # deterministic


def test_decode_mask_still_reads_pillow_written_masks():
    """Shards written before label_png (Pillow's adaptive row filters) decode to the same values."""
    values = np.random.default_rng(1).integers(0, 21, (64, 48), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="PNG", compress_level=1)
    assert label_png.plain_values(buf.getvalue()) is None or np.array_equal(label_png.plain_values(buf.getvalue()), values)
    assert np.array_equal(shardformat.decode_mask(buf.getvalue()), values)


def test_encode_refuses_what_is_not_a_label_map():
    for bad in (np.zeros((4, 4), np.uint16), np.zeros((4, 4, 3), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError):
            label_png.encode(bad)
