"""Readable outputs of an audit (audit.json / audit.md / audit.png) and the Table-1 report."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from keyshard.errors import KeyshardError
from keyshard.fsutil import check_output, write_atomic, write_json_atomic
from keyshard.methods.defaults import PAPER_BASELINE, PAPER_TABLE1

VOC_VAL_IMAGES = 1449


def _provenance(record: dict | None) -> str:
    """One manifest's provenance (keyshard.signing.manifest_provenance) in words."""
    if not record or not record.get("manifest_sha256"):
        return "not recorded"
    signed = (f"signature verified, signer {record['signer_fingerprint'][:16]}…" if record.get("signature_verified")
              else "signature not verified")
    return f"sha256 {record['manifest_sha256'][:16]}…, {signed}"


def provenance_line(audit: dict) -> str:
    return (f"- manifests: training data {_provenance(audit['checkpoint'].get('manifest'))}; "
            f"test data {_provenance(audit['test'])}")


def markdown(audit: dict) -> str:
    if audit.get("kind") == "baseline":
        c = audit["checkpoint"]
        return "\n".join([
            f"# keyshard audit — baseline ({c['model']} trained on plain images)", "",
            f"- checkpoint: `{c['path']}` (epoch {c['epoch']}, sha256 {c['sha256'][:16]}…)",
            f"- test: `{audit['test']['path']}`, {audit['test']['images']} images; device {audit['device']}",
            provenance_line(audit), "",
            "| input | mIoU | mIoU, mean per image | pixel accuracy |", "|---|---:|---:|---:|",
            f"| plain images | {audit['results']['plain']['miou']:.4f} | {_num(audit, 'results.plain.miou_per_image_mean')} "
            f"| {audit['results']['plain']['pixel_acc']:.4f} |", "", aggregation_note(audit), ""])
    r = audit["results"]
    w = r["wrong"]["summary"]
    k = audit["key"]
    lines = [
        f"# keyshard audit — {k['method']} M={k['block_size']}",
        "",
        f"- checkpoint: `{audit['checkpoint']['path']}` (epoch {audit['checkpoint']['epoch']}, "
        f"model {audit['checkpoint']['model']}, sha256 {audit['checkpoint']['sha256'][:16]}…)",
        f"- key fingerprint: `{k['fingerprint']}` — check: {k['fingerprint_check']}",
        f"- test: `{audit['test']['path']}`, {audit['test']['images']} images; device {audit['device']}",
        provenance_line(audit),
        f"- wrong keys: {audit['wrong_keys']['count']} drawn from seed {audit['wrong_keys']['seed']} "
        f"({audit['wrong_keys']['rule']}{', random FFX passwords' if audit['wrong_keys']['randomize_password'] else ''})",
        "",
        "| input | mIoU | mIoU, mean per image | pixel accuracy |",
        "|---|---:|---:|---:|",
        f"| correct key | {r['correct']['miou']:.4f} | {_num(audit, 'results.correct.miou_per_image_mean')} "
        f"| {r['correct']['pixel_acc']:.4f} |",
        f"| plain images (no key) | {r['plain']['miou']:.4f} | {_num(audit, 'results.plain.miou_per_image_mean')} "
        f"| {r['plain']['pixel_acc']:.4f} |",
        f"| wrong keys: mean ± std | {w['mean']:.4f} ± {w['std']:.4f} "
        f"| {_num(audit, 'results.wrong.summary.miou_per_image_mean')} (mean) | |",
        f"| wrong keys: min / max | {w['min']:.4f} / {w['max']:.4f} | | |",
        "",
        aggregation_note(audit),
        "",
        verdict(audit),
        "",
        *near_miss_section(audit),
        "<details><summary>every wrong key</summary>",
        "",
        "| fingerprint | mIoU | pixel accuracy |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{x['fingerprint'][:16]}…` | {x['miou']:.4f} | {x['pixel_acc']:.4f} |" for x in r["wrong"]["keys"]]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _get(doc, dotted: str):
    """A nested field, or None where any step is missing or not an object."""
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def _number(doc, dotted: str):
    """An optional numeric field (per-image means; absent from audits written before them)."""
    value = _get(doc, dotted)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _num(doc, dotted: str, missing: str = "—") -> str:
    value = _number(doc, dotted)
    return missing if value is None else f"{value:.4f}"


AGGREGATION = ("mIoU is dataset-level — one confusion matrix summed over the test set — and that is the number "
               "compared with the paper; the mean of per-image mIoUs is the other common reading. The paper "
               "does not state which aggregation its Table 1 and Fig. 6 use (its Fig. 5 shows per-image values).")


