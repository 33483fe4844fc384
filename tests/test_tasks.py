"""Tasks are plug-ins (``keyshard/tasks/``): the registry, each task's members, and one audit
loop and one writer for every task (audits written atomically, figures first, audit.json last)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from keyshard import shardformat, tasks
from keyshard.errors import KeyshardError

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"


def test_registry_maps_dataset_kinds_and_audits_to_tasks():
    assert tasks.names() == ("segmentation", "classification")
    assert tasks.for_kind("voc").name == tasks.for_kind("folders").name == "segmentation"
    assert tasks.for_kind("image-folder").name == "classification"
    assert tasks.of_audit({}).name == tasks.DEFAULT == "segmentation"  # audits without "task"
    assert tasks.of_audit({"task": "classification"}) is tasks.get("classification")
    with pytest.raises(KeyshardError, match="unknown dataset kind"):
        tasks.for_kind("coco")
    with pytest.raises(KeyshardError, match="unknown task"):
        tasks.get("detection")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(type(tasks.get("classification")))


def test_the_dataset_rule_and_the_registry_agree():
    """``shardformat.dataset_info`` (what manifests and checkpoints say) gives the kind's task."""
    for kind in ("voc", "folders", "image-folder"):
        info = shardformat.dataset_info({"dataset": {"kind": kind, "num_classes": 3, "class_names": ["a", "b", "c"]}})
        assert info["task"] == tasks.for_kind(kind).name
    assert shardformat.dataset_info({})["task"] == tasks.DEFAULT


def test_no_task_names_outside_the_tasks_package():
    """No product code branches on a task name or on the image-folder kind: it asks the task
    (``tasks.for_kind``, its members and hooks).  Only keyshard/tasks/ names tasks."""
    pattern = re.compile(r'"(segmentation|classification)"|== *"image-folder"')
    pending = set()
    hits = []
    for folder in ("keyshard", "pipeline", "train", "evaluate"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("keyshard/tasks/") or rel in pending:
                continue
            hits += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_training_rules_are_the_tasks():
    """What the loader pads with and what the trainer accepts come from the task: its models
    (a preset's segmentation model is swapped for the classifier), and settings another task owns."""
    from types import SimpleNamespace

    from keyshard.train.loop import TrainConfig, resolve_task
    from keyshard.train.presets import CLASSIFIERS, SEGMENTATION_MODELS

    seg, cls = tasks.get("segmentation"), tasks.get("classification")
    assert seg.padding_target(None) == shardformat.VOID and seg.padding_target(10) == 10
    assert cls.padding_target(None) == -100
    assert seg.hook("model_names") == SEGMENTATION_MODELS and cls.hook("model_names") == CLASSIFIERS

    def resolve(kind, **settings):
        manifest = SimpleNamespace(dataset=SimpleNamespace(kind=kind))
        return resolve_task(TrainConfig.from_preset("demo", **settings), manifest, "D", 1)

    assert resolve("voc")[0] == "segmentation" and resolve("voc")[1].model == "small"
    assert resolve("image-folder")[1].model == "patch_vit" and resolve("image-folder", model="resnet18")[1].model == "resnet18"
    for kind, settings, message in [("voc", {"model": "patch_vit"}, "is a classifier, but D holds segmentation"),
                                    ("image-folder", {"model": "fcn_resnet50"}, "is a segmentation model"),
                                    ("voc", {"train_fraction": 0.5}, "`train_fraction` is for classification shards"),
                                    ("image-folder", {"block_crop": 8}, "`block_flip`/`block_crop` are for segmentation"),
                                    ("voc", {"task": "classification"}, "holds segmentation data")]:
        with pytest.raises(KeyshardError, match=re.escape(message)):
            resolve(kind, **settings)


def test_targets_encode_to_the_shard_bytes_and_back():
    seg, cls = tasks.get("segmentation"), tasks.get("classification")
    mask = np.random.default_rng(0).integers(0, 21, (6, 5), dtype=np.uint8)
    assert seg.target_member == "mask.png" and cls.target_member == "cls"
    assert seg.encode_target(mask) == shardformat.encode_mask(mask)
    assert np.array_equal(seg.decode_target(seg.encode_target(mask)), mask)
    assert cls.encode_target(7) == b"7" and cls.decode_target(b"7\n") == 7
    assert cls.sample_meta(7) == {"class": 7} and seg.sample_meta(mask) == {}
    assert seg.target_shape(4, 6) == (4, 6) and cls.target_shape(4, 6) == ()
    with pytest.raises(ValueError):
        cls.decode_target(b"seven")


@pytest.mark.parametrize("name,model", [("segmentation", "small"), ("classification", "patch_vit")])
def test_hooks_resolve_to_the_stages_and_build_models_with_one_signature(name, model):
    task = tasks.get(name)
    build, loss, scorer = task.hook("model"), task.hook("loss"), task.hook("scorer")
    net = build(model, num_classes=3, block_size=4, image_size=16, weights=None, aux_loss=False).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 16, 16))["out"]
    target = torch.zeros((2, *task.target_shape(16, 16)), dtype=torch.int64)
    assert out.shape[:2] == (2, 3) and float(loss({"out": out}, target, 0.0, None)) > 0
    s = scorer("cpu", 3, None, False)
    s.add(out.argmax(1), target, ["a", "b"])
    assert task.headline in s.scores()


