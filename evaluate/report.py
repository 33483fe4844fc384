"""Readable outputs of an audit (audit.json / audit.md / audit.png) and the Table-1 report, for
every task: the layout is here once, the task (``keyshard/tasks/``) supplies its score tables,
notes, the fields the report reads and its report table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from keyshard import tasks
from keyshard.errors import KeyshardError
from keyshard.fsutil import check_output, write_atomic, write_json_atomic
from keyshard.methods.defaults import PAPER_TABLE1

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
    """audit.md: what was audited (checkpoint, key, test data, wrong keys), the task's table and
    notes, and every wrong key's row."""
    task, c, t = tasks.of_audit(audit), audit["checkpoint"], audit["test"]
    test_line = f"- test: `{t['path']}`, {t['images']} images; device {audit['device']}"
    if audit.get("kind") == "baseline":
        head = [f"# keyshard audit — baseline ({c['model']} trained on plain images)", "",
                f"- checkpoint: `{c['path']}` (epoch {c['epoch']}, sha256 {c['sha256'][:16]}…)",
                test_line, provenance_line(audit)]
    else:
        k, w = audit["key"], audit["wrong_keys"]
        head = [f"# keyshard audit — {k['method']} M={k['block_size']}", "",
                f"- checkpoint: `{c['path']}` (epoch {c['epoch']}, model {c['model']}, sha256 {c['sha256'][:16]}…)",
                f"- key fingerprint: `{k['fingerprint']}` — check: {k['fingerprint_check']}",
                test_line, provenance_line(audit),
                f"- wrong keys: {w['count']} drawn from seed {w['seed']} "
                f"({w['rule']}{', random FFX passwords' if w['randomize_password'] else ''})"]
    if audit.get("ciphertext_only"):
        from keyshard.evaluate.ciphertext_only import summary_line

        head.append(summary_line(audit["ciphertext_only"]))
    lines = head + [""] + task.score_table(audit) + [""] + task.notes(audit)
    if audit.get("kind") != "baseline":
        lines += ["<details><summary>every wrong key</summary>", "",
                  *task.key_table(audit["results"]["wrong"]["keys"]), "", "</details>", ""]
    return "\n".join(lines)


def plot_near_miss(audit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, r = tasks.of_audit(audit), audit["results"]
    rows = r["near_miss"]
    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=120)
    d = [x["distance"] for x in rows]
    ax.plot(d, [x["mean"] for x in rows], "o-", color="#37c", label="near-miss keys (mean)")
    ax.fill_between(d, [x["min"] for x in rows], [x["max"] for x in rows], color="#37c", alpha=0.2)
    ax.axhline(r["correct"][task.headline], color="#2a7", ls="--", label="correct key")
    ax.axhline(r["wrong"]["summary"]["mean"], color="#c33", ls=":", label="random wrong keys")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distance from the correct key")
    ax.set_ylabel(task.score_label)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue(), durable=False)


