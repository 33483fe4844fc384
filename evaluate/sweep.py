"""``keyshard sweep``: the paper's Table 1 and Fig. 6 in one command.

Plain shards (train/holdout/test) are made once; then for every (method, block size) cell a
new key is made, the train/holdout splits are encrypted with it, a model is trained on them and
audited on the plain test split (correct key, plain images, N wrong keys and, with
``--ciphertext-only N``, the key estimated from N keyed test images alone); a baseline model is
trained on the plain shards and audited; finally ``table1.csv``, ``table1.md`` and ``fig6.png``
are written from the audits.

Layout of ``DIR``::

    sweep.json                      the settings every cell shares (a rerun must match them)
    plain/                          plain shards: train, holdout, test
    baseline/{run/, audit/}         model trained on plain images, its audit
    <method>-m<M>/key.json          the cell's key (0600), written first
    <method>-m<M>/shards/           keyed train/holdout shards
    <method>-m<M>/run/best.pt       the trained model (and last.pt, metrics.jsonl)
    <method>-m<M>/audit/audit.json  the audit, written last: a cell is finished when it exists
    table1.csv, table1.md, fig6.png the report, rewritten at the end of every run

Resuming: a finished cell (``audit/audit.json`` exists) is never redone.  An unfinished one keeps
its key (``key.json`` is written before anything else and reused, so the cell's key never changes
on a restart) and continues step by step: finished shards (``manifest.json``) are kept, an
interrupted encryption continues with ``--resume`` semantics, other leftovers of the shard step
are removed and redone; training continues from ``run/last.pt`` (and starts over when the shards
were redone); an unfinished audit is removed and redone.  A cell without ``key.json`` is removed
entirely and started afresh.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from keyshard import methods, options, params, seeded
from keyshard.errors import KeyshardError
from keyshard.manifest import MANIFEST
from keyshard.evaluate.ciphertext_only import MAX_IMAGES as MAX_CIPHERTEXT_ONLY_IMAGES
from keyshard.evaluate.wrong_keys import MAX_COUNT as MAX_WRONG_KEYS
from keyshard.methods.defaults import PAPER_BASELINE, PAPER_TABLE1, SWEEP_METHODS
from keyshard.evaluate import report
from keyshard.train.presets import PRESETS, by_preset

PAPER_BLOCK_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
SWEEP_FORMAT = "keyshard-sweep/1"
# Settings every cell of a sweep shares: a rerun into the same DIR must give the same values
# (methods and block sizes only choose which cells are run, and --workers/--jobs only how fast).
FIXED_SETTINGS = ("voc", "preset", "image_size", "epochs", "augment_copies", "wrong_keys", "seed", "key_seed",
                  "ffx_password_given", "weights", "ciphertext_only")
# Fixed settings added after sweep.json was first written, with the value a record without them
# means; sweep.json holds them only when they differ from it, so a sweep without them writes the
# same record as before and earlier sweeps continue.
LATER_SETTINGS = {"ciphertext_only": 0}
CSV_FIELDS = ("method", "block_size", "correct_miou", "correct_pixel_acc", "plain_miou", "plain_pixel_acc",
              "wrong_mean_miou", "wrong_std_miou", "wrong_min_miou", "wrong_max_miou", "wrong_keys",
              "paper_correct_miou", "correct_miou_per_image_mean", "plain_miou_per_image_mean",
              "wrong_miou_per_image_mean", "model", "image_size", "best_epoch", "test_images", "key_fingerprint", "audit")
# The column of --ciphertext-only: in table1.csv/md only when a cell's audit has that record
CIPHERTEXT_ONLY_FIELD = "ciphertext_only_pixels_exact"
AGGREGATION = ("dataset-level: one 21-class confusion matrix summed over the whole test split (void 255 "
               "ignored), IoU per class from it, mean over the classes present in the labels or the "
               "predictions. The paper does not state its aggregation.")


def takes_password(method_names) -> bool:
    """Whether any of these methods' keys take a password (FFX): only then is one asked for."""
    return any(methods.get(m).takes_password for m in method_names)


