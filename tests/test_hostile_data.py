"""Hostile and odd input data (issue 12): every case is one `keyshard: error:` line naming the
file, exit 1, no traceback and nothing under a final name; bad samples are skipped by --skip-bad."""

import shutil

import pytest

from conftest import assert_user_error, invoke

ARGS = ["--size", 32, "--shard-size", 4, "--jobs", 1, "-q"]
SEG = "ImageSets/Segmentation"


@pytest.fixture
def voc(toy, tmp_path):
    """A private copy of the toy layout (12 train.txt + 12 val.txt ids) that a test may damage."""
    root = tmp_path / "voc"
    shutil.copytree(toy / "VOCdevkit", root / "VOCdevkit")
    return root / "VOCdevkit" / "VOC2012"


def ids(voc, split="train"):
    return (voc / SEG / f"{split}.txt").read_text().split()


def encrypt_plain(voc, out, *extra):
    return invoke("encrypt", "--voc", voc, "--plain", "-o", out, *ARGS, *extra)


def assert_nothing_final(out):
    """No manifest and no shard under a final name."""
    assert not (out / "manifest.json").exists()
    assert not (out.exists() and list(out.glob("*.tar")))


# -- split files ----------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_split_file(voc, tmp_path, split):
    (voc / SEG / f"{split}.txt").write_text("\n  \n")
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(voc, out), str(voc / SEG / f"{split}.txt"), "lists no ids")
    assert not out.exists()


def test_one_id_train_file_names_the_file_not_holdout(voc, tmp_path):
    (voc / SEG / "train.txt").write_text(ids(voc)[0] + "\n")
    line = assert_user_error(encrypt_plain(voc, tmp_path / "out"), "train.txt lists 1 id", "--holdout 0")
    assert "--holdout 1" not in line