def _audit(name: str) -> dict:
    """A complete key audit of each task, from the shipped example (segmentation)."""
    audit = json.loads((MANIFESTS / "example-audit.json").read_text())
    if name == "segmentation":
        return audit
    scores = {"top1_acc": 0.9, "correct": 9, "images": 10}
    audit = {**copy.deepcopy(audit), "task": "classification"}
    audit["test"]["class_names"] = ["a", "b"]
    audit["results"] = {"correct": scores, "plain": {**scores, "top1_acc": 0.3, "correct": 3},
                        "wrong": {"summary": {"mean": 0.3, "std": 0.1, "min": 0.2, "max": 0.4},
                                  "keys": [{"fingerprint": "0" * 64, **scores, "top1_acc": 0.3, "correct": 3}]}}
    return audit


@pytest.mark.parametrize("name", ["segmentation", "classification"])
def test_every_task_writes_its_audit_atomically_figures_first_audit_json_last(name, tmp_path, monkeypatch):
    from keyshard.evaluate import report

    written = []
    real_atomic, real_json = report.write_atomic, report.write_json_atomic
    monkeypatch.setattr(report, "write_atomic", lambda p, *a, **k: (written.append(Path(p).name), real_atomic(p, *a, **k)))
    monkeypatch.setattr(report, "write_json_atomic", lambda p, *a, **k: (written.append(Path(p).name), real_json(p, *a, **k)))
    audit = _audit(name)
    paths = report.write_audit(audit, tmp_path / "a")
    assert written[-2:] == ["audit.md", "audit.json"] and written[0] == "audit.png"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in paths) == sorted(set(written))
    md = (tmp_path / "a" / "audit.md").read_text()
    assert "| correct key |" in md and ("mIoU" if name == "segmentation" else "top-1 accuracy") in md
    with pytest.raises(KeyshardError, match="already holds an audit"):
        report.write_audit(audit, tmp_path / "a")


def test_the_report_has_one_table_per_task_segmentation_first():
    from keyshard.evaluate.report import table

    md, csv_text = table([_audit("classification"), _audit("segmentation")], sources=["c.json", "s.json"])
    assert md.index("| NP | 4 |") < md.index("Classification (top-1 accuracy):")
    assert csv_text.splitlines()[0].startswith("method,block_size,model,test_images,plain_trained_baseline_miou")
    assert ",classification," in csv_text.splitlines()[2]


def test_classify_audit_is_gone_and_audits_refuse_what_their_task_lacks():
    from keyshard.evaluate.audit import check_task_supports

    assert not (Path(__file__).resolve().parents[1] / "evaluate" / "classify_audit.py").exists()
    check_task_supports(tasks.get("segmentation"), (1, 2), object())
    with pytest.raises(KeyshardError, match="`near_miss`: classification"):
        check_task_supports(tasks.get("classification"), (1,))
    with pytest.raises(KeyshardError, match="prediction figures"):
        check_task_supports(tasks.get("classification"), (), object())