def sweep_secret(key_seed: int, method: str, block_size: int) -> bytes:
    """A cell's secret for ``--key-seed``: SHA-256 of ``keyshard-sweep-key/1|<seed>|<method>|<M>``."""
    return seeded.public_secret("sweep-key", key_seed, method, block_size)


def cell_name(method: str, block_size: int) -> str:
    return f"{method}-m{block_size}"


@dataclass
class SweepConfig:
    voc: str
    out: Path
    methods: tuple[str, ...]
    block_sizes: tuple[int, ...]
    preset: str = "demo"
    image_size: int = 256
    epochs: int | None = None          # None: the preset's
    augment_copies: int = 0
    wrong_keys: int = 100
    seed: int = 0                      # training seed and wrong-key seed of every cell
    key_seed: int | None = None        # None: fresh secrets (the default)
    ffx_password: bytes | None = field(default=None, repr=False)
    weights: str | None = None
    ciphertext_only: int = 0           # N > 0: each cell's audit also estimates its key from N keyed test images
    workers: int = 2
    jobs: int = -1
    progress: bool = True

    def train_config(self):
        from keyshard.train.loop import TrainConfig

        return TrainConfig.from_preset(self.preset, epochs=self.epochs, workers=self.workers, seed=self.seed,
                                       weights=self.weights)

    def settings(self) -> dict:
        """What sweep.json records (never the FFX password: only whether one was given; a later
        setting only when it differs from ``LATER_SETTINGS``)."""
        later = {k: v for k, v in {"ciphertext_only": self.ciphertext_only}.items() if v != LATER_SETTINGS[k]}
        return {"voc": str(Path(self.voc).resolve()), "preset": self.preset, "image_size": self.image_size,
                "epochs": self.train_config().epochs, "augment_copies": self.augment_copies,
                "wrong_keys": self.wrong_keys, "seed": self.seed, "key_seed": self.key_seed,
                "ffx_password_given": self.ffx_password is not None, "weights": self.weights, **later,
                "methods": list(self.methods), "block_sizes": list(self.block_sizes)}


def setting(settings: dict, name: str):
    """A fixed setting of a sweep.json record (a later one absent from it: its ``LATER_SETTINGS`` value)."""
    return settings.get(name, LATER_SETTINGS.get(name))


# -- the work --------------------------------------------------------------------------------

