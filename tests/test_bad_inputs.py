"""Bad input: one clear line naming the file, non-zero exit, no traceback, no manifest."""

import shutil

import pytest

from keyshard.manifest import read as read_manifest

from conftest import assert_user_error, invoke, run_subprocess

ARGS = ["--image-size", 32, "--shard-size", 4, "--jobs", 1, "-q"]


@pytest.fixture
def voc(toy, tmp_path):
    """A private copy of the toy layout that a test may damage."""
    root = tmp_path / "voc"
    shutil.copytree(toy / "VOCdevkit", root / "VOCdevkit")
    return root / "VOCdevkit" / "VOC2012"


def first_id(voc, split="train"):
    return (voc / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()[0]


def encrypt_plain(voc, out, *extra):
    return invoke("encrypt", "--voc", voc, "--plain", "-o", out, *ARGS, *extra)


def assert_unfinished(out):
    assert not (out / "manifest.json").exists()


def test_truncated_jpeg(voc, tmp_path):
    bad = voc / "JPEGImages" / f"{first_id(voc)}.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(voc, out), str(bad), "cannot decode image")
    assert_unfinished(out)


def test_corrupt_jpeg_in_a_real_process(voc, tmp_path):
    bad = voc / "JPEGImages" / f"{first_id(voc, 'val')}.jpg"
    bad.write_bytes(b"\xff\xd8" + b"\x00" * 500)
    out = tmp_path / "out"
    res = run_subprocess("encrypt", "--voc", voc, "--plain", "-o", out, *ARGS[:-1], "--jobs", 2, "-q")
    assert_user_error(res, str(bad), "cannot decode image")
    assert_unfinished(out)


def test_mask_size_differs_from_image(voc, tmp_path):
    from PIL import Image

    mask_path = voc / "SegmentationClass" / f"{first_id(voc)}.png"
    with Image.open(mask_path) as im:
        im.crop((0, 0, im.width - 3, im.height)).save(mask_path)
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(voc, out), str(mask_path), "label map is")
    assert_unfinished(out)


def test_id_listed_but_missing(voc, tmp_path):
    gone = voc / "SegmentationClass" / f"{first_id(voc, 'val')}.png"
    gone.unlink()
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(voc, out), str(gone), "val.txt")
    assert not out.exists()


def test_truncated_tar(toy, tmp_path):
    tar = tmp_path / "VOCtrainval_11-May-2012.tar"
    data = (toy / "VOCtrainval_11-May-2012.tar").read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(tar, out), str(tar), "truncated")
    assert_unfinished(out)


@pytest.mark.parametrize("content", [b"", b"{\"format\": \"keyshard-key/1\"", b"\x00\x01\x02"])
def test_corrupt_key_file(voc, tmp_path, content):
    key = tmp_path / "key.json"
    key.write_bytes(content)
    out = tmp_path / "out"
    assert_user_error(invoke("encrypt", "--voc", voc, "--key", key, "-o", out, *ARGS), str(key))
    assert not out.exists()


def test_unreadable_key_file_is_a_directory(voc, tmp_path):
    res = invoke("encrypt", "--voc", voc, "--key", tmp_path, "-o", tmp_path / "o", *ARGS)
    assert res.exit_code == 2 and "Traceback" not in res.output  # click's usage error
    assert f"'{tmp_path}' is a directory" in res.output
    assert not (tmp_path / "o").exists()


def test_block_size_does_not_divide_size(voc, tmp_path):
    key = tmp_path / "k.json"
    assert invoke("keygen", "--method", "shf", "-M", "16", "-o", key).exit_code == 0
    out = tmp_path / "out"
    assert_user_error(invoke("encrypt", "--voc", voc, "--key", key, "-o", out, "--image-size", 40, "-q"),
                      str(key), "does not divide")
    assert not out.exists()


def test_output_under_a_regular_file(voc, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub" / "out"
    assert_user_error(encrypt_plain(voc, out), str(out), "cannot create")
    assert blocker.read_text() == "x"


def test_not_a_voc_layout(tmp_path):
    assert_user_error(encrypt_plain(tmp_path, tmp_path / "out"), str(tmp_path), "not a VOC2012 layout")


def test_skip_bad_lists_failures_in_the_manifest(voc, tmp_path):
    bad_id = first_id(voc)
    (voc / "JPEGImages" / f"{bad_id}.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    res = encrypt_plain(voc, out, "--skip-bad")
    assert res.exit_code == 0, res.output
    doc = read_manifest(out).raw
    assert [f["id"] for f in doc["failed"]] == [bad_id]
    assert "cannot decode image" in doc["failed"][0]["reason"]
    assert "skipped 1 bad" in res.output
    assert sum(s["samples"] for s in doc["shards"]) == 23
    assert invoke("verify", out, "-q").exit_code == 0
