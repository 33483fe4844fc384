"""The encryption worker's fast path gives exactly torchvision's results.

``keyshard/images.py`` (decode, resize) and ``pipeline/samples.py`` (augmentation crops) call
torchvision's compiled image operators and torch's resize directly,
without importing the torchvision package (its model zoo costs seconds per worker).  Each piece
is checked here against the torchvision call it replaces, bit for bit.  No timings.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from keyshard import images, label_png
from keyshard.pipeline import samples

tv = pytest.importorskip("torchvision")
from torchvision import transforms as T  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402
from torchvision.transforms.v2 import InterpolationMode  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: JPEG-like content without data files."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(h + w, 1))], -1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _tv_decode(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _tv_prepare(img, mask, size, seed, scale):
    """The code samples.prepare replaced (torchvision calls), for comparison."""
    h, w = img.shape[-2:]
    if seed is None:
        top, left, ch, cw, flip = 0, 0, h, w, False
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, ch, cw = T.RandomResizedCrop.get_params(torch.empty(1, h, w), scale=scale, ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1).item() < 0.5)
    img = F.resized_crop(img, top, left, ch, cw, [size, size], interpolation=InterpolationMode.BILINEAR,
                         antialias=True)
    mask = mask.resize((size, size), Image.NEAREST, box=(left, top, left + cw, top + ch))
    if flip:
        img, mask = F.horizontal_flip(img), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.permute(1, 2, 0).contiguous().numpy(), np.asarray(mask)


def test_rgb_mode_is_torchvisions():
    assert images.RGB_MODE == ImageReadMode.RGB.value


def test_image_library_is_torchvisions():
    from torchvision.extension import _get_extension_path

    assert images.image_library_path() == _get_extension_path("image_stable")


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (64, 64), (10, 400), (400, 10), (1, 1), (33, 17)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.3, 0.9), (1.0, 1.0), (0.01, 0.02)])
def test_crop_box_matches_random_resized_crop_get_params(hw, scale):
    h, w = hw
    for seed in range(100):
        torch.manual_seed(seed)
        want = T.RandomResizedCrop.get_params(torch.empty(1, h, w), scale=list(scale), ratio=[3 / 4, 4 / 3])
        after_want = torch.rand(1).item()
        torch.manual_seed(seed)
        got = samples._crop_box(torch, h, w, scale, samples.CROP_RATIO)
        assert got == tuple(want), (seed, h, w, scale)
        assert torch.rand(1).item() == after_want  # same number of RNG draws


def test_crop_params_with_replica_seeds_and_rng_left_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for i in range(200):
        seed = samples.replica_seed(0, f"2007_{i:06d}", 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            want = T.RandomResizedCrop.get_params(torch.empty(1, 375, 500), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1).item() < 0.5)
        assert samples.crop_params(375, 500, seed, (0.08, 1.0)) == (*want, flip)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kind", ["rgb", "gray", "cmyk", "progressive", "444", "q50"])
def test_decode_matches_torchvision(kind):
    arr = _photo(123, 77, 1)
    data = {"rgb": lambda: _jpeg(arr, quality=90), "gray": lambda: _jpeg(arr, "L"),
            "cmyk": lambda: _jpeg(arr, "CMYK"), "progressive": lambda: _jpeg(arr, progressive=True),
            "444": lambda: _jpeg(arr, subsampling=0, quality=95), "q50": lambda: _jpeg(arr, quality=50)}[kind]()
    got = images.decode_rgb(data, "x.jpg")
    want = _tv_decode(data)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (3, 123, 77)
    assert got.stride() == want.stride()
    assert torch.equal(got, want)


def test_truncated_jpeg_is_a_bad_sample():
    data = _jpeg(_photo(64, 64, 2))
    with pytest.raises(images.BadSample, match="x.jpg: cannot decode image"):
        images.decode_rgb(data[: len(data) // 2], "x.jpg")


def _cases():
    for i, (h, w) in enumerate([(375, 500), (500, 375), (256, 256), (100, 60), (48, 96), (512, 512), (257, 255)]):
        for size in (256, 64, 32):
            for seed in (None, 10 + i, 1000 + i):
                yield h, w, size, seed


def _compare_all(step: int = 1):
    mask_rng = np.random.default_rng(0)
    n = 0
    for h, w, size, seed in list(_cases())[::step]:
        for source in ("jpeg", "pil"):
            arr = _photo(h, w, n)
            img = (_tv_decode(_jpeg(arr)) if source == "jpeg"
                   else torch.from_numpy(np.array(Image.fromarray(arr))).permute(2, 0, 1))
            mask = Image.fromarray(mask_rng.integers(0, 21, (h, w), dtype=np.uint8), mode="L")
            scale = (0.08, 1.0)
            got = samples.fit(img, mask, size, seed, scale)
            want = _tv_prepare(img, mask, size, seed, scale)
            assert np.array_equal(got[0], want[0]), (h, w, size, seed, source)
            assert np.array_equal(got[1], want[1]), (h, w, size, seed, source)
            n += 1
    return n


def test_resize_matches_torchvision_resized_crop():
    assert _compare_all() > 100


def test_resize_matches_torchvision_without_avx2():
    """On CPUs without AVX2 torchvision resizes uint8 through float32; the fast path must follow."""
    code = ("import torch, tests.test_encrypt_speedpath as t;"
            "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT', torch.backends.cpu.get_cpu_capability();"
            "print(t._compare_all(step=4))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONWARNINGS": "ignore"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[-1]) > 30


def test_worker_never_imports_torchvision_or_plotting():
    """A worker's imports: the job module and one sample through prepare, without torchvision."""
    code = (
        "import sys, io, numpy as np; from PIL import Image\n"
        "import keyshard.pipeline.encrypt_job as job\n"
        "assert 'torch' not in sys.modules, 'torch imported with the job module'\n"
        "from keyshard.pipeline.samples import prepare\n"
        "b = io.BytesIO(); Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(b, 'JPEG')\n"
        "m = io.BytesIO(); Image.fromarray(np.zeros((40, 30), np.uint8)).save(m, 'PNG')\n"
        "img, mask, orig = prepare(b.getvalue(), m.getvalue(), 32, 'a', 'b', 7)\n"
        "assert img.shape == (32, 32, 3) and orig == (40, 30)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('torchvision', 'matplotlib', 'webdataset', 'torch._dynamo', 'sympy'))\n"
        "bad += [n for n in sys.modules if n.startswith('torch._dynamo')]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def _png(arr: np.ndarray, mode: str, **save) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr, "L")
    if mode == "P":
        from keyshard.shardformat import voc_palette

        im = im.convert("P")
        im.putpalette(voc_palette())
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def _mask_arr(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, h), rng.integers(0, w)
        arr[y:y + h // 3, x:x + w // 3] = rng.integers(1, 21)
    arr[0, :] = 255
    return arr


def _chunks(data: bytes):
    pos, out = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append([data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]])
        pos += 12 + n
    return out


def _build(chunks) -> bytes:
    import zlib

    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += len(body).to_bytes(4, "big") + kind + body + zlib.crc32(body, zlib.crc32(kind)).to_bytes(4, "big")
    return out


def _outcome(data: bytes, fast: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(label_png, "plain_values", lambda data: None)
        try:
            im = samples.decode_label_map(data, "m.png")
        except samples.BadSample as exc:
            return ("bad", str(exc))
        arr = np.asarray(im)
        small = np.asarray(im.resize((16, 16), Image.NEAREST, box=(0, 0, max(1, im.size[0] // 2), im.size[1])))
        return ("ok", im.size, arr.tobytes(), small.tobytes())


def _variants():
    """Label maps as toy-voc / VOC write them, other kinds, and damaged copies of each."""
    import zlib

    rng = np.random.default_rng(7)
    for i, (h, w) in enumerate([(375, 500), (37, 23), (1, 1), (64, 3)]):
        arr = _mask_arr(h, w, i)
        for mode in ("P", "L"):
            good = _png(arr, mode, compress_level=6 if i % 2 else 1)
            yield good
            yield _png(arr, mode, optimize=True)
            ch = _chunks(good)
            idat = b"".join(body for kind, body in ch if kind == b"IDAT")
            head = [c for c in ch if c[0] not in (b"IDAT", b"IEND")]
            yield _build(head + [[b"IDAT", idat[:k]] for k in (5,)] + [[b"IDAT", idat[5:]], [b"IEND", b""]])
            yield _build(head + [[b"tEXt", b"a\0b"], [b"IDAT", idat], [b"IEND", b""]])
            yield _build(head + [[b"IDAT", idat], [b"IEND", b""]]) + b"junk"
            raw = zlib.decompress(idat)
            yield _build(head + [[b"IDAT", zlib.compress(raw[:-1])], [b"IEND", b""]])       # one byte short
            yield _build(head + [[b"IDAT", zlib.compress(raw + b"\0" * 7)], [b"IEND", b""]])  # too long
            yield _build(head + [[b"IDAT", zlib.compress(raw)[:-4]], [b"IEND", b""]])       # no adler32
            rows = bytearray(raw)
            rows[0] = 1  # a filtered row (Sub)
            yield _build(head + [[b"IDAT", zlib.compress(bytes(rows))], [b"IEND", b""]])
            rows[0] = 9  # an invalid filter type
            yield _build(head + [[b"IDAT", zlib.compress(bytes(rows))], [b"IEND", b""]])
            for k in sorted({1, 8, 20, 33, len(good) // 2, len(good) - 13, len(good) - 1}):
                yield good[:k]
            for _ in range(12):
                bad = bytearray(good)
                bad[int(rng.integers(8, len(bad)))] ^= 1 << int(rng.integers(0, 8))
                yield bytes(bad)
            for _ in range(6):  # damaged compressed data with correct CRCs: zlib itself must notice
                z = bytearray(idat)
                z[int(rng.integers(2, len(z)))] ^= 0xFF
                yield _build(head + [[b"IDAT", bytes(z)], [b"IEND", b""]])
    yield _png(np.full((5, 5), 30, np.uint8), "L")  # values outside 0..20/255
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb, format="PNG")
    yield rgb.getvalue()
    yield b"not a png"


def test_label_map_fast_path_matches_pillow(monkeypatch):
    fast_used = 0
    for n, data in enumerate(_variants()):
        want = _outcome(data, False, monkeypatch)
        got = _outcome(data, True, monkeypatch)
        assert got == want, (n, want[:2], got[:2])
        fast_used += label_png.plain_values(data) is not None
    assert fast_used >= 8  # the plain files did take the fast path


def test_label_map_fast_path_on_toy_voc_masks(tmp_path):
    from keyshard.pipeline.toy_voc import make_toy_voc

    root = make_toy_voc(tmp_path / "voc", images=6, seed=3, min_side=40, max_side=90, progress=False)
    for png in sorted((root / "SegmentationClass").glob("*.png")):
        data = png.read_bytes()
        values = label_png.plain_values(data)
        assert values is not None
        assert np.array_equal(values, np.asarray(Image.open(io.BytesIO(data))))


_RUN_BACKEND = """
import sys
from keyshard import keys
from keyshard.pipeline import encrypt_job, workers
backend, voc, out, key = sys.argv[1:]
assert workers.resolve_backend(backend) == backend  # a clean process: 'processes' really forks
opts = encrypt_job.EncryptOptions(size=32, shard_size=3, augment_copies=1)
encrypt_job.run(voc, out, keys.load(key), opts, jobs=2, backend=backend, progress=False)
"""


@pytest.mark.parametrize("backend", ["processes", "multiprocessing", "loky"])
def test_process_backends_give_the_bytes_of_jobs_1(backend, tmp_path):
    """Workers use the fast path and the warm-up (forked processes, loky); multiprocessing cannot
    stream results.  Run in a fresh process: this one has loaded torch, so it would not fork."""
    from keyshard import keys
    from keyshard.pipeline import encrypt_job
    from keyshard.pipeline.toy_voc import make_toy_voc

    voc = make_toy_voc(tmp_path / "voc", images=10, seed=4, min_side=40, max_side=70, progress=False)
    key = keys.generate("ffx", 4)
    keys.save(key, tmp_path / "key.json")
    opts = encrypt_job.EncryptOptions(size=32, shard_size=3, augment_copies=1)
    one = encrypt_job.run(str(voc), str(tmp_path / "one"), key, opts, jobs=1, progress=False)
    res = subprocess.run([sys.executable, "-c", _RUN_BACKEND, backend, str(voc), str(tmp_path / "two"),
                          str(tmp_path / "key.json")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [(s["file"], s["sha256"]) for s in two["shards"]] == [(s["file"], s["sha256"]) for s in one["shards"]]


def test_processes_fork_only_from_a_clean_process():
    """`processes` forks only a process without torch and without other threads (encrypt's own
    CLI process); after either, it is loky (sweep and demo train in the process that encrypts)."""
    code = ("import threading, time; from keyshard.pipeline import workers as w; r = [w.resolve_backend('processes')];"
            "t = threading.Thread(target=time.sleep, args=(0.5,)); t.start(); r.append(w.resolve_backend('processes'));"
            "t.join(); import torch; r.append(w.resolve_backend('processes')); print(*r)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.stdout.split() == ["processes", "loky", "loky"], res.stderr