def aggregation_note(audit: dict) -> str:
    """Which aggregation each mIoU column is, with the skipped-image count when recorded."""
    unlabelled = _get(audit, "results.correct.images_unlabelled")
    if unlabelled is None:
        unlabelled = _get(audit, "results.plain.images_unlabelled")
    skipped = (f" Per-image means skip images without a labelled pixel ({unlabelled} here)."
               if isinstance(unlabelled, int) and not isinstance(unlabelled, bool) else "")
    return AGGREGATION + skipped


def verdict(audit: dict) -> str:
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


def plot_near_miss(audit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = audit["results"]["near_miss"]
    r = audit["results"]
    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=120)
    d = [x["distance"] for x in rows]
    ax.plot(d, [x["mean"] for x in rows], "o-", color="#37c", label="near-miss keys (mean)")
    ax.fill_between(d, [x["min"] for x in rows], [x["max"] for x in rows], color="#37c", alpha=0.2)
    ax.axhline(r["correct"]["miou"], color="#2a7", ls="--", label="correct key")
    ax.axhline(r["wrong"]["summary"]["mean"], color="#c33", ls=":", label="random wrong keys")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance from the correct key")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue(), durable=False)


def plot(audit: dict, path: Path) -> None:
    """Fig. 6 style: correct vs plain bars, wrong keys as a box with every key as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    r = audit["results"]
    wrong = [x["miou"] for x in r["wrong"]["keys"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.6), dpi=120)
    ax.bar([0, 1], [r["correct"]["miou"], r["plain"]["miou"]], color=["#2a7", "#999"], width=0.6)
    if wrong:
        ax.boxplot([wrong], positions=[2], widths=0.6)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(wrong))
        ax.scatter(2 + jitter, wrong, s=6, color="#c33", alpha=0.6, zorder=3)
    ax.set_xticks([0, 1, 2], ["Correct", "Plain", f"Incorrect\n({len(wrong)} keys)"])
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    k = audit["key"]
    ax.set_title(f"{k['method'].upper()} M={k['block_size']} — access control")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue(), durable=False)


def write_audit(audit: dict, out: Path, capture=None) -> list[Path]:
    """audit.json (written last: its presence marks a complete audit), audit.md, audit.png,
    near_miss.png when there are near-miss keys, and predictions.png from a ``predictions.Capture``
    (``evaluate --save-predictions``)."""
    out = Path(out)
    if (out / "audit.json").exists():
        raise KeyshardError(f"{out}: already holds an audit; choose another --output")
    check_output(out, directory=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyshardError(f"{out}: cannot create directory ({exc.strerror})") from None
    paths = [out / "audit.json", out / "audit.md"]
    try:
        if audit.get("kind") != "baseline":
            plot(audit, out / "audit.png")
            paths.append(out / "audit.png")
        if audit["results"].get("near_miss"):
            plot_near_miss(audit, out / "near_miss.png")
            paths.append(out / "near_miss.png")
        if capture is not None and capture.ids:
            from keyshard.evaluate.predictions import figure_png

            write_atomic(out / "predictions.png", figure_png(capture, audit), durable=False)
            paths.append(out / "predictions.png")
        write_atomic(out / "audit.md", markdown(audit).encode(), durable=False)
        write_json_atomic(out / "audit.json", audit)  # last: its presence marks a complete audit
    except OSError as exc:
        raise KeyshardError(f"{out}: cannot write the audit ({exc.strerror or type(exc).__name__})") from None
    return paths


def find_audits(path) -> list[Path]:
    """The audit.json files a ``report`` argument names: the file itself, or every audit.json in
    or under a directory (a run with several audit folders, a folder of runs), in path order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise KeyshardError(f"{p}: not found (give audit.json files, audit folders or run folders)")
    found = sorted(c for c in p.rglob("audit.json") if c.is_file())
    if not found:
        raise KeyshardError(f"{p}: no audit.json in it or under it (run keyshard evaluate first)")
    return found


# What the report reads from an audit, by kind: dotted field → expected JSON type.
_NUMBER, _INT, _TEXT = "a number", "an integer", "a string"
_BASELINE_FIELDS = {"checkpoint.model": _TEXT, "results.plain.miou": _NUMBER}
_KEYED_FIELDS = {
    "checkpoint.model": _TEXT, "checkpoint.data.image_size": _INT, "key.method": _TEXT, "key.block_size": _INT,
    "test.images": _INT, "wrong_keys.count": _INT, "results.correct.miou": _NUMBER, "results.plain.miou": _NUMBER,
    "results.wrong.summary.mean": _NUMBER, "results.wrong.summary.max": _NUMBER,
}


