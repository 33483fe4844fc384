"""Classification (issue 14.2): ImageFolder toy set → encrypt --image-folder → train → evaluate,
and ``protect`` for the patch-embedding model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from keyshard import keys
from keyshard.shardformat import dataset_info, iter_tar_samples
from keyshard.transforms import compile_plan, normalize_pixels

from conftest import assert_user_error, fixed_secret, invoke


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    res = invoke("toy-classes", root / "toy", "--classes", 3, "--images", 90, "--seed", 3)
    assert res.exit_code == 0, res.output
    key = root / "key.json"
    keys.save(keys.Key("shf", 4, fixed_secret(5)), key)
    for name, how in (("enc", ("--key", key)), ("plain", ("--plain",))):
        res = invoke("encrypt", "--image-folder", root / "toy", *how, "-o", root / name, "--image-size", 32,
                     "--shard-size", 32, "-j", 1, "-q")
        assert res.exit_code == 0, res.output
    return root


def test_image_folder_shards_hold_class_indices(cls_data):
    doc = json.loads((cls_data / "enc" / "manifest.json").read_text())
    info = dataset_info(doc)
    assert info["task"] == "classification" and info["num_classes"] == 3
    assert info["class_names"] == ["class_000", "class_001", "class_002"] and info["ignore_index"] is None
    assert sum(doc["splits"]["counts"].values()) == 90 and doc["splits"]["counts"]["test"] == 18  # 20 % per class
    shard = next(s for s in doc["shards"] if s["split"] == "train")
    key, files = next(iter_tar_samples(cls_data / "enc" / shard["file"]))
    assert set(files) == {"img.npy", "cls", "json"}
    meta = json.loads(files["json"])
    assert int(files["cls"]) == meta["class"] == int(meta["id"].split("/")[0][-3:])


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _enc_args(cls_data, out, jobs):
    return ["encrypt", "--image-folder", cls_data / "toy", "--key", cls_data / "key.json", "-o", out,
            "--image-size", 32, "--shard-size", 32, "-j", jobs, "-q"]


def test_image_folder_jobs_give_identical_shards(cls_data, tmp_path):
    out = tmp_path / "j2"
    res = invoke(*_enc_args(cls_data, out, 2))
    assert res.exit_code == 0, res.output
    assert "(3 classes)" in res.output
    reference = _shard_bytes(cls_data / "enc")
    assert len(reference) >= 4 and _shard_bytes(out) == reference
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, cls_data / "enc"))
    assert got["shards"] == want["shards"] and got["dataset"] == want["dataset"]
    assert got["source"]["content_sha256"] == want["source"]["content_sha256"]
    assert got["image"]["mask_resize"].startswith("none")


def test_image_folder_partial_run_resumes(cls_data, tmp_path):
    """A run that died after one shard (made with the job's own helpers) continues with --resume;
    the finished shard is kept, the result is byte-identical to an uninterrupted run."""
    from keyshard.pipeline import encrypt_job
    from keyshard.pipeline.image_folder import ImageFolderDataset

    out = tmp_path / "part"
    key = keys.load(cls_data / "key.json")
    opts = encrypt_job.EncryptOptions(size=32, shard_size=32)
    dataset = ImageFolderDataset(str(cls_data / "toy"))
    _, entry, record = dataset.check()
    source = dataset.open(opts.split_seed)
    tasks, _ = encrypt_job.plan_tasks(source, opts)
    identity = encrypt_job.job_identity(source, key, opts)
    identity["source"].update(record)
    identity["dataset"] = entry
    partial = encrypt_job.prepare_output(out, identity, resume=False)
    encrypt_job.commit_shard(out, partial, encrypt_job.process_shard(tasks[0], key.material, opts, str(partial)))
    kept = (out / tasks[0].name).stat().st_ino
    args = _enc_args(cls_data, out, 1)
    assert_user_error(invoke(*args), "--resume")
    assert_user_error(invoke(*args, "--resume", "--val-fraction", 0.3), "source")  # another split: refused
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert (out / tasks[0].name).stat().st_ino == kept  # not redone
    assert _shard_bytes(out) == _shard_bytes(cls_data / "enc")
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, cls_data / "enc"))
    assert got["shards"] == want["shards"]
    assert not (out / ".keyshard-partial").exists()


def test_splits_from_lists(cls_data, tmp_path):
    ids = sorted(p.relative_to(cls_data / "toy").as_posix() for p in (cls_data / "toy").rglob("*.png"))
    (tmp_path / "train.txt").write_text("\n".join(ids[:60]))
    (tmp_path / "val.txt").write_text("\n".join(ids[60:]))
    res = invoke("encrypt", "--image-folder", cls_data / "toy", "--plain", "-o", tmp_path / "out", "--image-size", 32,
                 "--splits-from", f"train={tmp_path / 'train.txt'},val={tmp_path / 'val.txt'}", "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["counts"]
    assert counts["test"] == 30 and counts["train"] + counts["holdout"] == 60


def test_task_mismatch_is_refused(cls_data, tmp_path):
    res = invoke("train", "--shards", cls_data / "enc", "--output", tmp_path / "r", "--task", "segmentation",
                 "--workers", 0, "-q")
    assert_user_error(res, "--task segmentation", "classification")


def test_encrypt_train_evaluate_top1(cls_data, tmp_path):
    run = tmp_path / "run"
    res = invoke("train", "--shards", cls_data / "enc", "--output", run, "--epochs", 4, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", "--checkpoint", run / "best.pt", "--key", cls_data / "key.json",
                 "--test", cls_data / "plain", "--wrong-keys", 20, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((run / "audit" / "audit.json").read_text())
    r = audit["results"]
    assert audit["task"] == "classification" and len(r["wrong"]["keys"]) == 20
    assert r["wrong"]["summary"]["mean"] == pytest.approx(np.mean([k["top1_acc"] for k in r["wrong"]["keys"]]))
    assert r["correct"]["top1_acc"] >= 0.8
    assert r["correct"]["top1_acc"] > r["plain"]["top1_acc"] + 0.2
    assert r["correct"]["top1_acc"] > r["wrong"]["summary"]["mean"] + 0.2
    assert (run / "audit" / "audit.png").exists() and "top-1" in (run / "audit" / "audit.md").read_text()
    rep = invoke("report", run, "--csv", tmp_path / "t.csv")
    assert rep.exit_code == 0, rep.output
    row = next(line for line in rep.output.splitlines() if line.startswith("| SHF | 4 | patch_vit | 18 |"))
    s = r["wrong"]["summary"]
    assert (f"| {r['correct']['top1_acc']:.4f} | {r['plain']['top1_acc']:.4f} | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"{s['max']:.4f} |") in row
    header, line = (tmp_path / "t.csv").read_text().splitlines()[:2]
    assert "correct_top1" in header and "wrong_std_top1" in header and ",classification," in line


def test_report_mixes_segmentation_and_classification_audits():
    from keyshard.evaluate.report import check_audit, table

    common = {"format": "keyshard-audit/1", "kind": "key", "key": {"method": "np", "block_size": 4},
              "test": {"images": 20}, "wrong_keys": {"count": 2}}
    seg = {**common, "checkpoint": {"model": "small", "data": {"image_size": 64}},
           "results": {"correct": {"miou": 0.5}, "plain": {"miou": 0.1},
                       "wrong": {"summary": {"mean": 0.05, "max": 0.07}}}}
    cls = {**common, "task": "classification", "checkpoint": {"model": "patch_vit", "data": {"image_size": 32}},
           "results": {"correct": {"top1_acc": 0.9}, "plain": {"top1_acc": 0.3},
                       "wrong": {"summary": {"mean": 0.25, "std": 0.1, "min": 0.1, "max": 0.4}}}}
    for doc in (seg, cls):
        check_audit(doc, "a.json")
    md, csv_text = table([seg, cls])
    assert "| NP | 4 | small | 20 | — | 0.5000 | 0.1000 | 0.0500 | 0.0700 |" in md
    assert "| NP | 4 | patch_vit | 20 | — | 0.9000 | 0.3000 | 0.2500 ± 0.1000 | 0.4000 | — |" in md
    assert csv_text.splitlines()[0].startswith("method,block_size,model,test_images,plain_trained_baseline_miou")
    assert len(csv_text.splitlines()) == 3
    bad = {**cls, "results": {**cls["results"], "correct": {"miou": 0.9}}}
    with pytest.raises(Exception, match="results.correct.top1_acc"):
        check_audit(bad, "b.json")


@pytest.mark.parametrize("method,m", [("shf", 4), ("np", 4), ("shf", 2), ("np", 8)])
def test_protect_patch_embedding_is_exact(method, m):
    from keyshard.train.classifiers import PatchViT
    from keyshard.train.protect import protect_model

    torch.manual_seed(m)
    plain = PatchViT(m, 5, 32).eval()
    protected = PatchViT(m, 5, 32).eval()
    protected.load_state_dict(plain.state_dict())
    key = keys.Key(method, m, fixed_secret(m))
    protect_model(protected, key.material)
    x = np.random.default_rng(m).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    enc = compile_plan(key.material, 32, 32).encrypt(x)
    with torch.no_grad():
        want = plain(normalize_pixels(torch.from_numpy(x), 255))["out"]
        got = protected(normalize_pixels(torch.from_numpy(enc), 255))["out"]
        other = plain(normalize_pixels(torch.from_numpy(enc), 255))["out"]
    err = (got - want).abs().max().item()
    assert err <= 1e-4
    assert (other - want).abs().max().item() > 10 * max(err, 1e-5)


def test_protect_command_on_patch_vit(cls_data, tmp_path):
    from keyshard.train import checkpoint

    run = tmp_path / "plain"
    res = invoke("train", "--shards", cls_data / "plain", "--output", run, "--block-size", 4, "--epochs", 1,
                 "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    out = tmp_path / "protected.pt"
    res = invoke("protect", "--checkpoint", run / "best.pt", "--key", cls_data / "key.json", "-o", out)
    assert res.exit_code == 0, res.output
    state = checkpoint.load(out)
    assert state["model_name"] == "patch_vit" and state["data"]["method"] == "shf"
    plain_model, _ = checkpoint.load_model(run / "best.pt", "cpu")
    model, _ = checkpoint.load_model(out, "cpu")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    enc = compile_plan(keys.load(cls_data / "key.json").material, 32, 32).encrypt(x)
    with torch.no_grad():
        want = plain_model(normalize_pixels(torch.from_numpy(x), 255))["out"]
        got = model(normalize_pixels(torch.from_numpy(enc), 255))["out"]
    assert (got - want).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def np2_run(cls_data):
    """NP M=2 keyed shards of the toy set and a patch_vit trained on them (for the attacks)."""
    root = cls_data / "np2"
    key = root / "key.json"
    root.mkdir()
    keys.save(keys.Key("np", 2, fixed_secret(7)), key)
    res = invoke("encrypt", "--image-folder", cls_data / "toy", "--key", key, "-o", root / "enc", "--image-size", 32,
                 "--shard-size", 32, "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--shards", root / "enc", "--output", root / "run", "--epochs", 4, "--workers", 0, "-q")
    assert res.exit_code == 0, res.output
    return root


def test_known_plaintext_on_image_folder_shards(cls_data, np2_run, tmp_path):
    for enc, key in ((cls_data / "enc", cls_data / "key.json"), (np2_run / "enc", np2_run / "key.json")):
        out = tmp_path / f"{enc.parent.name}-recovered.json"
        res = invoke("attack", "known-plaintext", "--plain", cls_data / "plain", "--encrypted", enc, "-o", out,
                     "--key", key)
        assert res.exit_code == 0, res.output
        report = json.loads(res.output[: res.output.rindex("}") + 1])
        assert report["reproduced"] == 90
        assert report.get("true_mask_equal", report.get("true_key_equal_where_determined")) is True


def test_attack_search_on_a_classifier(cls_data, np2_run, tmp_path):
    out = tmp_path / "search.json"
    res = invoke("attack", "search", "--checkpoint", np2_run / "run" / "best.pt", "--labelled-shards",
                 cls_data / "plain", "--labelled-split", "train", "--labelled", 32, "--test", cls_data / "plain",
                 "--key", np2_run / "key.json", "--top", 3, "--output", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["task"] == "classification" and report["mode"] == "exhaustive" and report["evaluations"] == 924
    assert report["true_key_rank"] == 1 and report["true_key_found"]
    best = report["best"][0]
    assert best["distance_to_true_key"] == 0 and "test_miou" not in best
    assert best["test_top1_acc"] >= 0.8


def test_train_fraction_counts_the_subset(cls_data, tmp_path):
    import math

    from keyshard.train.classify import subset_filter
    from keyshard.train.loop import TrainConfig, Trainer

    doc = json.loads((cls_data / "enc" / "manifest.json").read_text())
    keep = subset_filter(0.25, 0)
    subset = sum(keep(key) for s in doc["shards"] if s["split"] == "train"
                 for key, _ in iter_tar_samples(cls_data / "enc" / s["file"]))
    assert 0 < subset < doc["splits"]["counts"]["train"]
    cfg = TrainConfig.from_preset("demo", epochs=2, batch_size=4, micro_batch=4, workers=0, train_fraction=0.25, seed=0)
    result = Trainer(cls_data / "enc", tmp_path / "run", cfg, progress=False, log=lambda m: None).fit()
    for epoch in result["history"]:
        assert epoch["train_samples"] == subset and epoch["train_padding"] == 0
        assert epoch["steps"] == math.ceil(subset / 4)
    # the schedule completes every epoch: after the last step it stands where it does at t = 2 epochs
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cfg.restart_epochs, eta_min=cfg.min_lr)
    sched.step(2.0)
    assert result["history"][-1]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)


def test_loader_workers_carry_class_indices(cls_data):
    """Class targets (int64 scalars) come through the workers' shared-memory slots unchanged."""
    import keyshard

    doc = json.loads((cls_data / "enc" / "manifest.json").read_text())
    labels = {key: int(files["cls"]) for s in doc["shards"] if s["split"] == "train"
              for key, files in iter_tar_samples(cls_data / "enc" / s["file"])}
    seen = {}
    for pixels, targets, ids, _ in keyshard.open_shards(str(cls_data / "enc"), "train", batch_size=8, workers=2):
        assert targets.dtype == torch.int64 and targets.shape == (len(ids),)
        seen.update(zip(ids, targets.tolist()))
    assert seen == labels
