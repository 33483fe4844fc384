"""The public API: lazy exports, the README's own-loop example, corrupt shards stop every reader."""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import keyshard
from keyshard import keys
from keyshard.errors import KeyshardError
from keyshard.pipeline import encrypt_job
from keyshard.pipeline.toy_voc import make_toy_voc

from conftest import assert_user_error, invoke

README = Path(__file__).resolve().parent.parent / "README.md"
SIZE = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    voc = make_toy_voc(root / "voc", images=64, seed=11, min_side=40, max_side=56, progress=False)
    key = keys.Key("ffx", 4, bytes(range(32)))
    keys.save(key, root / "key.json")
    encrypt_job.run(str(voc), str(root / "plain"), None, encrypt_job.EncryptOptions(size=SIZE, shard_size=5),
                    jobs=1, progress=False)
    encrypt_job.run(str(voc), str(root / "ffx4"), key,
                    encrypt_job.EncryptOptions(size=SIZE, shard_size=5, splits=("train", "holdout")),
                    jobs=1, progress=False)
    return root


def test_import_keyshard_is_light_and_exports_the_api():
    code = ("import sys, keyshard; assert 'torch' not in sys.modules and 'webdataset' not in sys.modules; "
            "names = ('read_manifest', 'open_shards', 'model_input', 'load_key', 'encrypt_image', 'decrypt_image'); "
            "assert all(callable(getattr(keyshard, n)) for n in names); assert set(names) <= set(dir(keyshard))")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        keyshard.no_such_name


