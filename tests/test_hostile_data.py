"""Hostile and odd input data (issue 12): every case is one `keyshard: error:` line naming the
file, exit 1, no traceback and nothing under a final name; bad samples are skipped by --skip-bad."""

import shutil

import pytest

from conftest import assert_user_error, invoke

ARGS = ["--image-size", 32, "--shard-size", 4, "--jobs", 1, "-q"]
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


def test_id_in_two_splits(voc, tmp_path):
    shared = ids(voc, "val")[3]
    with open(voc / SEG / "train.txt", "a") as f:
        f.write(shared + "\n")
    out = tmp_path / "out"
    # refused even when only one of the two splits is written
    for splits in ("train,holdout,test", "test"):
        assert_user_error(encrypt_plain(voc, out, "--splits", splits), "train.txt", repr(shared), "val.txt")
    assert not out.exists()


def _add_id(voc, split, new_id, like):
    """List ``new_id`` in ``split`` with a copy of ``like``'s image and mask."""
    shutil.copy(voc / "JPEGImages" / f"{like}.jpg", voc / "JPEGImages" / f"{new_id}.jpg")
    shutil.copy(voc / "SegmentationClass" / f"{like}.png", voc / "SegmentationClass" / f"{new_id}.png")
    with open(voc / SEG / f"{split}.txt", "a") as f:
        f.write(new_id + "\n")


def test_ids_that_differ_only_in_dots_are_refused(voc, tmp_path):
    victim = ids(voc)[0]  # 2007_000006-like
    dotted = victim[:-2] + "." + victim[-2:]
    _add_id(voc, "val", dotted, victim)
    out = tmp_path / "out"
    line = assert_user_error(encrypt_plain(voc, out), repr(victim), repr(dotted), "same sample key")
    assert "val.txt" in line and "train.txt" in line
    assert not out.exists()


def test_id_spelling_a_replica_key_is_refused(voc, tmp_path):
    victim = ids(voc)[0]
    _add_id(voc, "train", f"{victim}_a1", victim)
    assert_user_error(encrypt_plain(voc, tmp_path / "out"), repr(f"{victim}_a1"), repr(victim), "replica 1")


def test_id_with_control_character(voc, tmp_path):
    with open(voc / SEG / "val.txt", "a") as f:
        f.write("2007_00\x010999\n")
    assert_user_error(encrypt_plain(voc, tmp_path / "out"), "val.txt", "invalid id")


def test_long_and_non_ascii_ids_are_stored_with_pax_headers(voc, tmp_path):
    """USTAR holds 100-byte names; longer (and non-ASCII) ids get a pax header, other members
    keep their plain USTAR headers, and every reader gets the full key back."""
    import json
    import tarfile

    import webdataset as wds

    from keyshard.manifest import read as read_manifest

    like = ids(voc, "val")[0]
    long_id, accented = "2012_" + "x" * 145, "2012_caf\u00e9"
    _add_id(voc, "val", long_id, like)
    _add_id(voc, "val", accented, like)
    out = tmp_path / "out"
    res = encrypt_plain(voc, out, "--splits", "test", "--shard-size", 64)
    assert res.exit_code == 0, res.output
    assert invoke("verify", out, "-q").exit_code == 0
    doc = read_manifest(out).raw
    shard = out / doc["shards"][0]["file"]
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    assert {m.name for m in members if m.pax_headers} == {
        f"{k}.{ext}" for k in (long_id, accented) for ext in ("img.npy", "json", "mask.png")}
    got = {s["__key__"]: json.loads(s["json"])["id"]
           for s in wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False)}
    assert got[long_id] == long_id and got[accented] == accented and got[like] == like


# -- VOC tar / directory roots ----------------------------------------------------------------

def _tar_with(toy, path, extra_roots):
    """The toy tar's members, preceded by a copy of its layout under each of ``extra_roots``."""
    import io
    import tarfile

    with tarfile.open(toy / "VOCtrainval_11-May-2012.tar") as src, tarfile.open(path, "w") as dst:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
        for root in extra_roots:
            for m, data in members:
                info = tarfile.TarInfo(root + m.name[len("VOCdevkit/VOC2012/"):])
                if info.name.endswith("train.txt"):  # a different dataset: one id only
                    data = data.split(b"\n")[0] + b"\n"
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))
    return path


