"""``keyshard sweep``: every cell, the baseline, Table 1 (CSV + markdown) and Fig. 6 in one command;
finished cells are never redone, interrupted ones continue with their key."""

from __future__ import annotations

import csv
import json
import shutil
import stat
from pathlib import Path

import pytest

from keyshard import keys
from keyshard.evaluate import sweep as sweep_mod
from keyshard.manifest import read
from keyshard.pipeline import manifest as manifest_mod

from conftest import assert_user_error, invoke

CELLS = [("np", 2), ("np", 4), ("shf", 2), ("shf", 4)]
ARGS = ["--methods", "np,shf", "--block-sizes", "4,2", "--preset", "demo", "--image-size", 16, "--epochs", 1,
        "--wrong-keys", 2, "--workers", 0, "--jobs", 1]


def sweep(toy, out, *extra):
    return invoke("sweep", "--voc", toy, "--output", out, *ARGS, *extra)


def mtimes(out, name):
    return {c: (out / c / name).stat().st_mtime_ns for c in [f"{m}-m{b}" for m, b in CELLS] + ["baseline"]
            if (out / c / name).exists()}


def test_sweep_cells_report_and_resume(toy, tmp_path, monkeypatch):
    out = tmp_path / "sweep"

    # 1. Ctrl-C while shf-m2's shards are being finished: np cells are done, shf-m2 has its key
    #    and every shard but no manifest (a real unfinished encryption, .keyshard-partial/ and all).
    write = manifest_mod.write

    def interrupt(path, doc):
        if path.parent.name == "shf-m2":
            raise KeyboardInterrupt
        write(path, doc)

    monkeypatch.setattr(manifest_mod, "write", interrupt)
    res = sweep(toy, out)
    assert res.exit_code == 130, res.output
    monkeypatch.setattr(manifest_mod, "write", write)
    assert all(sweep_mod.Sweep.finished(out / f"np-m{b}") for b in (2, 4))
    partial = out / "shf-m2"
    assert (partial / "shards" / ".keyshard-partial" / "job.json").is_file()
    assert not (partial / "shards" / "manifest.json").exists() and not (partial / "audit").exists()
    key_bytes = (partial / "key.json").read_bytes()
    kept_shard = (partial / "shards" / "train-000000.tar").stat().st_mtime_ns
    done_before = mtimes(out, "run/best.pt")

    # 2. Rerun: the finished cells are kept, shf-m2 continues with the same key and shards.
    res = sweep(toy, out)
    assert res.exit_code == 0, res.output
    assert "2 of 5 cells already finished" in res.output
    assert mtimes(out, "run/best.pt") == {**mtimes(out, "run/best.pt"), **done_before}
    assert (partial / "key.json").read_bytes() == key_bytes
    assert (partial / "shards" / "train-000000.tar").stat().st_mtime_ns == kept_shard
    assert read(partial / "shards").raw["encryption"]["key_fingerprint"] == keys.load(partial / "key.json").fingerprint

    # 3. Layout, keys, table, figure.
    for d in ("plain", "baseline/run", "baseline/audit"):
        assert (out / d).is_dir(), d
    assert read(out / "plain").raw["splits"]["counts"].keys() == {"train", "holdout", "test"}
    secrets = set()
    for m, b in CELLS:
        cell = out / f"{m}-m{b}"
        assert stat.S_IMODE((cell / "key.json").stat().st_mode) == 0o600
        key = keys.load(cell / "key.json")
        assert (key.method, key.block_size) == (m, b)
        secrets.add(key.secret)
        assert (cell / "shards" / "manifest.json").is_file() and (cell / "run" / "best.pt").is_file()
        assert (cell / "audit" / "audit.json").is_file()
    assert len(secrets) == 4  # a fresh secret per cell by default
    with open(out / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["block_size"]) for r in rows] == [(m, str(b)) for m, b in CELLS] + [("baseline", "")]
    assert list(rows[0]) == list(sweep_mod.CSV_FIELDS)
    for r in rows[:-1]:
        a = json.loads((out / f"{r['method']}-m{r['block_size']}" / "audit" / "audit.json").read_text())
        res_ = a["results"]
        assert float(r["correct_miou"]) == res_["correct"]["miou"]
        assert float(r["plain_miou"]) == res_["plain"]["miou"]
        assert float(r["wrong_mean_miou"]) == res_["wrong"]["summary"]["mean"]
        assert float(r["wrong_std_miou"]) == res_["wrong"]["summary"]["std"]
        if "miou_per_image_mean" in res_["correct"]:
            assert float(r["correct_miou_per_image_mean"]) == res_["correct"]["miou_per_image_mean"]
        assert int(r["wrong_keys"]) == 2 and r["audit"] == f"{r['method']}-m{r['block_size']}/audit/audit.json"
    base = json.loads((out / "baseline" / "audit" / "audit.json").read_text())
    assert float(rows[-1]["plain_miou"]) == base["results"]["plain"]["miou"] and rows[-1]["correct_miou"] == ""
    assert float(rows[0]["paper_correct_miou"]) == 0.6216 and float(rows[-1]["paper_correct_miou"]) == 0.7080
    md = (out / "table1.md").read_text()
    assert "| NP | 2 |" in md and "0.6216" in md and "baseline" in md and "dataset-level" in md
    assert (out / "fig6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 4. A cell whose audit is gone is redone; nothing else is.
    runs, audits = mtimes(out, "run/best.pt"), mtimes(out, "audit/audit.json")
    (out / "np-m4" / "audit" / "audit.json").unlink()
    res = sweep(toy, out)
    assert res.exit_code == 0, res.output
    assert "4 of 5 cells already finished" in res.output
    assert mtimes(out, "run/best.pt") == runs  # np-m4 resumed its finished training: nothing retrained
    after = mtimes(out, "audit/audit.json")
    assert after["np-m4"] != audits["np-m4"]
    assert {k: v for k, v in after.items() if k != "np-m4"} == {k: v for k, v in audits.items() if k != "np-m4"}

    # 5. An interrupted cell whose shard step left only debris (a truncated shard, no manifest,
    #    no job record) and no run or audit: shards, training and audit start over, same key.
    cell = out / "shf-m4"
    before = json.loads((cell / "audit" / "audit.json").read_text())["results"]
    key_bytes = (cell / "key.json").read_bytes()
    shutil.rmtree(cell / "audit")
    shutil.rmtree(cell / "run")
    (cell / "shards" / "manifest.json").unlink()
    (cell / "shards" / "train-000000.tar").write_bytes(b"half a shard")
    res = sweep(toy, out)
    assert res.exit_code == 0, res.output
    assert (cell / "key.json").read_bytes() == key_bytes
    assert manifest_mod.verify(cell / "shards", progress=False) == []
    again = json.loads((cell / "audit" / "audit.json").read_text())["results"]
    assert again["correct"]["miou"] == before["correct"]["miou"]  # same key, data and seed: same model

    # 6. Refusals: one line, nothing written.
    assert_user_error(invoke("sweep", "--voc", toy, "--output", out, *ARGS[:-8], "--epochs", 2, *ARGS[-6:]),
                      "different epochs")
    res = invoke("sweep", "--voc", toy, "--output", tmp_path / "bad", "--block-sizes", "3", "--image-size", 16)
    assert res.exit_code == 2 and "does not divide --image-size 16" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bad").exists()


def test_key_seed_keys_and_cli_checks(toy, tmp_path):
    cfg = sweep_mod.SweepConfig(voc=str(toy), out=tmp_path / "s", methods=("ffx",), block_sizes=(4,),
                                image_size=16, key_seed=3, ffx_password=b"paper")
    runner = sweep_mod.Sweep(cfg, log=lambda m: None)
    (tmp_path / "s").mkdir()
    key = runner.key_for("ffx", 4, tmp_path / "s" / "key.json")
    assert key.secret == sweep_mod.sweep_secret(3, "ffx", 4) and key.password == b"paper"
    assert runner.key_for("ffx", 4, tmp_path / "s" / "key.json").secret == key.secret  # reused, not replaced
    other = sweep_mod.Sweep(sweep_mod.SweepConfig(**{**cfg.__dict__, "key_seed": 4}), log=lambda m: None)
    with pytest.raises(Exception, match="not derived from `key_seed=4`"):  # the command shows --key-seed 4
        other.key_for("ffx", 4, tmp_path / "s" / "key.json")
    assert_user_error(invoke("sweep", "--voc", toy, "--output", tmp_path / "x", "--methods", "np",
                             "--ffx-password", "pw", "--image-size", 16, "--block-sizes", 4), "no ffx")
    not_sweep = tmp_path / "occupied"
    not_sweep.mkdir()
    (not_sweep / "file").write_text("x")
    assert_user_error(invoke("sweep", "--voc", toy, "--output", not_sweep, "--image-size", 16, "--block-sizes", 4),
                      "holds no sweep.json")
    res = invoke("sweep", "--voc", toy, "--output", tmp_path / "y", "--methods", "abc")
    assert res.exit_code == 2 and "--methods" in res.output


# -- --ciphertext-only: each cell's audit estimates its key from keyed images; the table gets a column

def _example_audit() -> dict:
    """The shipped example audit (NP M=4, with a ciphertext-only record from a real toy run)."""
    return json.loads((Path(__file__).resolve().parents[1] / "manifests" / "example-audit.json").read_text())


def test_the_table_gets_a_ciphertext_only_column_only_when_an_audit_has_the_record(tmp_path):
    with_row = _example_audit()
    without = {k: v for k, v in with_row.items() if k != "ciphertext_only"}
    root = tmp_path / "s"
    path = root / "np-m4" / "audit" / "audit.json"

    md, csv_text = sweep_mod.tables([(without, path)], None, root)
    assert csv_text.splitlines()[0].split(",") == list(sweep_mod.CSV_FIELDS)  # off: the table it always was
    assert "ciphertext" not in md.lower()

    md, csv_text = sweep_mod.tables([(with_row, path), (without, path)], None, root)
    header, first, second = list(csv.reader(csv_text.splitlines()))
    assert header == [*sweep_mod.CSV_FIELDS, "ciphertext_only_pixels_exact"]
    assert float(first[-1]) == with_row["ciphertext_only"]["scores"]["pixels_exact"] and second[-1] == ""
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| ciphertext-only: pixels exact (4 images) |")
    assert table[1].endswith(f"| {with_row['ciphertext_only']['scores']['pixels_exact']:.4f} |")
    assert table[2].endswith("| — |") and all(line.count("|") == table[0].count("|") for line in table)


def test_ciphertext_only_is_a_fixed_setting_absent_from_sweep_json_when_off(toy, tmp_path):
    cfg = sweep_mod.SweepConfig(voc=str(toy), out=tmp_path / "s", methods=("np",), block_sizes=(4,), image_size=16)
    assert "ciphertext_only" not in cfg.settings()  # off: sweep.json as before
    sweep_mod.Sweep(cfg, log=lambda m: None).write_record()  # a sweep started without it ...
    on = sweep_mod.SweepConfig(**{**cfg.__dict__, "ciphertext_only": 4})
    assert on.settings()["ciphertext_only"] == 4
    with pytest.raises(Exception, match="different ciphertext_only"):
        sweep_mod.Sweep(on, log=lambda m: None).check()  # ... is not continued with it
    sweep_mod.Sweep(cfg, log=lambda m: None).check()  # nor does a record without it stop a sweep without it


def test_sweep_ciphertext_only_audits_every_cell(toy, tmp_path):
    out = tmp_path / "sweep"
    res = invoke("sweep", "--voc", toy, "--output", out, "--methods", "np", "--block-sizes", 4, "--preset", "demo",
                 "--image-size", 16, "--epochs", 1, "--wrong-keys", 2, "--workers", 0, "--jobs", 1,
                 "--ciphertext-only", 2, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "np-m4" / "audit" / "audit.json").read_text())
    assert audit["ciphertext_only"]["images"] == 2
    with open(out / "table1.csv", newline="") as f:
        cell, base = list(csv.DictReader(f))
    assert float(cell["ciphertext_only_pixels_exact"]) == audit["ciphertext_only"]["scores"]["pixels_exact"]
    assert base["method"] == "baseline" and base["ciphertext_only_pixels_exact"] == ""
    assert "ciphertext-only: pixels exact (2 images)" in (out / "table1.md").read_text()
