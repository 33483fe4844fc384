"""Image classification (the transfer-learning paper's setting): one class index per image, scored
by top-1 accuracy.

Samples carry ``<key>.cls`` (the class index as ASCII) and the class again in ``<key>.json``.
Models are ``train/classifiers.py``'s (``{"out": logits N×K}``); the loss is the same summed
cross-entropy as segmentation's (a class index is a one-"pixel" label, padding rows hold -100 and
are never forwarded); an audit counts the images whose highest-scoring class is their label
(``evaluate/metrics.py``).  No near-miss keys or prediction figures.
"""

from __future__ import annotations

import numpy as np

from keyshard import tasks
from keyshard.tasks import INT, NUMBER, TEXT


class Classification(tasks.Task):
    name = "classification"
    kinds = ("image-folder",)
    target_member = "cls"
    target_dtype = np.int64
    model = "keyshard.train.classifiers:build"
    model_names = "keyshard.train.presets:CLASSIFIERS"
    preset_models = "keyshard.train.presets:CLASSIFY_MODELS"  # the presets name segmentation models
    model_noun = "classifier"
    own_settings = ("train_fraction",)  # fine-tuning on a seeded subset (the transfer-learning setting)
    loss = "keyshard.train.step:segmentation_loss"  # summed cross-entropy; classifiers have no "aux" output
    scorer = "keyshard.evaluate.metrics:TopOneScorer"
    sample_reader = "keyshard.pipeline.samples:read_classification"
    headline, score_label = "top1_acc", "top-1 accuracy"
    metrics_note = {"top1_acc": "fraction of test images whose highest-scoring class is their label"}
    table_title = "Classification (top-1 accuracy)"

    def encode_target(self, target) -> bytes:
        return str(int(target)).encode()

    def decode_target(self, data: bytes) -> np.ndarray:
        return np.int64(int(data.decode("ascii").strip()))

    def target_shape(self, height: int, width: int) -> tuple:
        return ()

    def sample_meta(self, target) -> dict:
        return {"class": target}

    def key_row(self, scores: dict) -> dict:
        return dict(scores)

    def test_record(self, dataset) -> dict:
        return {"class_names": list(dataset.class_names)}

    def score_table(self, audit: dict) -> list[str]:
        r = audit["results"]
        head = ["| input | top-1 accuracy |", "|---|---:|"]
        if audit.get("kind") == "baseline":
            return head + [f"| plain images | {r['plain']['top1_acc']:.4f} |"]
        w = r["wrong"]["summary"]
        return head + [f"| correct key | {r['correct']['top1_acc']:.4f} |",
                       f"| plain images (no key) | {r['plain']['top1_acc']:.4f} |",
                       f"| wrong keys: mean ± std | {w['mean']:.4f} ± {w['std']:.4f} |",
                       f"| wrong keys: min / max | {w['min']:.4f} / {w['max']:.4f} |"]

    def key_table(self, rows: list[dict]) -> list[str]:
        return (["| fingerprint | top-1 accuracy | correct |", "|---|---:|---:|"]
                + [f"| `{x['fingerprint'][:16]}…` | {x['top1_acc']:.4f} | {x['correct']} |" for x in rows])

    def report_fields(self, kind: str) -> dict[str, str]:
        if kind == "baseline":
            return {"checkpoint.model": TEXT, "results.plain.top1_acc": NUMBER}
        return {"checkpoint.model": TEXT, "key.method": TEXT, "key.block_size": INT, "test.images": INT,
                "wrong_keys.count": INT, "results.correct.top1_acc": NUMBER, "results.plain.top1_acc": NUMBER,
                "results.wrong.summary.mean": NUMBER, "results.wrong.summary.std": NUMBER,
                "results.wrong.summary.max": NUMBER}

    def table(self, audits, paper):
        """Top-1 accuracy with the correct key, on plain images and over the wrong keys (mean ± std,
        max); plain-trained baselines alongside.  The paper has no classification numbers."""
        baselines = {a["checkpoint"]["model"]: round(a["results"]["plain"]["top1_acc"], 4)
                     for a in audits if a.get("kind") == "baseline"}
        rows = [self._row(a, baselines) for a in tasks.keyed_in_order(audits)]
        md = ["| method | M | model | test images | baseline (no key) | correct key | plain images | wrong keys (mean ± std) | wrong keys (max) | audit |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for x in rows:
            base = f"{x['plain_trained_baseline_top1']:.4f}" if x["plain_trained_baseline_top1"] is not None else "—"
            md.append(f"| {x['method'].upper()} | {x['block_size']} | {x['model']} | {x['test_images']} | {base} | "
                      f"{x['correct_top1']:.4f} | {x['plain_top1']:.4f} | {x['wrong_mean_top1']:.4f} ± "
                      f"{x['wrong_std_top1']:.4f} | {x['wrong_max_top1']:.4f} | {x['audit'] or '—'} |")
        for model, acc in sorted(baselines.items()):
            if not any(x["model"] == model for x in rows):
                md.append(f"| — | — | {model} | — | {acc:.4f} | — | — | — | — | — |")
        md += ["", "Each cell is top-1 accuracy on the test split (classification audits)."]
        return md, rows

    @staticmethod
    def _row(a: dict, baselines: dict) -> dict:
        """One keyed audit's CSV row."""
        k, r, w = a["key"], a["results"], a["results"]["wrong"]["summary"]
        return {"method": k["method"], "block_size": k["block_size"], "model": a["checkpoint"]["model"],
                "test_images": a["test"]["images"], "task": "classification",
                "plain_trained_baseline_top1": baselines.get(a["checkpoint"]["model"]),
                "correct_top1": round(r["correct"]["top1_acc"], 4), "plain_top1": round(r["plain"]["top1_acc"], 4),
                "wrong_mean_top1": round(w["mean"], 4), "wrong_std_top1": round(w["std"], 4),
                "wrong_max_top1": round(w["max"], 4), "wrong_keys": a["wrong_keys"]["count"],
                "audit": a.get("_source", "")}


TASK = Classification()
