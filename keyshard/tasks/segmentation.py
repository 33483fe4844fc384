"""Semantic segmentation (the paper's task): a label map per image, scored by mIoU.

Samples carry ``<key>.mask.png`` (8-bit label map, void = the dataset's ignore index).  Models
are ``train/models.py``'s, the loss is the summed pixel cross-entropy of ``train/step.py``, and an
audit's scores come from one confusion matrix over the whole test split plus per-image mIoUs
(``evaluate/metrics.py``).  Audits record near-miss keys and may draw ``predictions.png``.
"""

from __future__ import annotations

import numpy as np

from keyshard import tasks
from keyshard.tasks import INT, NUMBER, TEXT, number

AGGREGATION = ("mIoU is dataset-level — one confusion matrix summed over the test set — and that is the number "
               "compared with the paper; the mean of per-image mIoUs is the other common reading. The paper "
               "does not state which aggregation its Table 1 and Fig. 6 use (its Fig. 5 shows per-image values).")


def _num(doc, dotted: str, missing: str = "—") -> str:
    value = number(doc, dotted)
    return missing if value is None else f"{value:.4f}"


def _rounded(doc, dotted: str):
    value = number(doc, dotted)
    return None if value is None else round(value, 4)


def _both(dataset, per_image) -> str:
    """A table cell: the dataset-level mIoU, and the mean per image in parentheses when known."""
    return f"{dataset:.4f}" + (f" ({per_image:.4f})" if per_image is not None else "")


def _mean_per_image(rows: list[dict]) -> float | None:
    """Mean over keys of their per-image mIoU means (keys whose every image was unlabelled left out)."""
    values = [r["miou_per_image_mean"] for r in rows if r["miou_per_image_mean"] is not None]
    return float(np.mean(values)) if values else None


def aggregation_note(audit: dict) -> str:
    """Which aggregation each mIoU column is, with the skipped-image count when recorded."""
    unlabelled = tasks.field(audit, "results.correct.images_unlabelled")
    if unlabelled is None:
        unlabelled = tasks.field(audit, "results.plain.images_unlabelled")
    skipped = (f" Per-image means skip images without a labelled pixel ({unlabelled} here)."
               if isinstance(unlabelled, int) and not isinstance(unlabelled, bool) else "")
    return AGGREGATION + skipped


def verdict(audit: dict) -> str:
    """Whether the audit shows access control: the correct key well above plain images and every wrong key."""
    r = audit["results"]
    correct, plain, wrong = r["correct"]["miou"], r["plain"]["miou"], r["wrong"]["summary"]["max"]
    if correct < 0.2:
        return (f"INCONCLUSIVE: the model reaches only {correct:.3f} mIoU even with the correct key, so this "
                "audit cannot show access control (train longer or check the data).")
    if correct > 1.5 * max(plain, wrong) and correct - max(plain, wrong) > 0.1:
        return (f"Access control holds on this test set: the best wrong key reaches {wrong:.3f} and plain "
                f"images {plain:.3f}, against {correct:.3f} with the correct key.")
    return (f"WEAK access control: without the key the model still reaches {max(plain, wrong):.3f} mIoU "
            f"(correct key {correct:.3f}). The paper reports this for SHF and NP at small block sizes.")


def near_miss_section(audit: dict) -> list[str]:
    """audit.md's near-miss table and what its closest distance says about hill-climbing."""
    rows = audit["results"].get("near_miss") or []
    if not rows:
        return []
    correct = audit["results"]["correct"]["miou"]
    out = ["## Near-miss keys", "", "| distance | keys | mIoU mean | min | max |", "|---:|---:|---:|---:|---:|"]
    out += [f"| {r['distance']} | {len(r['keys'])} | {r['mean']:.4f} | {r['min']:.4f} | {r['max']:.4f} |" for r in rows]
    closest = min(rows, key=lambda r: r["distance"])
    out.append("")
    if correct > 0 and closest["mean"] >= 0.8 * correct:
        out.append(f"SMOOTH: keys {closest['distance']} step(s) from the correct one still reach "
                   f"{closest['mean']:.3f} mIoU ({closest['mean'] / correct:.0%} of the correct key's): "
                   "accuracy rises as a guess approaches the key, so hill-climbing over "
                   "transpositions/bit swaps with a few labelled images can find it.")
    else:
        out.append(f"Keys {closest['distance']} step(s) away already fall to {closest['mean']:.3f} mIoU: "
                   "no smooth path for hill-climbing at that distance.")
    return out + [""]


