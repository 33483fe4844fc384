"""Streaming training: loader coverage, uneven DDP ranks, torchrun, resume, checkpoint safety."""

import json
import os
import subprocess
import sys

import pytest
import torch

from keyshard import faults, keys
from keyshard.pipeline import encrypt_job
from keyshard.manifest import read as read_manifest
from keyshard.pipeline.toy_voc import make_toy_voc
from keyshard.train import checkpoint
from keyshard.train.data import epoch_plan, model_input, open_shards
from keyshard.train.loop import TrainConfig, Trainer, param_digest
from keyshard.train.step import segmentation_loss
from keyshard.train.models import build_model
from keyshard.transforms import normalize_pixels

from conftest import assert_user_error, invoke

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Toy VOC (56 images) → plain shards and np-M4 shards at 32x32, 4 samples per shard,
    one augmentation replica (train: 25 ids → shards of 4,4,4,4,4,4,1 per replica)."""
    root = tmp_path_factory.mktemp("train")
    voc = make_toy_voc(root / "voc", images=56, seed=3, min_side=40, max_side=56, progress=False)
    opts = encrypt_job.EncryptOptions(size=SIZE, shard_size=4, augment_copies=1, splits=("train", "holdout"))
    encrypt_job.run(str(voc), str(root / "plain"), None, opts, jobs=1, progress=False)
    key = keys.generate("np", 4)
    keys.save(key, root / "key.json")
    encrypt_job.run(str(voc), str(root / "np4"), key, opts, jobs=1, progress=False)
    return root


def small_config(**kw):
    base = dict(epochs=1, batch_size=4, micro_batch=4, workers=0, shuffle_buffer=8, seed=0)
    return TrainConfig.from_preset("demo", **{**base, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_each_manifest_sample_once(data, workers):
    manifest = read_manifest(data / "plain").raw
    loader = open_shards(str(data / "plain"), "train", batch_size=5, workers=workers, shuffle_buffer=8)
    for epoch, replica in ((0, 0), (1, 1), (2, 0)):  # one loader, its workers kept across epochs
        loader.set_epoch(epoch)
        batches = list(loader)
        keys_seen = [k for _, _, ks, _ in batches for k in ks]
        expected = sum(s["samples"] for s in manifest["shards"] if s["split"] == "train" and s["replica"] == replica)
        assert len(keys_seen) == len(set(keys_seen)) == expected == 25
        assert all(("_a1" in k) == (replica == 1) for k in keys_seen)
        assert [len(b[2]) for b in batches] == [5] * 5 and len(loader) == 5
        pixels, masks, _, n_pad = batches[0]
        assert pixels.dtype == torch.uint8 and pixels.shape == (5, SIZE, SIZE, 3) and n_pad == 0
        assert masks.dtype == torch.uint8 and masks.shape == (5, SIZE, SIZE)
    # the order depends on the epoch's seed, not on chance
    a = [k for _, _, ks, _ in open_shards(str(data / "plain"), batch_size=5, workers=workers, shuffle_buffer=8) for k in ks]
    loader.set_epoch(0)
    assert a == [k for _, _, ks, _ in loader for k in ks]


def test_uneven_ranks_take_equal_steps_and_cover_everything(data):
    manifest = read_manifest(data / "plain").raw
    seen, steps, padding = [], [], []
    for rank in (0, 1):
        batches = list(open_shards(str(data / "plain"), "train", batch_size=3, rank=rank, world=2))
        steps.append(len(batches))
        padding.append(sum(n for *_, n in batches))
        seen += [k for _, _, ks, _ in batches for k in ks if k]
        for pixels, masks, ks, n_pad in batches:  # padding samples are all void
            for i, k in enumerate(ks):
                assert bool((masks[i] == 255).all()) == (k == "")
    assert steps[0] == steps[1]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 25
    # 7 shards (six of 4, one of 1) split 4/3: the ranks' counts differ, the shorter one pads
    plans = [epoch_plan(data / "plain", manifest, "train", 0, 0, r, 2) for r in (0, 1)]
    assert padding == [p.padding for p in plans] and min(padding) == 0 and max(padding) > 0
    assert plans[0].samples + plans[1].samples == 25


def test_one_demo_epoch_lowers_the_loss(data, tmp_path):
    manifest = read_manifest(data / "plain")

    def train_loss(model):
        model.eval()
        total = count = 0.0
        with torch.no_grad():
            for pixels, masks, _, _ in open_shards(str(data / "plain"), batch_size=8, shuffle=False):
                total += float(segmentation_loss(model(model_input(pixels, manifest, "cpu")), masks.long(), 0))
                count += float((masks != 255).sum())
        return total / count

    torch.manual_seed(0)
    before = train_loss(build_model("small"))
    trainer = Trainer(data / "plain", tmp_path / "run", small_config(lr=0.05), progress=False, log=lambda m: None)
    result = trainer.fit()
    after = train_loss(trainer.model)
    assert after < 0.6 * before, (before, after)
    assert result["history"][0]["train_samples"] == 25 and result["history"][0]["train_padding"] == 0
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["epoch"] == 1 and "holdout_loss" in lines[0]


def test_killed_run_resumes_to_identical_weights(data, tmp_path):
    """SIGKILL during epoch 2 of 3 (a test hook kills after an exact step), then --resume: the
    run continues from the last completed epoch and ends bit-identical to an uninterrupted one."""
    from conftest import run_subprocess

    args = ["train", "--shards", data / "np4", "--epochs", 3, "--batch-size", 4, "--workers", 1,
            "--shuffle-buffer", 8, "-q"]
    steps = 7  # 25 train samples in batches of 4
    killed = subprocess.run([sys.executable, "-c", "from keyshard.cli import main; main()",
                             *map(str, args), "--output", str(tmp_path / "part")], capture_output=True, text=True,
                            env={**os.environ, **faults.arm("train.step", steps + 3)})
    assert killed.returncode == -9, killed.stderr
    state = checkpoint.load(tmp_path / "part" / "last.pt")  # complete, never truncated
    assert state["epoch"] == 0 and len(state["metrics"]) == 1
    checkpoint.load(tmp_path / "part" / "best.pt")
    assert run_subprocess(*args, "--output", tmp_path / "part", "--resume").returncode == 0
    assert run_subprocess(*args, "--output", tmp_path / "full").returncode == 0
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "part" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items())
    assert [m["train_loss"] for m in a["metrics"]] == [m["train_loss"] for m in b["metrics"]]


def test_checkpoint_carries_the_fingerprint_not_the_secret(data, tmp_path):
    run = tmp_path / "run"
    res = invoke("train", "--shards", data / "np4", "--output", run, "--epochs", 1, "--batch-size", 4,
                 "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    key = keys.load(data / "key.json")
    state = checkpoint.load(run / "best.pt")
    assert state["data"]["key_fingerprint"] == key.fingerprint
    assert (state["data"]["method"], state["data"]["block_size"]) == ("np", 4)
    raw = (run / "best.pt").read_bytes() + (run / "last.pt").read_bytes() + res.output.encode()
    for needle in (key.secret, key.secret.hex().encode(), key.material.mask.astype("uint8").tobytes()):
        assert needle not in raw
    assert "np M=4" in res.output and "from scratch" in res.output
    # a second run into the same directory is refused; resume with other settings too
    assert_user_error(invoke("train", "--shards", data / "np4", "--output", run, "-q"), "not empty")
    assert_user_error(invoke("train", "--shards", data / "np4", "--output", run, "--resume", "--lr", "0.2",
                             "--batch-size", 4, "--workers", 0, "-q"), "lr")
    assert_user_error(invoke("train", "--shards", data / "plain", "--output", run, "--resume", "-q",
                             "--batch-size", 4, "--workers", 0), "other shards")


def test_weights_file_errors(data, tmp_path):
    assert_user_error(invoke("train", "--shards", data / "plain", "--output", tmp_path / "r1", "--weights",
                             tmp_path / "missing.pt", "-q"), "missing.pt", "not found")
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    assert_user_error(invoke("train", "--shards", data / "plain", "--output", tmp_path / "r2", "--weights", bad, "-q"),
                      "bad.pt", "do not fit")
    wrong_shape = tmp_path / "shape.pt"
    torch.save({"stem.0.0.weight": torch.zeros(5, 3, 3, 3)}, wrong_shape)
    assert_user_error(invoke("train", "--shards", data / "plain", "--output", tmp_path / "r4", "--weights", wrong_shape,
                             "-q"), "shape.pt", "shapes differ")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    assert_user_error(invoke("train", "--shards", data / "plain", "--output", tmp_path / "r3", "--weights", junk, "-q"),
                      "junk.pt")


def test_weights_from_a_keyshard_checkpoint(data, tmp_path):
    first = Trainer(data / "plain", tmp_path / "a", small_config(), progress=False, log=lambda m: None)
    first.fit()
    second = Trainer(data / "np4", tmp_path / "b", small_config(epochs=0 + 1, weights=str(tmp_path / "a" / "best.pt")),
                     progress=False, log=lambda m: None)
    best = checkpoint.load(tmp_path / "a" / "best.pt")["model"]
    assert all(torch.equal(v, second.model.state_dict()[k]) for k, v in best.items())


def test_torchrun_two_gloo_processes(data, tmp_path):
    """2 gloo ranks under torchrun on uneven shards: equal steps, a global batch split over the
    ranks, identical replicas at the end."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29533", "-m", "keyshard.cli", "train", "--shards", str(data / "plain"),
                           "--output", str(run), "--epochs", "1", "--batch-size", "8", "--micro-batch", "2",
                           "--workers", "1", "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # --batch-size is global: 8 over 2 ranks = 4 per rank, in micro-batches of 2
    assert "batch 8 global: 4 per rank × 2 rank(s), micro-batches of 2 — BatchNorm sees 2 images" in proc.stdout
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    manifest = read_manifest(data / "plain")
    expected_pad = sum(epoch_plan(data / "plain", manifest, "train", 0, 0, r, 2).padding for r in (0, 1))
    assert lines[0]["train_samples"] == 25 and lines[0]["train_padding"] == expected_pad > 0
    plans = [epoch_plan(data / "plain", manifest, "train", 0, 0, r, 2) for r in (0, 1)]
    assert lines[0]["steps"] == -(-plans[0].target // 4)  # per-rank batches of 4
    digests = lines[-1]["rank_param_sha256"]
    model = build_model("small")
    model.load_state_dict(checkpoint.load(run / "last.pt")["model"])
    assert len(digests) == 2 and digests[0] == digests[1] == param_digest(model)
    assert checkpoint.load(run / "last.pt")["world_size"] == 2


@pytest.mark.parametrize("method", keys.METHODS)
def test_block_moves_commute_with_every_key_but_a_pixel_mirror_does_not(method):
    import numpy as np

    from keyshard.train.augment import block_crop, block_hflip
    from keyshard.transforms import compile_plan

    m = 4
    key = keys.generate(method, m)
    plan = compile_plan(key.material, 16, 16)
    x = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    enc = lambda a: plan.encrypt(np.ascontiguousarray(a))
    flipped, _ = block_hflip(x, mask, m)
    assert np.array_equal(enc(flipped), block_hflip(enc(x), mask, m)[0])
    cropped, _ = block_crop(x, mask, m, 8, np.random.default_rng(5))
    crop_plan = compile_plan(key.material, 8, 8)
    enc_cropped, _ = block_crop(enc(x), mask, m, 8, np.random.default_rng(5))
    assert np.array_equal(crop_plan.encrypt(np.ascontiguousarray(cropped)), enc_cropped)
    assert not np.array_equal(enc(x[:, ::-1]), enc(x)[:, ::-1])  # a true mirror breaks the key


def test_training_with_key_safe_augmentation(data, tmp_path):
    trainer = Trainer(data / "np4", tmp_path / "aug", small_config(block_flip=True, block_crop=24),
                      progress=False, log=lambda m: None)
    assert trainer.fit()["history"][0]["train_samples"] == 25
    with pytest.raises(Exception, match="multiple of the block size"):
        Trainer(data / "np4", tmp_path / "aug2", small_config(block_crop=22), progress=False)


def test_paper_model_builds_offline_and_loads_a_local_resnet50(tmp_path):
    from torchvision.models import resnet50

    weights = tmp_path / "resnet50.pth"
    torch.manual_seed(1)
    torch.save(resnet50(weights=None).state_dict(), weights)
    model = build_model("fcn_resnet50", str(weights), aux_loss=True)
    reference = torch.load(weights, weights_only=True)
    assert torch.equal(model.backbone.conv1.weight, reference["conv1.weight"])
    assert torch.equal(model.backbone.layer4[2].conv3.weight, reference["layer4.2.conv3.weight"])
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out["out"].shape == (1, 21, 64, 64) and out["aux"].shape == (1, 21, 64, 64)


@pytest.mark.parametrize("method", ["shf", "np"])
@pytest.mark.parametrize("m", [2, 8, 32])
def test_protect_makes_encrypted_inputs_give_the_plain_outputs(method, m):
    import numpy as np

    from keyshard.train.models import BlockAlignedSegNet
    from keyshard.train.protect import protect_model
    from keyshard.transforms import compile_plan

    torch.manual_seed(m)
    plain_model = BlockAlignedSegNet(m).eval()
    protected = BlockAlignedSegNet(m).eval()
    protected.load_state_dict(plain_model.state_dict())
    key = keys.generate(method, m)
    protect_model(protected, key.material)
    x = np.random.default_rng(m).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    enc = compile_plan(key.material, 64, 64).encrypt(x)
    with torch.no_grad():
        want = plain_model(normalize_pixels(torch.from_numpy(x), 255))["out"]
        got = protected(normalize_pixels(torch.from_numpy(enc), 255))["out"]
        other = plain_model(normalize_pixels(torch.from_numpy(enc), 255))["out"]
    err = (got - want).abs().max().item()
    assert err <= 1e-4
    assert (other - want).abs().max().item() > 10 * max(err, 1e-5)  # the unprotected model does not agree


def test_protect_refuses_ffx():
    from keyshard.train.models import BlockAlignedSegNet
    from keyshard.train.protect import protect_model

    with pytest.raises(Exception, match="FFX is not linear"):
        protect_model(BlockAlignedSegNet(4), keys.generate("ffx", 4).material)


def test_protect_command_end_to_end(data, tmp_path):
    from keyshard.evaluate.audit import score_on_split
    from keyshard.train.checkpoint import load_model

    run = tmp_path / "plain-ba"
    res = invoke("train", "--shards", data / "plain", "--output", run, "--model", "block_aligned", "--block-size", 4,
                 "--epochs", 1, "--batch-size", 4, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    key = data / "key.json"  # np M=4
    out = tmp_path / "protected" / "best.pt"
    res = invoke("protect", "--checkpoint", run / "best.pt", "--key", key, "-o", out)
    assert res.exit_code == 0, res.output
    state = checkpoint.load(out)
    assert state["data"]["key_fingerprint"] == keys.load(key).fingerprint and not state["data"]["plain"]
    # the protected model on keyed holdout shards == the plain model on plain holdout shards
    plain_model, _ = load_model(str(run / "best.pt"), "cpu")
    prot_model, _ = load_model(str(out), "cpu")
    manifest_p, manifest_e = read_manifest(data / "plain"), read_manifest(data / "np4")
    a = score_on_split(plain_model, [(None, 255)], str(data / "plain"), manifest_p, "cpu", progress=False,
                       split="holdout")[0]
    b = score_on_split(prot_model, [(None, 255)], str(data / "np4"), manifest_e, "cpu", progress=False,
                       split="holdout")[0]
    assert b["miou"] == pytest.approx(a["miou"], abs=1e-3) and b["pixel_acc"] == pytest.approx(a["pixel_acc"], abs=1e-3)
    ffx = tmp_path / "ffx.json"
    keys.save(keys.generate("ffx", 4), ffx)
    assert_user_error(invoke("protect", "--checkpoint", run / "best.pt", "--key", ffx, "-o", tmp_path / "f.pt"),
                      "FFX is not linear")
    assert_user_error(invoke("protect", "--checkpoint", out, "--key", key, "-o", tmp_path / "g.pt"),
                      "keyed shards already")
    assert_user_error(invoke("train", "--shards", data / "plain", "--output", tmp_path / "x", "--model", "block_aligned",
                             "-q"), "--block-size")
    assert_user_error(invoke("train", "--shards", data / "np4", "--output", tmp_path / "y", "--model", "block_aligned",
                             "--block-size", 8, "-q"), "disagrees")


def test_block_aligned_model_keeps_its_accuracy_under_the_key(tmp_path):
    """Same network and seed trained on plain and on NP-keyed shards: (almost) the same mIoU,
    while the keyed model collapses on plain images and wrong keys."""
    from keyshard.evaluate import wrong_keys
    from keyshard.evaluate.audit import score_on_split
    from keyshard.train.checkpoint import load_model
    from keyshard.pipeline.toy_voc import make_toy_voc
    from keyshard.transforms import compile_plan

    voc = make_toy_voc(tmp_path / "voc", images=160, seed=21, min_side=40, max_side=56, progress=False)
    key = keys.Key("np", 4, bytes(range(32)))  # fixed: the test must not depend on a random key
    for name, k in (("plain", None), ("enc", key)):
        encrypt_job.run(str(voc), str(tmp_path / name), k, encrypt_job.EncryptOptions(size=SIZE, shard_size=32),
                        jobs=1, progress=False)
    cfg = dict(model="block_aligned", epochs=16, batch_size=8, micro_batch=8, workers=0, lr=0.1, restart_epochs=16)
    Trainer(tmp_path / "plain", tmp_path / "rp", small_config(block_size=4, **cfg), progress=False, log=lambda m: None).fit()
    Trainer(tmp_path / "enc", tmp_path / "re", small_config(**cfg), progress=False, log=lambda m: None).fit()
    test = (str(tmp_path / "plain"), read_manifest(tmp_path / "plain"))
    plain_model, _ = load_model(str(tmp_path / "rp" / "last.pt"), "cpu")  # same step count, no selection noise
    keyed_model, _ = load_model(str(tmp_path / "re" / "last.pt"), "cpu")
    baseline = score_on_split(plain_model, [(None, 255)], *test, "cpu", progress=False)[0]["miou"]
    configs = [(compile_plan(k.material, SIZE, SIZE).to_torch("cpu"), 255)
               for k in [key] + wrong_keys.draw(key, 3, seed=0)]
    correct, *wrong = [s["miou"] for s in score_on_split(keyed_model, configs + [(None, 255)], *test, "cpu", progress=False)]
    plain_images = wrong.pop()
    print(f"block-aligned: plain {baseline:.3f}, keyed {correct:.3f}, plain images {plain_images:.3f}, wrong {wrong}")
    assert baseline > 0.25, baseline
    # no accuracy lost to the key (short runs differ by training noise, so only a loss would fail)
    assert correct > baseline - 0.05, (correct, baseline)
    assert plain_images < 0.5 * correct and max(wrong) < 0.5 * correct, (correct, plain_images, wrong)


def test_presets_are_the_papers_and_the_batch_is_global(data, tmp_path):
    paper = TrainConfig.from_preset("paper")
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.momentum, paper.weight_decay,
            paper.restart_epochs, paper.min_lr, paper.aux_weight, paper.global_batch) == \
        ("fcn_resnet50", 100, 256, 0.1, 0.9, 0.005, 10, 1e-4, 0.0, True)
    assert TrainConfig.from_preset("paper", aux_weight=0.5).aux_weight == 0.5  # only when asked for
    with pytest.raises(Exception, match="multiple of 1 rank"):
        Trainer(data / "np4", tmp_path / "q", small_config(batch_size=8, micro_batch=3), progress=False)
    t = Trainer(data / "np4", tmp_path / "r", small_config(batch_size=8, micro_batch=32), progress=False)
    assert (t.rank_batch, t.micro_batch) == (8, 8)
    # paper preset on keyed shards without augmentation replicas: a warning says what the paper did
    logs = []
    Trainer(data / "np4", tmp_path / "w", TrainConfig.from_preset("paper", model="small", epochs=1, batch_size=4,
                                                                  workers=0), progress=False, log=logs.append).fit()
    assert not any("augment" in m for m in logs)  # these shards have a replica
    enc = tmp_path / "np4-noaug"
    from keyshard.pipeline import encrypt_job as ej

    ej.run(str(data / "voc"), str(enc), keys.load(data / "key.json"),
           ej.EncryptOptions(size=SIZE, shard_size=8, splits=("train", "holdout")), jobs=1, progress=False)
    Trainer(enc, tmp_path / "w2", TrainConfig.from_preset("paper", model="small", epochs=1, batch_size=4,
                                                           workers=0), progress=False, log=logs.append).fit()
    assert any("augments every epoch" in m and "--augment-copies" in m for m in logs), logs
    # a run saved with the old per-process meaning keeps it on --resume
    state = checkpoint.load(tmp_path / "w2" / "last.pt")
    del state["config"]["global_batch"]
    checkpoint.save(tmp_path / "w2" / "last.pt", state)
    resumed = Trainer(enc, tmp_path / "w2", TrainConfig.from_preset("paper", model="small", epochs=2, batch_size=4,
                                                                     workers=0), resume=True, progress=False)
    assert resumed.cfg.global_batch is False and resumed.rank_batch == 4