def plot(audit: dict, path: Path) -> None:
    """Fig. 6 style: correct vs plain bars, wrong keys as a box with every key as a dot, in the
    task's headline score; a baseline audit is its one plain-images bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    task, r = tasks.of_audit(audit), audit["results"]
    fig, ax = plt.subplots(figsize=(4.5, 3.6), dpi=120)
    if audit.get("kind") == "baseline":
        ax.bar([0], [r["plain"][task.headline]], color="#999", width=0.6)
        ax.set_xticks([0], ["Plain\n(model trained on plain images)"])
        ax.set_title(f"{audit['checkpoint']['model']} — baseline")
    else:
        wrong = [x[task.headline] for x in r["wrong"]["keys"]]
        ax.bar([0, 1], [r["correct"][task.headline], r["plain"][task.headline]], color=["#2a7", "#999"], width=0.6)
        if wrong:
            ax.boxplot([wrong], positions=[2], widths=0.6)
            jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(wrong))
            ax.scatter(2 + jitter, wrong, s=6, color="#c33", alpha=0.6, zorder=3)
        ax.set_xticks([0, 1, 2], ["Correct", "Plain", f"Incorrect\n({len(wrong)} keys)"])
        k = audit["key"]
        ax.set_title(f"{k['method'].upper()} M={k['block_size']} — access control")
    ax.set_ylabel(task.score_label)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue(), durable=False)


def check_audit_dir(out) -> Path:
    """An output directory that holds no audit yet and can be written: checked before an audit
    runs (the command) and again before one is written."""
    out = Path(out)
    if (out / "audit.json").exists():
        raise KeyshardError(f"{out}: already holds an audit; choose another `output`")
    check_output(out, directory=True)
    return out


def write_audit(audit: dict, out: Path, capture=None) -> list[Path]:
    """The audit's files, every one written atomically: audit.md, audit.png, near_miss.png when
    there are near-miss keys, and predictions.png from a ``predictions.Capture`` (``capture``,
    segmentation), then audit.json last: its presence marks a complete audit."""
    out = check_audit_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyshardError(f"{out}: cannot create directory ({exc.strerror})") from None
    paths = [out / "audit.json", out / "audit.md", out / "audit.png"]
    try:
        plot(audit, out / "audit.png")
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


def _field_ok(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == tasks.NUMBER:
        return isinstance(value, (int, float))
    if kind == tasks.INT:
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
    if doc.get("task", tasks.DEFAULT) not in tasks.names():
        raise KeyshardError(f"{path}: unknown audit task {str(doc.get('task'))[:40]!r}")
    for dotted, kind in tasks.of_audit(doc).report_fields(doc.get("kind", "key")).items():
        value = tasks.field(doc, dotted)
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


def full_scale(audit: dict) -> bool:
    """Whether an audit is comparable with the paper's Table 1: its preset's model (FCN-ResNet50)
    at 256×256 on the 1449 VOC val images."""
    from keyshard.options import DEFAULT_IMAGE_SIZE
    from keyshard.train.presets import PRESETS

    return (audit["test"]["images"] == VOC_VAL_IMAGES and audit["checkpoint"]["model"] == PRESETS["paper"]["model"]
            and audit["checkpoint"]["data"]["image_size"] == DEFAULT_IMAGE_SIZE)


def paper_value(audit: dict) -> float | None:
    """The paper's Table 1 number for a full-scale key audit of its method and block size, else None."""
    k = audit["key"]
    return PAPER_TABLE1.get(k["method"], {}).get(k["block_size"]) if full_scale(audit) else None


def table(audits: list[dict], sources: list | None = None) -> tuple[str, str]:
    """Table-1 style rows (markdown, CSV): per task, method × block size → per model: correct key,
    plain images, wrong keys; plain-trained baselines alongside; the paper's number when full
    scale.  ``sources``: each audit's file, shown in an ``audit`` column (several audits of one
    run).  Each task present gets its own table, in the registry's order (segmentation first),
    the later ones under their title; the CSV is one file with every task's columns (``task``
    on the rows of tasks other than segmentation)."""
    if sources is not None:
        audits = [{**a, "_source": str(src)} for a, src in zip(audits, sources)]
    md, rows = [], []
    present = [n for n in tasks.names() if any(a.get("task", tasks.DEFAULT) == n for a in audits)] or [tasks.DEFAULT]
    for name in present:
        task = tasks.get(name)
        lines, task_rows = task.table([a for a in audits if a.get("task", tasks.DEFAULT) == name], paper_value)
        md += (["", f"{task.table_title}:", ""] if md else []) + lines
        rows += task_rows
    return _csv_and_md(md + ciphertext_only_table(audits), rows)


def ciphertext_only_table(audits: list[dict]) -> list[str]:
    """The report's lines for the audits that estimated their key from keyed images alone
    (``evaluate --ciphertext-only N``); none when no audit did."""
    rows = [a for a in audits if a.get("ciphertext_only")]
    if not rows:
        return []
    lines = ["", "Ciphertext-only key estimation (`evaluate --ciphertext-only N`): what N leaked keyed images give:",
             "", "| method | M | images | key recovered | pixels exact | PSNR (dB) | model, estimated key | "
                 "model, correct key |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in rows:
        c, s = a["ciphertext_only"], a["ciphertext_only"]["scores"]
        psnr_text = "∞" if s["psnr_db"] is None else f"{s['psnr_db']:.1f}"
        lines.append(f"| {a['key']['method']} | {a['key']['block_size']} | {c['images']} | "
                     f"{100 * s['key_fraction']:.1f} % | {100 * s['pixels_exact']:.1f} % | {psnr_text} | "
                     f"{c['model']['estimated_key']:.4f} | {c['model']['correct_key']:.4f} |")
    return lines


def _csv_and_md(md: list[str], rows: list[dict]) -> tuple[str, str]:
    fields = list(dict.fromkeys(f for row in rows for f in row)) or ["method"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()