class Segmentation(tasks.Task):
    name = "segmentation"
    kinds = ("voc", "folders")
    target_member = "mask.png"
    target_dtype = np.uint8
    model = "keyshard.train.models:build"
    model_names = "keyshard.train.presets:SEGMENTATION_MODELS"
    model_noun = "segmentation model"
    own_settings = ("block_flip", "block_crop")  # key-safe augmentation flips/crops masks with the image
    loss = "keyshard.train.step:segmentation_loss"
    scorer = "keyshard.evaluate.metrics:SegmentationScorer"
    sample_reader = "keyshard.pipeline.samples:read_segmentation"
    headline, score_label = "miou", "mean IoU"
    metrics_note = {
        "miou": "dataset-level: one confusion matrix summed over every test image (the dataset's classes, its "
                "ignore index left out; VOC: 21 classes, 255 ignored), "
                "mean IoU over the classes present in its labels or predictions",
        "miou_per_image_mean": "the same definition applied to each image alone (classes present in its labels "
                               "or its prediction), averaged over the images; images without a labelled pixel "
                               "are skipped and counted (images_unlabelled)",
        "paper": "the paper (Table 1, Fig. 6) does not state which aggregation it uses; Fig. 5 shows per-image values",
    }
    near_miss = predictions = True
    prediction, prediction_op, per_pixel = "labels", "ArgMax", True  # exported: a label map per image

    def encode_target(self, target) -> bytes:
        from keyshard.shardformat import encode_mask

        return encode_mask(target)

    def decode_target(self, data: bytes) -> np.ndarray:
        from keyshard.shardformat import decode_mask

        return decode_mask(data)

    def target_shape(self, height: int, width: int) -> tuple:
        return (height, width)

    def padding_target(self, ignore_index: int | None) -> int:
        """Masks are uint8: padding pixels hold the dataset's ignore index (VOC's void, 255, when
        the dataset has none)."""
        from keyshard.shardformat import VOID

        return VOID if ignore_index is None else ignore_index

    def key_row(self, scores: dict) -> dict:
        return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
                "miou_per_image_mean": scores["miou_per_image_mean"]}

    def summary(self, rows: list[dict]) -> dict:
        return {**super().summary(rows), "miou_per_image_mean": _mean_per_image(rows)}

    def score_table(self, audit: dict) -> list[str]:
        r = audit["results"]
        head = ["| input | mIoU | mIoU, mean per image | pixel accuracy |", "|---|---:|---:|---:|"]
        if audit.get("kind") == "baseline":
            return head + [f"| plain images | {r['plain']['miou']:.4f} | "
                           f"{_num(audit, 'results.plain.miou_per_image_mean')} | {r['plain']['pixel_acc']:.4f} |"]
        w = r["wrong"]["summary"]
        return head + [
            f"| correct key | {r['correct']['miou']:.4f} | {_num(audit, 'results.correct.miou_per_image_mean')} "
            f"| {r['correct']['pixel_acc']:.4f} |",
            f"| plain images (no key) | {r['plain']['miou']:.4f} | {_num(audit, 'results.plain.miou_per_image_mean')} "
            f"| {r['plain']['pixel_acc']:.4f} |",
            f"| wrong keys: mean ± std | {w['mean']:.4f} ± {w['std']:.4f} "
            f"| {_num(audit, 'results.wrong.summary.miou_per_image_mean')} (mean) | |",
            f"| wrong keys: min / max | {w['min']:.4f} / {w['max']:.4f} | | |",
        ]

    def notes(self, audit: dict) -> list[str]:
        if audit.get("kind") == "baseline":
            return [aggregation_note(audit), ""]
        return [aggregation_note(audit), "", verdict(audit), "", *near_miss_section(audit)]

    def key_table(self, rows: list[dict]) -> list[str]:
        return (["| fingerprint | mIoU | pixel accuracy |", "|---|---:|---:|"]
                + [f"| `{x['fingerprint'][:16]}…` | {x['miou']:.4f} | {x['pixel_acc']:.4f} |" for x in rows])

    def report_fields(self, kind: str) -> dict[str, str]:
        if kind == "baseline":
            return {"checkpoint.model": TEXT, "results.plain.miou": NUMBER}
        return {"checkpoint.model": TEXT, "checkpoint.data.image_size": INT, "key.method": TEXT,
                "key.block_size": INT, "test.images": INT, "wrong_keys.count": INT,
                "results.correct.miou": NUMBER, "results.plain.miou": NUMBER,
                "results.wrong.summary.mean": NUMBER, "results.wrong.summary.max": NUMBER}

    def table(self, audits, paper):
        baselines = {a["checkpoint"]["model"]: a["results"]["plain"]["miou"]
                     for a in audits if a.get("kind") == "baseline"}
        per_image = {a["checkpoint"]["model"]: _rounded(a, "results.plain.miou_per_image_mean")
                     for a in audits if a.get("kind") == "baseline"}
        rows = [self._row(a, baselines, per_image, paper(a)) for a in tasks.keyed_in_order(audits)]
        md = ["| method | M | model | test images | baseline (no key) | correct key | plain images | wrong keys (mean) | wrong keys (max) | paper (correct) | audit |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for x in rows:
            shown = f"{x['paper_correct_miou']:.4f}" if x["paper_correct_miou"] is not None else "— (not full-scale)"
            base = (_both(x["plain_trained_baseline_miou"], x["plain_trained_baseline_miou_per_image_mean"])
                    if x["plain_trained_baseline_miou"] is not None else "—")
            md.append(f"| {x['method'].upper()} | {x['block_size']} | {x['model']} | {x['test_images']} | {base} | "
                      f"{_both(x['correct_miou'], x['correct_miou_per_image_mean'])} | "
                      f"{_both(x['plain_miou'], x['plain_miou_per_image_mean'])} | "
                      f"{_both(x['wrong_mean_miou'], x['wrong_mean_miou_per_image_mean'])} | "
                      f"{x['wrong_max_miou']:.4f} | {shown} | {x['audit'] or '—'} |")
        for model, miou in sorted(baselines.items()):
            if not any(x["model"] == model for x in rows):
                md.append(f"| — | — | {model} | — | {_both(miou, per_image.get(model))} | — | — | — | — | — | — |")
        from keyshard.methods.defaults import PAPER_BASELINE

        md += ["", "Each mIoU cell is the dataset-level mIoU (one confusion matrix summed over the test set), with "
               "the mean of per-image mIoUs in parentheses where the audit records it. The comparison with the "
               "paper uses the dataset-level number; the paper does not state which aggregation its Table 1 uses.",
               "", f"Paper baseline (no key, FCN-ResNet50, VOC2012 val): {PAPER_BASELINE:.4f}."]
        return md, rows

    @staticmethod
    def _row(a: dict, baselines: dict, per_image: dict, paper) -> dict:
        """One keyed audit's CSV row."""
        k, r, model = a["key"], a["results"], a["checkpoint"]["model"]
        return {"method": k["method"], "block_size": k["block_size"], "model": model,
                "test_images": a["test"]["images"], "plain_trained_baseline_miou": baselines.get(model),
                "correct_miou": round(r["correct"]["miou"], 4), "plain_miou": round(r["plain"]["miou"], 4),
                "wrong_mean_miou": round(r["wrong"]["summary"]["mean"], 4),
                "wrong_max_miou": round(r["wrong"]["summary"]["max"], 4),
                "wrong_keys": a["wrong_keys"]["count"], "paper_correct_miou": paper,
                "plain_trained_baseline_miou_per_image_mean": per_image.get(model),
                "correct_miou_per_image_mean": _rounded(a, "results.correct.miou_per_image_mean"),
                "plain_miou_per_image_mean": _rounded(a, "results.plain.miou_per_image_mean"),
                "wrong_mean_miou_per_image_mean": _rounded(a, "results.wrong.summary.miou_per_image_mean"),
                "audit": a.get("_source", "")}


TASK = Segmentation()
