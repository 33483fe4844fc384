"""The synthetic VOC: exact layout, palette masks with void borders, official tar layout."""

import tarfile

import numpy as np
from PIL import Image

from keyshard.pipeline.toy_voc import class_colour, voc_palette

from conftest import assert_user_error, invoke


def test_layout_and_masks(toy):
    root = toy / "VOCdevkit" / "VOC2012"
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 12 and len(val) == 12 and not set(train) & set(val)
    assert all(len(i) == 11 and i[4] == "_" for i in train + val)  # 2007_000032 shape
    for voc_id in train + val:
        img = Image.open(root / "JPEGImages" / f"{voc_id}.jpg")
        mask = Image.open(root / "SegmentationClass" / f"{voc_id}.png")
        assert img.format == "JPEG" and img.mode == "RGB"
        assert mask.mode == "P" and mask.size == img.size
        assert mask.getpalette()[:63] == voc_palette()[:63]
        values = set(np.unique(np.asarray(mask)).tolist())
        assert 255 in values and values <= set(range(21)) | {255}
        assert values & set(range(1, 21)), "every image has at least one object"


def test_objects_carry_their_class_colour(toy):
    """The learnable cue: pixels of class c are near class_colour(c)."""
    root = toy / "VOCdevkit" / "VOC2012"
    voc_id = (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    img = np.asarray(Image.open(root / "JPEGImages" / f"{voc_id}.jpg")).astype(float)
    mask = np.asarray(Image.open(root / "SegmentationClass" / f"{voc_id}.png"))
    for c in set(np.unique(mask).tolist()) - {0, 255}:
        mean = img[mask == c].mean(axis=0)
        assert np.abs(mean - class_colour(c)).max() < 30


def test_tar_has_the_official_layout(toy):
    with tarfile.open(toy / "VOCtrainval_11-May-2012.tar") as tf:
        names = tf.getnames()
    assert "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" in names
    assert sum(n.startswith("VOCdevkit/VOC2012/JPEGImages/") for n in names) == 24


def test_cli_refuses_to_overwrite(tmp_path):
    assert invoke("toy-voc", tmp_path / "t", "--images", 4).exit_code == 0
    assert_user_error(invoke("toy-voc", tmp_path / "t", "--images", 4), "refusing to overwrite")