class Sweep:
    def __init__(self, cfg: SweepConfig, log=None):
        from tqdm import tqdm

        self.cfg, self.out = cfg, Path(cfg.out)
        self._tqdm = tqdm
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        self.cells = [(m, b) for m in cfg.methods for b in cfg.block_sizes]
        self.redone: list[str] = []    # cells (and "baseline") computed in this run

    # paths
    @property
    def plain_dir(self) -> Path:
        return self.out / "plain"

    def cell_dir(self, method: str, block_size: int) -> Path:
        return self.out / cell_name(method, block_size)

    @staticmethod
    def finished(cell: Path) -> bool:
        return (cell / "audit" / "audit.json").is_file()

    # set-up
    def check(self) -> None:
        """Everything that can be refused before any work."""
        from keyshard import keys
        from keyshard.fsutil import check_output

        cfg = self.cfg
        for b in cfg.block_sizes:
            if cfg.image_size % b:
                raise click.BadParameter(f"block size {b} does not divide --image-size {cfg.image_size}",
                                         param_hint="'--block-sizes'")
            for m in cfg.methods:
                keys.validate_params(m, b, ffx_password=self.password_for(m))
        if cfg.ciphertext_only:
            from keyshard.evaluate.ciphertext_only import check_estimable

            for m in cfg.methods:
                check_estimable(m)
        if cfg.ffx_password is not None and not takes_password(cfg.methods):
            raise KeyshardError(f"an FFX password was given but `methods` has no {' or '.join(keys.password_methods())}")
        check_output(self.out, directory=True)
        record = self.out / "sweep.json"
        if self.out.is_dir() and any(self.out.iterdir()) and not record.is_file():
            raise KeyshardError(f"{self.out}: exists, is not empty and holds no sweep.json; choose a new output directory")
        if record.is_file():
            try:
                previous = json.loads(record.read_text())
            except (OSError, ValueError):
                raise KeyshardError(f"{record}: unreadable; cannot check that this run continues the same sweep") from None
            if not isinstance(previous, dict) or previous.get("format") != SWEEP_FORMAT:
                raise KeyshardError(f"{record}: not a keyshard sweep record ({SWEEP_FORMAT})")
            before, now = previous.get("settings", {}), self.cfg.settings()
            changed = [k for k in FIXED_SETTINGS if setting(before, k) != setting(now, k)]
            if changed:
                raise KeyshardError(f"{self.out}: was started with different {', '.join(changed)}; every cell of a "
                                    "sweep shares them (use the original settings or a new --output)")

    def write_record(self) -> None:
        from keyshard import __version__
        from keyshard.fsutil import write_json_atomic

        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "sweep.json", {"format": SWEEP_FORMAT, "tool": {"name": "keyshard", "version": __version__},
                                                    "settings": self.cfg.settings()})

    # steps
    def encrypt(self, out: Path, key, splits: tuple[str, ...]) -> bool:
        """Make (or finish) one shard directory; True when any work was done."""
        from keyshard.pipeline import encrypt_job

        if (out / MANIFEST).is_file():
            return False
        resume = (out / encrypt_job.PARTIAL_DIR / "job.json").is_file()
        if not resume and out.exists():
            shutil.rmtree(out)  # leftovers of a run that recorded nothing: start over
        opts = encrypt_job.EncryptOptions(size=self.cfg.image_size, splits=splits,
                                          augment_copies=self.cfg.augment_copies)
        encrypt_job.run(self.cfg.voc, str(out), key, opts, jobs=self.cfg.jobs, resume=resume,
                        command=["keyshard", "sweep", "--output", str(self.out)], progress=False)
        return True

    def train(self, shards: Path, run: Path, fresh: bool, label: str) -> None:
        from keyshard.train.loop import Trainer

        resume = not fresh and (run / "last.pt").is_file() and (run / "best.pt").is_file()
        if not resume and run.exists():
            shutil.rmtree(run)
        Trainer(str(shards), str(run), self.cfg.train_config(), resume=resume, progress=False,
                log=lambda msg: self.log(f"  {label}: {msg}")).fit()
        if not (run / "best.pt").is_file():
            raise KeyshardError(f"{run}: training wrote no best.pt (this is a bug)")

    @staticmethod
    def fresh_audit_dir(audit_dir: Path) -> None:
        if audit_dir.exists():
            shutil.rmtree(audit_dir)  # no audit.json: an interrupted audit, redone from scratch

    def password_for(self, method: str) -> bytes | None:
        """The run's FFX password for the cells of methods whose keys take one."""
        return self.cfg.ffx_password if methods.get(method).takes_password else None

    def key_for(self, method: str, block_size: int, path: Path):
        """The cell's key: the one in key.json when a previous run wrote it, else a new one."""
        from keyshard import keys

        pw = self.password_for(method)
        if path.is_file():
            key = keys.load(path)
            if (key.method, key.block_size) != (method, block_size):
                raise KeyshardError(f"{path}: is {key.method} M={key.block_size}, not {method} M={block_size}")
            if key.ffx_password != pw:
                raise KeyshardError(f"{path}: was made with another FFX password setting than this run's")
            if self.cfg.key_seed is not None and key.secret != sweep_secret(self.cfg.key_seed, method, block_size):
                raise KeyshardError(f"{path}: was not derived from `key_seed={self.cfg.key_seed}`")
            return key
        if self.cfg.key_seed is None:
            key = keys.generate(method, block_size, ffx_password=pw)
        else:
            key = keys.Key(method, block_size, sweep_secret(self.cfg.key_seed, method, block_size), ffx_password=pw)
        keys.save(key, path)
        return keys.load(path)

    def run_cell(self, method: str, block_size: int) -> None:
        from keyshard.evaluate.audit import run_audit
        from keyshard.evaluate.report import write_audit

        cell = self.cell_dir(method, block_size)
        label = cell_name(method, block_size)
        if cell.exists() and not (cell / "key.json").is_file():
            shutil.rmtree(cell)  # nothing worth keeping without the key
        cell.mkdir(parents=True, exist_ok=True)
        key = self.key_for(method, block_size, cell / "key.json")
        self.log(f"{label}: key {key.short_fingerprint}…; encrypt train/holdout")
        remade = self.encrypt(cell / "shards", key, ("train", "holdout"))
        self.log(f"{label}: train ({self.cfg.preset} preset)")
        self.train(cell / "shards", cell / "run", fresh=remade, label=label)
        estimate = f", the key from {self.cfg.ciphertext_only} keyed images" if self.cfg.ciphertext_only else ""
        self.log(f"{label}: audit (correct key, plain images, {self.cfg.wrong_keys} wrong keys{estimate})")
        self.fresh_audit_dir(cell / "audit")
        audit = run_audit(str(cell / "run" / "best.pt"), str(cell / "key.json"), str(self.plain_dir),
                          n_wrong=self.cfg.wrong_keys, seed=self.cfg.seed, workers=self.cfg.workers, progress=False,
                          ciphertext_only=self.cfg.ciphertext_only)
        write_audit(audit, cell / "audit")  # audit.json last: the cell is finished

    def run_baseline(self, plain_remade: bool) -> None:
        from keyshard.evaluate.audit import run_baseline
        from keyshard.evaluate.report import write_audit

        base = self.out / "baseline"
        self.log("baseline: train on plain images")
        self.train(self.plain_dir, base / "run", fresh=plain_remade, label="baseline")
        self.log("baseline: audit")
        self.fresh_audit_dir(base / "audit")
        audit = run_baseline(str(base / "run" / "best.pt"), str(self.plain_dir), workers=self.cfg.workers,
                             progress=False)
        write_audit(audit, base / "audit")

    def run(self) -> dict:
        self.check()
        self.write_record()
        todo = [c for c in self.cells if not self.finished(self.cell_dir(*c))]
        base_done = self.finished(self.out / "baseline")
        total = len(self.cells) + 1
        done = total - len(todo) - (0 if base_done else 1)
        if done:
            self.log(f"sweep: {done} of {total} cells already finished (kept)")
        self.log("plain shards: train/holdout/test" + (" (kept)" if (self.plain_dir / MANIFEST).is_file() else ""))
        plain_remade = self.encrypt(self.plain_dir, None, ("train", "holdout", "test"))
        bar = self._tqdm(total=total, initial=done, unit="cell", desc="sweep", disable=not self.cfg.progress,
                         dynamic_ncols=True, file=sys.stderr)
        spent = []
        try:
            jobs = [(cell_name(*c), (lambda c=c: self.run_cell(*c))) for c in todo]
            if not base_done:
                jobs.append(("baseline", lambda: self.run_baseline(plain_remade)))
            for name, job in jobs:
                bar.set_postfix_str(f"now {name}" + (f", {sum(spent) / len(spent):.1f} s/cell" if spent else ""))
                start = time.monotonic()
                job()
                spent.append(time.monotonic() - start)
                self.redone.append(name)
                self.log(f"{name}: finished in {spent[-1]:.1f} s")
                bar.update(1)
        finally:
            bar.close()
        return self.write_report()

    # report
    def write_report(self) -> dict:
        from keyshard.fsutil import write_atomic

        audits, baseline = self.collect()
        md, csv_text = tables(audits, baseline, self.out, self.cfg.settings())
        write_atomic(self.out / "table1.csv", csv_text.encode(), durable=False)
        write_atomic(self.out / "table1.md", md.encode(), durable=False)
        write_atomic(self.out / "fig6.png", fig6(audits, baseline), durable=False)
        return {"table1.csv": self.out / "table1.csv", "table1.md": self.out / "table1.md",
                "fig6.png": self.out / "fig6.png", "markdown": md}

    def collect(self) -> tuple[list[tuple[dict, Path]], tuple[dict, Path] | None]:
        from keyshard.evaluate.report import load_audit

        audits = []
        for m, b in self.cells:
            p = self.cell_dir(m, b) / "audit" / "audit.json"
            audits.append((load_audit(p), p))
        p = self.out / "baseline" / "audit" / "audit.json"
        return audits, ((load_audit(p), p) if p.is_file() else None)


