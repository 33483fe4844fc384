"""Block transforms: against a slow per-block loop, numpy == torch, exact inverses."""

import numpy as np
import pytest
import torch

from keyshard import keys
from keyshard.methods import Material
from keyshard.transforms import compile_plan

BLOCK_SIZES = [2, 4, 8, 16, 32, 64, 128, 256]


def slow_encrypt(img: np.ndarray, mat: Material) -> np.ndarray:
    """Obviously-correct reference: cut blocks, flatten (row, col, channel), transform, put back."""
    m = mat.block_size
    h, w, _ = img.shape
    out = np.zeros(img.shape, dtype=np.uint16 if mat.method == "ffx" else np.uint8)
    for by in range(0, h, m):
        for bx in range(0, w, m):
            vec = img[by:by + m, bx:bx + m, :].reshape(-1).astype(np.int64)
            if mat.method == "shf":
                new = np.array([vec[mat.perm[k]] for k in range(vec.size)])
            elif mat.method == "np":
                new = np.array([255 - v if mat.mask[k] else v for k, v in enumerate(vec)])
            else:
                new = np.array([mat.table[v] if mat.mask[k] else v for k, v in enumerate(vec)])
            out[by:by + m, bx:bx + m, :] = new.reshape(m, m, 3)
    return out


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).integers(0, 256, (256, 256, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", keys.METHODS)
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_matches_per_block_loop(method, m):
    img = np.random.default_rng(m).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    mat = keys.generate(method, m).material
    np.testing.assert_array_equal(compile_plan(mat, 32, 48).encrypt(img), slow_encrypt(img, mat))


@pytest.mark.parametrize("method", keys.METHODS)
@pytest.mark.parametrize("m", [32, 64, 128, 256])
def test_matches_per_block_loop_large_blocks(method, m, image):
    mat = keys.generate(method, m).material
    # the loop is slow per value for huge blocks: check a 2x2-block crop of the big image
    crop = np.ascontiguousarray(image[: 2 * m, : 2 * m]) if m <= 128 else image
    np.testing.assert_array_equal(compile_plan(mat, *crop.shape[:2]).encrypt(crop), slow_encrypt(crop, mat))


@pytest.mark.parametrize("method", keys.METHODS)
@pytest.mark.parametrize("m", BLOCK_SIZES)
def test_roundtrip_and_torch_equal(method, m, image):
    mat = keys.generate(method, m).material
    plan = compile_plan(mat, 256, 256)
    batch = np.stack([image, image[::-1].copy()])
    enc = plan.encrypt(batch)
    assert enc.dtype == (np.uint16 if method == "ffx" else np.uint8)
    assert not np.array_equal(enc, batch)
    np.testing.assert_array_equal(plan.decrypt(enc), batch)
    tplan = plan.to_torch("cpu")
    tenc = tplan.encrypt(torch.from_numpy(batch))
    np.testing.assert_array_equal(tenc.numpy().astype(enc.dtype), enc)
    np.testing.assert_array_equal(tplan.decrypt(tenc).numpy(), batch)


def test_np_is_255_minus_v_and_ffx_uses_table(image):
    key = keys.generate("np", 2)
    enc = compile_plan(key.material, 256, 256).encrypt(image)
    sel = np.tile(key.material.mask.reshape(2, 2, 3), (128, 128, 1))
    np.testing.assert_array_equal(enc[sel], 255 - image[sel])
    np.testing.assert_array_equal(enc[~sel], image[~sel])
    fkey = keys.generate("ffx", 2)
    fenc = compile_plan(fkey.material, 256, 256).encrypt(image)
    fsel = np.tile(fkey.material.mask.reshape(2, 2, 3), (128, 128, 1))
    np.testing.assert_array_equal(fenc[fsel], fkey.material.table[image[fsel]])
    assert fenc.max() <= fkey.material.divisor


def test_ffx_decrypt_rejects_foreign_codes():
    key = keys.generate("ffx", 2)
    plan = compile_plan(key.material, 4, 4)
    enc = plan.encrypt(np.zeros((4, 4, 3), np.uint8))
    masked = np.flatnonzero(key.material.mask)[0]
    plain_pos = np.flatnonzero(~key.material.mask)[0]
    unused = int(np.setdiff1d(np.arange(1000), key.material.table)[0])
    bad = enc.copy()
    bad.reshape(-1)[masked] = unused  # no value maps to this code
    with pytest.raises(ValueError, match="not an FFX code"):
        plan.decrypt(bad)
    bad = enc.copy()
    bad.reshape(-1)[plain_pos] = 300  # untransformed positions hold 0..255 only
    with pytest.raises(ValueError, match="not an FFX code"):
        plan.decrypt(bad)


def test_divisibility_is_checked():
    from keyshard.errors import KeyshardError

    with pytest.raises(KeyshardError, match="does not divide"):
        compile_plan(keys.generate("shf", 16).material, 40, 48)