def test_tar_layouts_outside_the_tar_never_count(toy, tmp_path):
    from keyshard.manifest import read as read_manifest

    tar = _tar_with(toy, tmp_path / "voc.tar", ["../evil/VOCdevkit/VOC2012/", "/abs/VOCdevkit/VOC2012/"])
    out = tmp_path / "out"
    res = encrypt_plain(tar, out, "--splits", "train")
    assert res.exit_code == 0, res.output
    source = read_manifest(out).raw["source"]
    assert source["root"] == "VOCdevkit/VOC2012" and source["kind"] == "tar"
    assert read_manifest(out).raw["splits"]["counts"]["train"] == 11  # the real train.txt (12 ids)


def test_tar_with_two_layouts_is_refused(toy, tmp_path):
    tar = _tar_with(toy, tmp_path / "voc.tar", ["backup/VOCdevkit/VOC2012/"])
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(tar, out), str(tar), "2 VOC2012 layouts",
                      "'VOCdevkit/VOC2012'", "'backup/VOCdevkit/VOC2012'")
    assert not out.exists()


def test_tar_whose_only_layout_climbs_out_is_refused(toy, tmp_path):
    import tarfile

    tar = _tar_with(toy, tmp_path / "all.tar", ["../evil/VOCdevkit/VOC2012/"])
    only = tmp_path / "evil.tar"
    with tarfile.open(tar) as src, tarfile.open(only, "w") as dst:
        for m in src.getmembers():
            if m.name.startswith("../"):
                dst.addfile(m, src.extractfile(m))
    assert_user_error(encrypt_plain(only, tmp_path / "out"), str(only), "no VOC2012 layout", "'..'")


def test_directory_with_two_layouts_is_refused(voc, tmp_path):
    top = voc.parent.parent  # holds VOCdevkit/VOC2012
    shutil.copytree(voc, top / "VOC2012")
    assert_user_error(encrypt_plain(top, tmp_path / "out"), str(top), "more than one VOC2012 layout")
    from keyshard.manifest import read as read_manifest

    res = encrypt_plain(voc.parent, tmp_path / "ok", "--splits", "test")
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "ok").raw["source"]["root"] == "VOC2012"


def test_manifests_without_source_root_stay_valid():
    import json
    from pathlib import Path

    from keyshard.manifest import validate

    doc = json.loads((Path(__file__).parent.parent / "manifests" / "example-manifest.json").read_text())
    del doc["source"]["root"]
    validate(doc, "old manifest")


# -- label maps -------------------------------------------------------------------------------

def test_requantised_palette_mask_is_refused_and_skippable(voc, tmp_path):
    """A VOC colour mask re-quantised (indices 0, 1, 2 instead of 0, 15, 255) would be silently
    relabelled; its palette gives it away."""
    import numpy as np
    from PIL import Image

    from keyshard.manifest import read as read_manifest

    victim = ids(voc)[0]
    path = voc / "SegmentationClass" / f"{victim}.png"
    with Image.open(path) as im:
        requantised = im.convert("RGB").quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    assert set(np.unique(np.asarray(requantised))) <= set(range(8))  # valid-looking class ids
    requantised.save(path)
    out = tmp_path / "out"
    assert_user_error(encrypt_plain(voc, out), str(path), "palette is not the VOC colour map")
    assert_nothing_final(out)
    res = encrypt_plain(voc, tmp_path / "skip", "--skip-bad")
    assert res.exit_code == 0, res.output
    [failed] = read_manifest(tmp_path / "skip").raw["failed"]
    assert failed["id"] == victim and "palette" in failed["reason"]


def test_index_maps_without_the_voc_palette_are_accepted(voc, tmp_path):
    """Grayscale (mode L) masks, and palette masks whose palette is gray (index i = (i, i, i)),
    are plain index maps: accepted, with the same labels as the VOC palette mask."""
    import numpy as np
    from PIL import Image

    from keyshard.pipeline.samples import decode_label_map

    a, b = ids(voc)[:2]
    with Image.open(voc / "SegmentationClass" / f"{a}.png") as im:
        want_a = np.asarray(im).copy()
        Image.fromarray(want_a, "L").save(voc / "SegmentationClass" / f"{a}.png")
    with Image.open(voc / "SegmentationClass" / f"{b}.png") as im:
        want_b = np.asarray(im).copy()
        Image.fromarray(want_b, "L").convert("P").save(voc / "SegmentationClass" / f"{b}.png")
    for voc_id, want in ((a, want_a), (b, want_b)):
        data = (voc / "SegmentationClass" / f"{voc_id}.png").read_bytes()
        np.testing.assert_array_equal(np.asarray(decode_label_map(data, voc_id)), want)


# -- images -----------------------------------------------------------------------------------