# -- Table 1 and Fig. 6 ----------------------------------------------------------------------

def rows(audits: list[tuple[dict, Path]], baseline: tuple[dict, Path] | None, root: Path | None = None) -> list[dict]:
    """One CSV row per cell (values exactly as in its audit.json) plus a ``baseline`` row."""

    def rel(p: Path) -> str:
        try:
            return str(Path(p).relative_to(root)) if root is not None else str(p)
        except ValueError:
            return str(p)

    out = []
    for a, path in audits:
        r, w = a["results"], a["results"]["wrong"]["summary"]
        out.append({
            "method": a["key"]["method"], "block_size": a["key"]["block_size"],
            "correct_miou": r["correct"]["miou"], "correct_pixel_acc": r["correct"]["pixel_acc"],
            "plain_miou": r["plain"]["miou"], "plain_pixel_acc": r["plain"]["pixel_acc"],
            "wrong_mean_miou": w["mean"], "wrong_std_miou": w["std"], "wrong_min_miou": w["min"],
            "wrong_max_miou": w["max"], "wrong_keys": a["wrong_keys"]["count"],
            "paper_correct_miou": PAPER_TABLE1.get(a["key"]["method"], {}).get(a["key"]["block_size"]),
            "correct_miou_per_image_mean": r["correct"].get("miou_per_image_mean"),
            "plain_miou_per_image_mean": r["plain"].get("miou_per_image_mean"),
            "wrong_miou_per_image_mean": w.get("miou_per_image_mean"),
            "model": a["checkpoint"]["model"], "image_size": a["checkpoint"]["data"]["image_size"],
            "best_epoch": a["checkpoint"]["epoch"], "test_images": a["test"]["images"],
            "key_fingerprint": a["key"]["fingerprint"], "audit": rel(path)})
        if a.get("ciphertext_only"):
            out[-1][CIPHERTEXT_ONLY_FIELD] = a["ciphertext_only"]["scores"]["pixels_exact"]
    if baseline is not None:
        a, path = baseline
        out.append({**{k: None for k in CSV_FIELDS}, "method": "baseline",
                    "plain_miou": a["results"]["plain"]["miou"], "plain_pixel_acc": a["results"]["plain"].get("pixel_acc"),
                    "paper_correct_miou": PAPER_BASELINE,
                    "plain_miou_per_image_mean": a["results"]["plain"].get("miou_per_image_mean"), "model": a["checkpoint"]["model"],
                    "image_size": a["checkpoint"]["data"]["image_size"], "best_epoch": a["checkpoint"]["epoch"],
                    "test_images": a["test"]["images"], "audit": rel(path)})
    return out