def test_readme_example_runs_and_lowers_the_loss(shards, capsys):
    text = README.read_text()
    block = re.search(r"```python\n(import torch\nimport keyshard\n.*?)```", text, re.S).group(1)
    assert 15 <= len(block.strip().splitlines()) <= 22
    code = block.replace('source = "shards/np8"', f'source = {str(shards / "ffx4")!r}')
    assert code != block
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {})
    losses = [float(v) for v in re.findall(r"mean loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0], losses


def test_batches_are_stored_integers_and_model_input_normalises_on_the_device(shards):
    manifest = keyshard.read_manifest(str(shards / "ffx4"))
    pixels, targets, ids, n_pad = next(iter(keyshard.open_shards(str(shards / "ffx4"), "holdout", batch_size=4,
                                                                 shuffle=False)))
    assert pixels.dtype == torch.uint16 and targets.dtype == torch.uint8 and n_pad == 0
    key = keyshard.load_key(shards / "key.json")
    # the stored codes are the plain pixels under the key, exactly
    plain = {k: p for px, _, ks, _ in keyshard.open_shards(str(shards / "plain"), "holdout", batch_size=8,
                                                          shuffle=False) for k, p in zip(ks, px)}
    for k, p in zip(ids, pixels):
        assert np.array_equal(keyshard.encrypt_image(plain[k].numpy(), key), p.numpy())
        assert np.array_equal(keyshard.decrypt_image(p.numpy(), shards / "key.json"), plain[k].numpy())
    x = keyshard.model_input(pixels, manifest, "cpu")
    divisor = manifest.encryption.pixel_divisor
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (pixels.permute(0, 3, 1, 2).double() / divisor - mean.view(1, 3, 1, 1).double()) / std.view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (len(ids), 3, SIZE, SIZE)
    assert torch.allclose(x.double(), expected, atol=1e-5)


def corrupt_copy(src: Path, dst: Path, split: str) -> Path:
    """Copy a shard set and flip one byte inside the first member's data of a shard of ``split``."""
    shutil.copytree(src, dst)
    shard = sorted(dst.glob(f"{split}-*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    return shard


def test_a_corrupt_shard_stops_the_stream_with_one_line_with_two_workers(shards, tmp_path):
    bad = corrupt_copy(shards / "ffx4", tmp_path / "bad", "train")
    loader = keyshard.open_shards(str(tmp_path / "bad"), "train", batch_size=4, workers=2)
    with pytest.raises(KeyshardError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert bad.name in message and "sha256" in message and "\n" not in message and "Traceback" not in message
    # verification off: the same stream runs to its end (the bytes still parse)
    n = sum(len(ks) for _, _, ks, _ in keyshard.open_shards(str(tmp_path / "bad"), "train", batch_size=4,
                                                            workers=2, verify_stream=False))
    assert n == sum(s.samples for s in keyshard.read_manifest(str(tmp_path / "bad")).shards_of("train"))


def test_train_and_evaluate_stop_on_a_corrupt_shard_and_save_nothing(shards, tmp_path):
    bad = corrupt_copy(shards / "ffx4", tmp_path / "bad", "train")
    res = invoke("train", "--shards", tmp_path / "bad", "--output", tmp_path / "run", "--epochs", 1,
                 "--batch-size", 4, "--workers", 2, "-q")
    assert_user_error(res, bad.name, "sha256")
    assert not list((tmp_path / "run").glob("*.pt"))
    good = tmp_path / "good-run"
    assert invoke("train", "--shards", shards / "ffx4", "--output", good, "--epochs", 1, "--batch-size", 4,
                  "--workers", 0, "-q").exit_code == 0
    bad_test = corrupt_copy(shards / "plain", tmp_path / "bad-plain", "test")
    res = invoke("evaluate", "--checkpoint", good / "best.pt", "--key", shards / "key.json", "--test",
                 tmp_path / "bad-plain", "--wrong-keys", 2, "--workers", 2, "--output", tmp_path / "audit", "-q")
    assert_user_error(res, bad_test.name, "sha256")
    assert not (tmp_path / "audit" / "audit.json").exists()


def test_a_shard_with_a_wrong_sample_shape_is_named(shards, tmp_path):
    shutil.copytree(shards / "plain", tmp_path / "p")
    doc = json.loads((tmp_path / "p" / "manifest.json").read_text())
    doc["image"]["height"] = doc["image"]["width"] = 64  # as if another --image-size
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(KeyshardError, match=r"test-000000\.tar: sample \S+ is uint8 \(32, 32, 3\)"):
        list(keyshard.open_shards(str(tmp_path / "p"), "test", batch_size=4, shuffle=False, workers=1))


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4 * 1000, 5 * 1000 + 3])
def test_stream_hash_and_bytes_are_exact_across_piece_boundaries(size, tmp_path, monkeypatch):
    """A verifying Stream reads in pieces that two threads share: whatever the read sizes, the
    bytes served and the sha256 equal the file's — also when the caller keeps every piece it
    was given until the end (tarfile joins several reads into one member), with small pieces
    and a short read-ahead to stress it."""
    import hashlib

    from keyshard import sources

    monkeypatch.setattr(sources, "READ_PIECE", 1000)
    monkeypatch.setattr(sources, "READ_CHUNK", 300)
    monkeypatch.setattr(sources, "READ_AHEAD", 2)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    for sizes in ([1], [7, 512, 1000, 3], [300], [4096], [333, -1]):
        got, i = [], 0
        with sources.Stream(str(path), hash_bytes=True) as stream:
            while True:
                n = sizes[i % len(sizes)]
                i += 1
                piece = stream.read(n)  # kept as given, not copied
                got.append(piece)
                if not piece and (n != -1 or sum(map(len, got)) == size):
                    break
            assert stream.finish() == (size, hashlib.sha256(data).hexdigest())
        assert b"".join(got) == data, sizes


def test_verified_members_larger_than_the_read_ahead_are_exact(tmp_path):
    """Regression: members of several MB (a 1024² FFX image is 6 MB) came out of a verifying
    stream with later bytes in them while the hash still matched — tarfile joins a member from
    many reads, and the buffers behind the first ones were reused meanwhile."""
    import hashlib
    import tarfile

    from keyshard import sources
    from keyshard.shardformat import stream_shard

    rng = np.random.default_rng(5)
    members = {"a.img.npy": (6 << 20) + 5, "a.mask.png": 700, "b.img.npy": 3 * sources.READ_PIECE, "b.mask.png": 1}
    members = {name: rng.integers(0, 256, n, dtype=np.uint8).tobytes() for name, n in members.items()}
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = path.read_bytes()
    expected = {"samples": 2, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    for verify in (True, False):
        got = {f"{key}.{ext}": bytes(value) for key, files in stream_shard(str(path), expected, verify)
               for ext, value in files.items()}
        assert got == members, verify


@pytest.mark.parametrize("fail_at", [0, 2500, 9000])
def test_verified_stream_read_error_is_one_line_and_stops_cleanly(fail_at, tmp_path, monkeypatch):
    """A read that fails in the middle of a verifying stream (either thread may hit it) is one
    KeyshardError naming the location, raised only after the bytes before it; nobody reads on
    past it, and an abandoned stream's hashing thread ends."""
    import threading

    from keyshard import sources

    monkeypatch.setattr(sources, "READ_PIECE", 1000)
    monkeypatch.setattr(sources, "READ_CHUNK", 250)
    data = bytes(range(256)) * 40
    path = tmp_path / "f.bin"
    path.write_bytes(data)

    class Failing:
        def __init__(self, f):
            self.f = f

        def read(self, n):
            if self.f.tell() + n > fail_at:
                raise OSError(5, "Input/output error")
            return self.f.read(n)

        def close(self):
            self.f.close()

    real_open = sources.open_binary
    monkeypatch.setattr(sources, "open_binary", lambda location, size=None: Failing(real_open(location, size)))
    got = []
    with pytest.raises(KeyshardError) as err:
        with sources.Stream(str(path), hash_bytes=True) as stream:
            while piece := stream.read(250):
                got.append(bytes(piece))
    assert str(err.value) == f"{path}: cannot read (Input/output error)"
    assert b"".join(got) == data[:len(b"".join(got))] and len(b"".join(got)) <= fail_at
    monkeypatch.setattr(sources, "open_binary", real_open)
    with sources.Stream(str(path), hash_bytes=True) as stream:  # abandoned after one read
        assert bytes(stream.read(250)) == data[:250]
    assert not [t for t in threading.enumerate() if t.name == "keyshard-hash"]


def test_decode_npy_without_copy_is_numpys_array_as_a_read_only_view():
    """The loader's ``decode_npy(copy=False)`` gives numpy's own reading of the member, as a view
    of its bytes (format 1.0; anything else, and bad members, go numpy's copying way)."""
    from keyshard.shardformat import decode_npy, encode_npy

    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), rng.integers(0, 65536, (4, 6, 3), dtype=np.uint16),
              np.asfortranarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)), np.zeros((0, 4, 3), np.uint8)]
    members = [encode_npy(a) for a in arrays]
    fortran = io.BytesIO()
    np.lib.format.write_array(fortran, arrays[2])  # kept in Fortran order, as another writer may
    v2 = io.BytesIO()
    np.lib.format.write_array(v2, arrays[1], version=(2, 0))
    members += [fortran.getvalue(), v2.getvalue()]
    for data in members:
        expected = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        view = decode_npy(data, copy=False)
        assert view.dtype == expected.dtype and view.shape == expected.shape
        np.testing.assert_array_equal(view, expected)
        assert decode_npy(data).flags.writeable
    view = decode_npy(members[0], copy=False)
    assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(members[0], np.uint8))
    pickled = io.BytesIO()
    np.lib.format.write_array(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (members[0][:-1], b"not an npy member", pickled.getvalue()):
        with pytest.raises(ValueError):
            decode_npy(bad, copy=False)


def _stored(source: Path, split: str) -> dict:
    """key → (pixels, mask) of every stored sample of a split, read with numpy and Pillow (not the
    loader's own decoders)."""
    import io

    from PIL import Image

    from keyshard.shardformat import iter_tar_samples

    manifest = json.loads((source / "manifest.json").read_text())
    return {key: (np.load(io.BytesIO(files["img.npy"])), np.asarray(Image.open(io.BytesIO(files["mask.png"]))))
            for shard in manifest["shards"] if shard["split"] == split
            for key, files in iter_tar_samples(source / shard["file"])}


def test_worker_batches_are_exact_copies_the_caller_keeps(shards, monkeypatch):
    """With workers, batches come through reused shared-memory slots: every batch the caller keeps
    (over several epochs, one of them abandoned after a batch) still holds its own stored samples."""
    from keyshard.train.batch_ring import BatchRing

    stored = _stored(shards / "ffx4", "train")
    took, take = [], BatchRing.take
    monkeypatch.setattr(BatchRing, "take", lambda ring, batch, pin: took.append(batch.n) or take(ring, batch, pin))
    loader = keyshard.open_shards(str(shards / "ffx4"), "train", batch_size=3, workers=2)
    kept = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        kept += list(loader)
    loader.set_epoch(2)
    next(iter(loader))  # abandoned: the workers' slots still hold batches nobody will read
    loader.set_epoch(3)
    took.clear()
    kept += list(loader)
    assert len(took) >= len(loader) // 2  # the slots were reclaimed for the next epoch
    for pixels, masks, ids, n_pad in kept:
        assert pixels.dtype == torch.uint16 and not pixels.is_shared() and not masks.is_shared() and n_pad == 0
        for i, key in enumerate(ids):
            assert np.array_equal(pixels[i].numpy(), stored[key][0]) and np.array_equal(masks[i].numpy(), stored[key][1])
    assert sum(len(ids) for *_, ids, _ in kept) == 3 * len(stored)


def test_with_workers_the_slot_copy_runs_off_the_callers_thread(shards, monkeypatch):
    """Each batch is copied out of its slot on the copy-ahead thread, not between the caller's steps."""
    import threading

    from keyshard.train.batch_ring import BatchRing

    threads, take = set(), BatchRing.take
    monkeypatch.setattr(BatchRing, "take",
                        lambda ring, batch, pin: threads.add(threading.get_ident()) or take(ring, batch, pin))
    loader = keyshard.open_shards(str(shards / "ffx4"), "train", batch_size=3, workers=2)
    n = sum(len(ids) - n_pad for _, _, ids, n_pad in loader)
    assert n == loader.plan.samples and threads and threading.get_ident() not in threads


def test_batch_ring_slots_are_reused_and_a_full_ring_says_so():
    from keyshard.train.batch_ring import BatchRing

    ring = BatchRing(2, 2, 4, (2, 2, 3), np.uint16, (2, 2), np.uint8)
    rng = np.random.default_rng(0)
    batches = [([f"k{i}", f"k{i}b"], list(rng.integers(0, 1 << 16, (2, 2, 2, 3), dtype=np.uint16)),
                list(rng.integers(0, 256, (2, 2, 2), dtype=np.uint8))) for i in range(3)]
    first, second = (ring.put(1, *b) for b in batches[:2])
    assert (first.worker, first.slot, first.n, second.slot) == (1, 0, 2, 1)
    assert ring.put(1, *batches[2]) is None  # both of worker 1's slots are in use
    assert ring.put(0, *batches[2]).slot == 0  # worker 0 has its own
    pixels, masks, ids = ring.take(first, pin=False)
    assert ring.put(1, *batches[2]).slot == 0  # taken: free again, and overwriting it ...
    assert ids == ["k0", "k0b"] and np.array_equal(pixels.numpy(), np.stack(batches[0][1]))  # ... spares the copy
    assert np.array_equal(masks.numpy(), np.stack(batches[0][2]))
    assert ring.put(0, ["a"], [np.zeros((3, 2, 3), np.uint16)], [np.zeros((3, 2), np.uint8)]) is None  # wrong shape
    ring.reclaim(1)
    assert ring.put(1, *batches[0]).slot == 0


def test_too_little_shared_memory_is_one_line_and_leaves_nothing(shards):
    """In a mount namespace with a 1 MB /dev/shm: the batch slots do not fit — one line, no file
    left there (also when torch itself runs out: it leaves its failed segment's name behind)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (root) to give the test a small /dev/shm")
    code = ("import os, keyshard; from keyshard.errors import KeyshardError; from keyshard.train import batch_ring\n"
            "for free in (batch_ring._shm_free, lambda: None):\n"
            "    batch_ring._shm_free = free\n"
            "    try:\n"
            f"        keyshard.open_shards({str(shards / 'ffx4')!r}, 'train', batch_size=64, workers=2)\n"
            "    except KeyshardError as exc:\n"
            "        print(exc)\n"
            "print('left:', os.listdir('/dev/shm'))\n")
    script = 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$0" -c "$1"'
    res = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, code], capture_output=True, text=True)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and res.stderr == "" and len(lines) == 3, res
    assert lines[0].startswith("/dev/shm: no room for the loader's batch slots (5 MB for 2 worker(s); 1 MB free)")
    assert lines[1].startswith("/dev/shm: no room") and "No space left on device" in lines[1]
    assert lines[2] == "left: []"


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores: on purpose
@pytest.mark.parametrize("rank", [0, 1])
def test_unshuffled_batches_are_the_same_at_any_worker_count(shards, rank):
    """shuffle=False is manifest order: 2 and 3 workers give the batches 0 workers gives — same
    ids in the same order, same rows, same padding (2 ranks: the shorter one pads)."""
    def batches(workers):
        return list(keyshard.open_shards(str(shards / "ffx4"), "train", batch_size=3, shuffle=False, workers=workers,
                                         rank=rank, world=2))

    reference = batches(0)
    assert sum(len(ids) for *_, ids, _ in reference) > 3 * 3
    for workers in (2, 3):
        got = batches(workers)
        assert [(ids, n) for *_, ids, n in got] == [(ids, n) for *_, ids, n in reference], workers
        for (p, m, _, _), (rp, rm, _, _) in zip(got, reference):
            assert torch.equal(p, rp) and torch.equal(m, rm)


class _HalfScale:
    """An augment that changes dtypes (uint16 codes → float32 halves, masks → int64): its batches
    cannot use the workers' slots and must come through unchanged all the same."""

    def __call__(self, pixels, mask, key):
        return pixels.astype(np.float32) / 2, mask.astype(np.int64)


def test_an_augment_that_changes_dtypes_gives_the_same_batches_with_workers(shards):
    def batches(workers):
        return list(keyshard.open_shards(str(shards / "ffx4"), "train", batch_size=4, shuffle=False,
                                         workers=workers, augment=_HalfScale()))

    reference, got = batches(0), batches(2)
    assert reference[0][0].dtype == torch.float32 and reference[0][1].dtype == torch.int64
    assert [ids for *_, ids, _ in got] == [ids for *_, ids, _ in reference]
    for (p, m, _, _), (rp, rm, _, _) in zip(got, reference):
        assert p.dtype == rp.dtype and m.dtype == rm.dtype and torch.equal(p, rp) and torch.equal(m, rm)