# Classification audits (``evaluate/classify_audit.py``, ``"task": "classification"``) score top-1 accuracy.
_CLS_BASELINE_FIELDS = {"checkpoint.model": _TEXT, "results.plain.top1_acc": _NUMBER}
_CLS_KEYED_FIELDS = {
    "checkpoint.model": _TEXT, "key.method": _TEXT, "key.block_size": _INT, "test.images": _INT,
    "wrong_keys.count": _INT, "results.correct.top1_acc": _NUMBER, "results.plain.top1_acc": _NUMBER,
    "results.wrong.summary.mean": _NUMBER, "results.wrong.summary.std": _NUMBER, "results.wrong.summary.max": _NUMBER,
}


def is_classification(audit: dict) -> bool:
    return audit.get("task") == "classification"


def _field_ok(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == _NUMBER:
        return isinstance(value, (int, float))
    if kind == _INT:
        return isinstance(value, int)
    return isinstance(value, str)


def check_audit(doc, path) -> dict:
    """One line naming the file for an audit the report cannot use: not a JSON object, another
    format, or a field it reads missing or of the wrong type."""
    if not isinstance(doc, dict):
        raise KeyshardError(f"{path}: not a keyshard audit (a JSON object expected, got {type(doc).__name__})")
    if doc.get("format") != "keyshard-audit/1":
        raise KeyshardError(f"{path}: not a keyshard audit (format keyshard-audit/1 expected)")
    if doc.get("kind", "key") not in ("key", "baseline"):
        raise KeyshardError(f"{path}: unknown audit kind {str(doc.get('kind'))[:40]!r}")
    if doc.get("task", "segmentation") not in ("segmentation", "classification"):
        raise KeyshardError(f"{path}: unknown audit task {str(doc.get('task'))[:40]!r}")
    if is_classification(doc):
        fields = _CLS_BASELINE_FIELDS if doc.get("kind") == "baseline" else _CLS_KEYED_FIELDS
    else:
        fields = _BASELINE_FIELDS if doc.get("kind") == "baseline" else _KEYED_FIELDS
    for dotted, kind in fields.items():
        value = doc
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or not _field_ok(value, kind):
            raise KeyshardError(f"{path}: audit field {dotted} is missing or not {kind}")
    return doc


def load_audit(path) -> dict:
    """One audit.json, checked: not UTF-8, not JSON, not an object or lacking what the report
    reads is one line naming the file."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise KeyshardError(f"{p}: not an audit (not UTF-8 text)") from None
    except OSError as exc:
        raise KeyshardError(f"{p}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyshardError(f"{p}: not an audit (invalid JSON at line {exc.lineno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # absurd nesting or numbers
        raise KeyshardError(f"{p}: not an audit (unreadable JSON: {type(exc).__name__})") from None
    return check_audit(doc, p)


def _rounded(doc, dotted: str):
    value = _number(doc, dotted)
    return None if value is None else round(value, 4)


def _both(dataset, per_image) -> str:
    """A table cell: the dataset-level mIoU, and the mean per image in parentheses when known."""
    return f"{dataset:.4f}" + (f" ({per_image:.4f})" if per_image is not None else "")


def classification_table(audits: list[dict]) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows of classification audits: top-1 accuracy with the correct key,
    on plain images and over the wrong keys (mean ± std, max); plain-trained baselines alongside."""
    baselines = {a["checkpoint"]["model"]: round(a["results"]["plain"]["top1_acc"], 4)
                 for a in audits if a.get("kind") == "baseline"}
    rows = []
    for a in sorted((a for a in audits if a.get("kind") != "baseline"),
                    key=lambda a: (a["key"]["method"], a["key"]["block_size"], a["checkpoint"]["model"],
                                   a.get("_source", ""))):
        k, r, w = a["key"], a["results"], a["results"]["wrong"]["summary"]
        rows.append({"method": k["method"], "block_size": k["block_size"], "model": a["checkpoint"]["model"],
                     "test_images": a["test"]["images"], "task": "classification",
                     "plain_trained_baseline_top1": baselines.get(a["checkpoint"]["model"]),
                     "correct_top1": round(r["correct"]["top1_acc"], 4), "plain_top1": round(r["plain"]["top1_acc"], 4),
                     "wrong_mean_top1": round(w["mean"], 4), "wrong_std_top1": round(w["std"], 4),
                     "wrong_max_top1": round(w["max"], 4), "wrong_keys": a["wrong_keys"]["count"],
                     "audit": a.get("_source", "")})
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



def full_scale(audit: dict) -> bool:
    """Whether an audit is comparable with the paper's Table 1: its preset's model (FCN-ResNet50)
    at 256×256 on the 1449 VOC val images."""
    from keyshard.options import DEFAULT_IMAGE_SIZE
    from keyshard.train.presets import PRESETS

    return (audit["test"]["images"] == VOC_VAL_IMAGES and audit["checkpoint"]["model"] == PRESETS["paper"]["model"]
            and audit["checkpoint"]["data"]["image_size"] == DEFAULT_IMAGE_SIZE)


def table(audits: list[dict], sources: list | None = None) -> tuple[str, str]:
    """Table-1 style rows (markdown, CSV): method × block size → per model: correct key, plain
    images, wrong keys; plain-trained baselines alongside; the paper's number when full scale.
    ``sources``: each audit's file, shown in an ``audit`` column (several audits of one run).
    Classification audits get their own top-1 table after the segmentation one (CSV: one file,
    the classification rows with their own columns and ``task``)."""
    if sources is not None:
        audits = [{**a, "_source": str(src)} for a, src in zip(audits, sources)]
    classified = [a for a in audits if is_classification(a)]
    audits = [a for a in audits if not is_classification(a)]
    cls_md, cls_rows = classification_table(classified) if classified else ([], [])
    if not audits and classified:
        return _csv_and_md(cls_md, cls_rows)
    baselines = {a["checkpoint"]["model"]: a["results"]["plain"]["miou"] for a in audits if a.get("kind") == "baseline"}
    baselines_per_image = {a["checkpoint"]["model"]: _rounded(a, "results.plain.miou_per_image_mean")
                           for a in audits if a.get("kind") == "baseline"}
    keyed = [a for a in audits if a.get("kind") != "baseline"]
    rows = []
    for a in sorted(keyed, key=lambda a: (a["key"]["method"], a["key"]["block_size"], a["checkpoint"]["model"],
                                          a.get("_source", ""))):
        k, r = a["key"], a["results"]
        paper = PAPER_TABLE1.get(k["method"], {}).get(k["block_size"]) if full_scale(a) else None
        rows.append({"method": k["method"], "block_size": k["block_size"], "model": a["checkpoint"]["model"],
                     "test_images": a["test"]["images"],
                     "plain_trained_baseline_miou": baselines.get(a["checkpoint"]["model"]),
                     "correct_miou": round(r["correct"]["miou"], 4), "plain_miou": round(r["plain"]["miou"], 4),
                     "wrong_mean_miou": round(r["wrong"]["summary"]["mean"], 4),
                     "wrong_max_miou": round(r["wrong"]["summary"]["max"], 4),
                     "wrong_keys": a["wrong_keys"]["count"], "paper_correct_miou": paper,
                     "plain_trained_baseline_miou_per_image_mean": baselines_per_image.get(a["checkpoint"]["model"]),
                     "correct_miou_per_image_mean": _rounded(a, "results.correct.miou_per_image_mean"),
                     "plain_miou_per_image_mean": _rounded(a, "results.plain.miou_per_image_mean"),
                     "wrong_mean_miou_per_image_mean": _rounded(a, "results.wrong.summary.miou_per_image_mean"),
                     "audit": a.get("_source", "")})
    md = ["| method | M | model | test images | baseline (no key) | correct key | plain images | wrong keys (mean) | wrong keys (max) | paper (correct) | audit |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in rows:
        paper = f"{x['paper_correct_miou']:.4f}" if x["paper_correct_miou"] is not None else "— (not full-scale)"
        base = (_both(x['plain_trained_baseline_miou'], x["plain_trained_baseline_miou_per_image_mean"])
                if x["plain_trained_baseline_miou"] is not None else "—")
        md.append(f"| {x['method'].upper()} | {x['block_size']} | {x['model']} | {x['test_images']} | {base} | "
                  f"{_both(x['correct_miou'], x['correct_miou_per_image_mean'])} | "
                  f"{_both(x['plain_miou'], x['plain_miou_per_image_mean'])} | "
                  f"{_both(x['wrong_mean_miou'], x['wrong_mean_miou_per_image_mean'])} | "
                  f"{x['wrong_max_miou']:.4f} | {paper} | {x['audit'] or '—'} |")
    for model, miou in sorted(baselines.items()):
        if not any(x["model"] == model for x in rows):
            md.append(f"| — | — | {model} | — | {_both(miou, baselines_per_image.get(model))} | — | — | — | — | — | — |")
    md.append("")
    md.append("Each mIoU cell is the dataset-level mIoU (one confusion matrix summed over the test set), with the "
              "mean of per-image mIoUs in parentheses where the audit records it. The comparison with the paper "
              "uses the dataset-level number; the paper does not state which aggregation its Table 1 uses.")
    md.append("")
    md.append(f"Paper baseline (no key, FCN-ResNet50, VOC2012 val): {PAPER_BASELINE:.4f}.")
    if classified:
        md += ["", "Classification (top-1 accuracy):", ""] + cls_md
    return _csv_and_md(md, rows + cls_rows)


def _csv_and_md(md: list[str], rows: list[dict]) -> tuple[str, str]:
    fields = list(dict.fromkeys(f for row in rows for f in row)) or ["method"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()