def tables(audits: list[tuple[dict, Path]], baseline: tuple[dict, Path] | None, root: Path | None = None,
           settings: dict | None = None) -> tuple[str, str]:
    """``table1.md`` and ``table1.csv``."""
    from keyshard.evaluate.report import VOC_VAL_IMAGES

    data = rows(audits, baseline, root)
    estimated = sorted({a["ciphertext_only"]["images"] for a, _ in audits if a.get("ciphertext_only")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS) + ([CIPHERTEXT_ONLY_FIELD] if estimated else []),
                             lineterminator="\n")
    writer.writeheader()
    writer.writerows(data)
    keyed = [x for x in data if x["method"] != "baseline"]
    sample = (audits[0][0] if audits else baseline[0]) if (audits or baseline) else None
    full = bool(audits) and all(report.full_scale(a) for a, _ in audits)
    md = ["# keyshard sweep — Table 1 (mean IoU)", ""]
    if sample is not None:
        c = sample["checkpoint"]
        trained = (f"{settings['preset']} preset, {settings['epochs']} epoch(s) each (the checkpoint with the lowest "
                   "holdout loss is audited)") if settings else "best checkpoint"
        md.append(f"Our runs: model `{c['model']}`, {c['data']['image_size']}×{c['data']['image_size']} images, "
                  f"{trained}, {sample['test']['images']} test images"
                  + (f", {keyed[0]['wrong_keys']} wrong keys per cell" if keyed else "") + ".")
    md += ["", (f"mIoU aggregation: {AGGREGATION} (table1.csv also has the mean of per-image mIoUs where the "
                "audits record it.)"), "",
           f"Paper: FCN-ResNet50, 256×256, PASCAL VOC2012 val ({VOC_VAL_IMAGES} images), correct key, Table 1. "
           + ("This sweep is full scale, so the numbers are comparable." if full else
              "This sweep is **not** full scale (comparable only with `--preset paper`, `--image-size 256` "
              "on the real VOC2012), so the paper's column is a reference, not a target."), ""]
    md += markdown_table(data, estimated)
    md += ["", ("Columns: *correct key* — the model on test images encrypted with its own key (Table 1); "
                "*plain images* and *wrong keys* — the same model without its key (Fig. 6, “Plain” and "
                "“Incorrect”); the baseline row is a model trained and tested on plain images (its score is in "
                "the plain column)."
                + (" *Ciphertext-only* — the share of pixels of the first keyed test images that decrypt exactly "
                   "with the key estimated from those images alone (`evaluate --ciphertext-only`, "
                   f"`{CIPHERTEXT_ONLY_FIELD}` in table1.csv); 1.0000: they gave the key away." if estimated else "")),
           "", "Figure: `fig6.png`. Each cell's full audit: `<method>-m<M>/audit/audit.md`.", ""]
    return "\n".join(md), buf.getvalue()


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def markdown_table(data: list[dict], estimated: list[int]) -> list[str]:
    """table1.md's table from the CSV rows.  The ciphertext-only column is there only when some
    cell's audit has that record (``estimated``: how many keyed images the estimates used), so a
    sweep without ``--ciphertext-only`` writes the table it always did."""
    head = "| method | M | correct key | plain images | wrong keys (mean ± std) | wrong keys (max) | paper (correct key) |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if estimated:
        head += f" ciphertext-only: pixels exact ({'/'.join(map(str, estimated))} images) |"
        rule += "---:|"
    lines = [head, rule]
    for x in (x for x in data if x["method"] != "baseline"):
        lines.append(f"| {x['method'].upper()} | {x['block_size']} | {_f(x['correct_miou'])} | {_f(x['plain_miou'])} | "
                     f"{_f(x['wrong_mean_miou'])} ± {_f(x['wrong_std_miou'])} | {_f(x['wrong_max_miou'])} | "
                     f"{_f(x['paper_correct_miou'])} |" + (f" {_f(x.get(CIPHERTEXT_ONLY_FIELD))} |" if estimated else ""))
    for x in (x for x in data if x["method"] == "baseline"):
        lines.append(f"| baseline (no key, trained on plain images) | — | — | {_f(x['plain_miou'])} | — | — | "
                     f"{_f(x['paper_correct_miou'])} |" + (" — |" if estimated else ""))
    return lines