def png_bytes(arr, color_type, depth=8, width=None, height=None):
    """A minimal PNG (one IDAT); ``width``/``height`` patch what the IHDR claims (CRC fixed)."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    dtype = ">u2" if depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width or w, height or h, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_16_bit_grayscale_image_is_scaled_not_clipped(voc, tmp_path):
    import numpy as np

    from keyshard.manifest import read as read_manifest
    from keyshard.pipeline.samples import decode_rgb
    from keyshard.shardformat import decode_npy, iter_tar_samples

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    got = decode_rgb(png_bytes(ramp, 0, 16), "ramp.png").numpy()
    np.testing.assert_array_equal(got, np.stack([(ramp >> 8).astype(np.uint8)] * 3))  # 65535 → 255, 257k → k
    rgb16 = np.stack([ramp, ramp // 2, ramp // 4], -1)  # 16-bit RGB (Pillow's own path): same rule
    np.testing.assert_array_equal(decode_rgb(png_bytes(rgb16, 2, 16), "rgb.png").numpy(),
                                  np.moveaxis((rgb16 >> 8).astype(np.uint8), -1, 0))

    victim = ids(voc, "val")[0]  # end to end: a 16-bit PNG where the JPEG was (same size as its mask)
    from PIL import Image
    with Image.open(voc / "SegmentationClass" / f"{victim}.png") as m:
        w, h = m.size
    ramp = np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))
    (voc / "JPEGImages" / f"{victim}.jpg").write_bytes(png_bytes(ramp, 0, 16))
    out = tmp_path / "out"
    assert encrypt_plain(voc, out, "--splits", "test").exit_code == 0
    shard = out / read_manifest(out).raw["shards"][0]["file"]
    img = next(decode_npy(f["img.npy"]) for k, f in iter_tar_samples(shard) if k == victim)
    assert 100 < img.mean() < 155 and (img == 255).mean() < 0.05  # was 99.5 % white


def test_float_image_is_refused():
    import io

    import numpy as np
    from PIL import Image

    from keyshard.pipeline.samples import BadSample, decode_rgb

    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(buf, "TIFF")
    with pytest.raises(BadSample, match="x.tif: F image .* no 8-bit range"):
        decode_rgb(buf.getvalue(), "x.tif")


# -- decompression bombs: the pixel cap, checked from the header ------------------------------

BOMB = (50000, 50000)


def jpeg_claiming(data, width, height):
    """A JPEG whose SOF0 frame header claims ``width`` × ``height`` (the data stays small)."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9:]


def png_claiming(data, width, height):
    """A PNG whose IHDR claims ``width`` × ``height``, with a valid CRC."""
    import zlib

    assert data[12:16] == b"IHDR"
    body = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:12] + body + zlib.crc32(body).to_bytes(4, "big") + data[33:]


def _bomb(voc, kind):
    victim = ids(voc)[1]
    if kind == "jpeg":
        path = voc / "JPEGImages" / f"{victim}.jpg"
        path.write_bytes(jpeg_claiming(path.read_bytes(), *BOMB))
    elif kind == "png-image":  # a PNG where the JPEG was (decoded by content, through Pillow)
        import io

        from PIL import Image

        path = voc / "JPEGImages" / f"{victim}.jpg"
        buf = io.BytesIO()
        Image.open(path).save(buf, "PNG")
        path.write_bytes(png_claiming(buf.getvalue(), *BOMB))
    else:
        path = voc / "SegmentationClass" / f"{victim}.png"
        path.write_bytes(png_claiming(path.read_bytes(), *BOMB))
    assert path.stat().st_size < 20_000
    return victim, path


@pytest.mark.parametrize("kind", ["jpeg", "png-image", "png-mask"])
def test_header_bomb_is_refused_before_decoding_and_skippable(voc, tmp_path, kind):
    import time

    from keyshard.manifest import read as read_manifest

    victim, path = _bomb(voc, kind)
    out = tmp_path / "out"
    start = time.perf_counter()
    res = encrypt_plain(voc, out, "--splits", "train")
    assert time.perf_counter() - start < 10  # was 27 s and 8 GB for the JPEG
    assert_user_error(res, str(path), "50000x50000 = 2,500,000,000 pixels", "89,478,485", "--max-pixels")
    assert_nothing_final(out)
    res = encrypt_plain(voc, tmp_path / "skip", "--splits", "train", "--skip-bad")
    assert res.exit_code == 0, res.output
    [failed] = read_manifest(tmp_path / "skip").raw["failed"]
    assert failed["id"] == victim and "50000x50000" in failed["reason"] and str(path) in failed["reason"]