def fig6(audits: list[tuple[dict, Path]], baseline: tuple[dict, Path] | None) -> bytes:
    """Fig. 6 of the paper, one panel per method: mIoU against block size (log2 axis) for the
    correct key, plain images and wrong keys (mean ± std band), the paper's correct-key values
    (dashed) and the plain-trained baseline (horizontal line).  PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [x for x in rows(audits, baseline) if x["method"] != "baseline"]
    methods = list(dict.fromkeys(x["method"] for x in data)) or [SWEEP_METHODS[0]]
    base = baseline[0]["results"]["plain"]["miou"] if baseline else None
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.9), dpi=120, sharey=True, squeeze=False)
    for i, (ax, method) in enumerate(zip(axes[0], methods)):
        pts = sorted((x for x in data if x["method"] == method), key=lambda x: x["block_size"])
        m = [x["block_size"] for x in pts]
        mean = [x["wrong_mean_miou"] for x in pts]
        std = [x["wrong_std_miou"] for x in pts]
        ax.fill_between(m, [a - s for a, s in zip(mean, std)], [a + s for a, s in zip(mean, std)],
                        color="#c33", alpha=0.18, lw=0, label="incorrect keys: ± std")
        ax.plot(m, mean, "^-", color="#c33", ms=5, label="incorrect keys: mean")
        ax.plot(m, [x["plain_miou"] for x in pts], "s-", color="#777", ms=5, label="plain images")
        ax.plot(m, [x["correct_miou"] for x in pts], "o-", color="#2a7", ms=5, lw=2, label="correct key")
        paper = [(b, PAPER_TABLE1[method][b]) for b in m if b in PAPER_TABLE1.get(method, {})]
        if paper:
            ax.plot([p[0] for p in paper], [p[1] for p in paper], "o--", color="#2a7", mfc="none", ms=5, alpha=0.7,
                    label="paper: correct key")
        if base is not None:
            ax.axhline(base, color="k", lw=1, ls="-", alpha=0.6, label="baseline (plain-trained)")
        ax.axhline(PAPER_BASELINE, color="k", lw=0.8, ls=":", alpha=0.5, label="paper: baseline")
        ax.set_xscale("log", base=2)
        if m:
            ax.set_xticks(m, [str(b) for b in m])
            ax.set_xlim(min(m) / 1.4, max(m) * 1.4)
        ax.minorticks_off()
        ax.set_ylim(0, 1)
        ax.set_xlabel("block size M")
        if i == 0:
            ax.set_ylabel("mean IoU")
        ax.set_title(f"({chr(97 + i)}) {method.upper()}")
        ax.grid(alpha=0.25)
    found = dict(zip(*reversed(axes[0][0].get_legend_handles_labels())))
    order = ["correct key", "paper: correct key", "plain images", "incorrect keys: mean", "incorrect keys: ± std",
             "baseline (plain-trained)", "paper: baseline"]
    labels = [label for label in order if label in found]
    fig.legend([found[label] for label in labels], labels, loc="lower center", fontsize=7, frameon=False,
               ncol=len(labels) if len(methods) >= 3 else 4 if len(methods) == 2 else 2)
    if data:
        x = data[0]
        fig.suptitle(f"Access control — {x['model']}, {x['image_size']}², {x['test_images']} test images, "
                     f"{x['wrong_keys']} incorrect keys", fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if len(methods) >= 3 else 0.12 if len(methods) == 2 else 0.2, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# -- command -----------------------------------------------------------------------------------

@click.command("sweep", short_help="Reproduce the paper's Table 1 and Fig. 6.")
@click.option("--voc", required=True, type=click.Path(exists=True),
              help="VOC2012 source: VOCdevkit/VOC2012 (or a folder above it) or the official tar.")
@options.output_option(required=True, type=click.Path(file_okay=False), metavar="DIR",
                       help="Sweep directory (created; a rerun continues it).")
@click.option("--methods", type=options.METHOD_LIST, default=",".join(SWEEP_METHODS), show_default=True,
              help="Comma-separated methods (any registered one).")
@click.option("--block-sizes", type=options.CommaList(options.BLOCK_SIZE, sort=True),
              default=",".join(map(str, PAPER_BLOCK_SIZES)), show_default=True,
              help="Comma-separated block sizes M; each must divide --image-size.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="paper", show_default=True,
              help="Training preset of every model (see `keyshard train --help`).")
@click.option("--image-size", type=options.IMAGE_SIZE, default=options.DEFAULT_IMAGE_SIZE, show_default=True, metavar="SIZE",
              help="Images and masks are resized to SIZE x SIZE pixels (as `encrypt --image-size`).")
@click.option("--epochs", type=options.EPOCHS, default=None,
              help=f"Training epochs of every model. Default: {by_preset('epochs')}.")
@click.option("--augment-copies", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="Augmented replicas of each train image (random resized crop + flip, before encryption).")
@click.option("--wrong-keys", type=click.IntRange(1, MAX_WRONG_KEYS), default=100, show_default=True,
              help="Random wrong keys per cell's audit.")
@click.option("--ciphertext-only", "ciphertext_only", type=click.IntRange(0, MAX_CIPHERTEXT_ONLY_IMAGES), default=0,
              show_default=True, metavar="N",
              help="Each cell's audit also estimates the cell's key from the first N test images encrypted with it, "
                   "and nothing else (`evaluate --ciphertext-only`); the table gets a column: the share of their "
                   "pixels that the estimate decrypts exactly. 0: none.")
@click.option("--ffx-password", default=None, metavar="P",
              help="One fixed FFX password for every FFX cell, as in the paper (visible to ps: prefer "
                   "--ffx-password-file or $KEYSHARD_FFX_PASSWORD). Default: derived from each key's secret.")
@click.option("--ffx-password-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Read the FFX password from FILE (one trailing newline dropped).")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Local initial weights for every model (see `keyshard train --weights`).")
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Training seed and wrong-key seed of every cell.")
@click.option("--key-seed", type=options.SEED, default=None,
              help="Derive each cell's key from this number (secret = sha256(\"keyshard-sweep-key/1|N|method|M\")) "
                   "instead of a fresh random secret, for repeatable runs and tests. Such keys are public.")
@click.option("--workers", type=options.WORKERS, default=2, show_default=True, help="DataLoader workers.")
@click.option("--jobs", "-j", type=options.JOBS, default=-1, show_default=True, help="Encryption processes; -1 = all cores.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; only the table at the end.")
@params.names_flags
def sweep(voc, output, methods, block_sizes, preset, image_size, epochs, augment_copies, wrong_keys, ciphertext_only,
          ffx_password, ffx_password_file, weights, seed, key_seed, workers, jobs, quiet):
    """Table 1 and Fig. 6: per (method, M) a new key, encrypt, train, audit; plus the plain baseline.

    \b
      DIR/plain/                               plain shards (train, holdout, test), made once
      DIR/baseline/{run,audit}/                model trained on plain images and its audit
      DIR/<method>-m<M>/{key.json,shards,run,audit}
      DIR/table1.csv, table1.md, fig6.png      the report

    A cell is finished when its audit/audit.json exists; a rerun skips finished cells and
    continues an interrupted one with the same key.
    """
    from keyshard import keys

    password, _ = keys.ffx_password_from(ffx_password, ffx_password_file, use_env=takes_password(methods))
    cfg = SweepConfig(voc=voc, out=Path(output), methods=methods, block_sizes=block_sizes, preset=preset,
                      image_size=image_size, epochs=epochs, augment_copies=augment_copies, wrong_keys=wrong_keys,
                      ciphertext_only=ciphertext_only, seed=seed, key_seed=key_seed, ffx_password=password,
                      weights=weights, workers=workers, jobs=jobs, progress=not quiet)
    runner = Sweep(cfg, log=(lambda msg: None) if quiet else None)
    result = runner.run()
    click.echo(result["markdown"])
    click.echo("wrote " + ", ".join(str(result[k]) for k in ("table1.csv", "table1.md", "fig6.png")))