def test_max_pixels_option(voc, tmp_path):
    from keyshard.manifest import read as read_manifest

    out = tmp_path / "out"
    first = voc / "JPEGImages" / f"{sorted(ids(voc, 'val'))[0]}.jpg"
    assert_user_error(encrypt_plain(voc, out, "--splits", "test", "--max-pixels", 100),
                      str(first), "over the limit of 100 (--max-pixels")
    res = encrypt_plain(voc, tmp_path / "ok", "--splits", "test", "--max-pixels", 64 * 64)
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "ok").raw["image"]["max_pixels"] == 64 * 64
    res = invoke("encrypt", "--voc", voc, "--plain", "-o", tmp_path / "x", "--max-pixels", 0)
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_pillow_bomb_warning_becomes_our_error(voc, tmp_path):
    """A format whose size only Pillow reads (BMP): between Pillow's limit and twice it, Pillow
    warns (DecompressionBombWarning); above, it raises.  Both are one keyshard line."""
    import io

    from PIL import Image

    victim = ids(voc)[0]
    path = voc / "JPEGImages" / f"{victim}.jpg"
    buf = io.BytesIO()
    Image.open(path).save(buf, "BMP")
    bmp = buf.getvalue()
    for w, h in ((10000, 10000), BOMB):  # 100 M pixels (Pillow warns), 2.5 G (Pillow raises)
        path.write_bytes(bmp[:18] + w.to_bytes(4, "little") + h.to_bytes(4, "little") + bmp[26:])
        res = encrypt_plain(voc, tmp_path / f"out{w}", "--splits", "train")
        assert_user_error(res, str(path), "more than 89,478,485 pixels", "--max-pixels")
        assert "DecompressionBomb" not in res.output


# -- libjpeg's own messages -------------------------------------------------------------------

def _jpeg_with_extra_bytes(path):
    """libjpeg recovers (and prints 'Corrupt JPEG data: 3 extraneous bytes before marker 0xda')."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    path.write_bytes(data[:sos] + b"\x00\x11\x22" + data[sos:])


def _jpeg_with_marker_in_scan(path):
    """libjpeg prints 'Corrupt JPEG data: premature end of data segment', then fails."""
    data = path.read_bytes()
    mid = (data.index(b"\xff\xda") + len(data)) // 2
    path.write_bytes(data[:mid] + b"\xff\xb5" + data[mid:])


def test_libjpeg_warning_is_a_keyshard_line_naming_the_file(voc, tmp_path):
    recovered = voc / "JPEGImages" / f"{ids(voc, 'val')[0]}.jpg"
    _jpeg_with_extra_bytes(recovered)
    res = encrypt_plain(voc, tmp_path / "out", "--splits", "test")
    assert res.exit_code == 0, res.output
    [line] = [x for x in res.output.splitlines() if "Corrupt JPEG" in x]
    assert line == (f"keyshard: warning: {recovered}: Corrupt JPEG data: 3 extraneous bytes before marker 0xda "
                    "(libjpeg; decoded anyway)")
    broken = voc / "JPEGImages" / f"{ids(voc, 'val')[1]}.jpg"
    _jpeg_with_marker_in_scan(broken)
    assert_user_error(encrypt_plain(voc, tmp_path / "out2", "--splits", "test"), str(broken),
                      "cannot decode image", "premature end of data segment")


def test_bad_jpegs_in_worker_processes(voc, tmp_path):
    """--jobs 2 (loky worker processes): a header bomb, a JPEG libjpeg recovers and one it cannot
    decode give keyshard lines and manifest entries only — no raw libjpeg or Pillow output."""
    import time

    from conftest import run_subprocess
    from keyshard.manifest import read as read_manifest

    val = ids(voc, "val")
    bomb = voc / "JPEGImages" / f"{val[0]}.jpg"
    bomb.write_bytes(jpeg_claiming(bomb.read_bytes(), *BOMB))
    recovered, broken = (voc / "JPEGImages" / f"{i}.jpg" for i in val[1:3])
    _jpeg_with_extra_bytes(recovered)
    _jpeg_with_marker_in_scan(broken)
    out = tmp_path / "out"
    start = time.perf_counter()
    res = run_subprocess("encrypt", "--voc", voc, "--plain", "-o", out, "--image-size", 32, "--shard-size", 4,
                         "--jobs", 2, "-q", "--splits", "test", "--skip-bad")
    assert time.perf_counter() - start < 60
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert all(x.startswith(("keyshard: ", "warning: skipped")) for x in lines), res.stderr
    assert f"keyshard: warning: {recovered}: Corrupt JPEG data: 3 extraneous bytes" in res.stderr
    failed = {f["id"]: f["reason"] for f in read_manifest(out).raw["failed"]}
    assert set(failed) == {val[0], val[2]}
    assert "50000x50000" in failed[val[0]] and "premature end of data segment" in failed[val[2]]
