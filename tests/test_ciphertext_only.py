"""Ciphertext-only key estimation (issue 24): keys estimated from keyed images alone.

The keyed images are 256×256 crops of scikit-image's bundled photographs; every estimate uses a
prior built from the *other* photographs (never the target's own), and keys drawn from fixed
secrets as `keygen` draws them (FFX password derived from the secret: unknown to the attacker).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from keyshard import keys, methods
from keyshard.evaluate import ciphertext_only as co
from keyshard.methods import prior as image_prior
from keyshard.transforms import compile_plan

from conftest import assert_user_error, fixed_secret, invoke, keyed_run

TARGETS = ("astronaut", "coffee")  # the crops' photographs; the prior comes from the others


@pytest.fixture(scope="module")
def photos():
    return co.skimage_photos()


@pytest.fixture(scope="module")
def prior():
    return co.skimage_prior(tuple(n for n in co.SKIMAGE_PHOTOS if n not in TARGETS))


def crops(photos, names, n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """``n`` size² crops at seeded random places, cycling through the photographs ``names``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[names[i % len(names)]]
        y, x = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
        out.append(np.ascontiguousarray(img[y:y + size, x:x + size]))
    return out


def keyed(method: str, m: int, images, secret: int = 0):
    key = keys.Key(method, m, fixed_secret(secret))
    plan = compile_plan(key.material, *images[0].shape[:2])
    return key, [plan.encrypt(x) for x in images]


def exact_share(material, keyed_images, plain) -> float:
    plan = compile_plan(material, *plain[0].shape[:2])
    return float(np.mean([np.mean(plan.decrypt(y) == x) for y, x in zip(keyed_images, plain)]))


# -- the estimators ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["np", "ffx"])
@pytest.mark.parametrize("m", [2, 4])
def test_np_and_ffx_keys_fall_to_four_images(photos, prior, method, m):
    """≥ 99 % of pixels decrypt exactly from 4 keyed images (NP: one of the two candidates,
    the mask or its complement; FFX: the table too, password unknown)."""
    plain = crops(photos, TARGETS, 4, seed=1)
    key, images = keyed(method, m, plain, secret=m)
    est = co.estimate(method, m, images, prior)
    best = max(exact_share(c, images, plain) for c in est.candidates)
    assert best >= 0.99, (method, m, best, est.notes)
    if method == "np":  # four relative polarities of the channels, each with its complement
        assert len(est.candidates) == 8 and len({c.mask.tobytes() for c in est.candidates}) == 8
        assert est.candidates[0].mask.tolist() == (~est.candidates[1].mask).tolist()
        assert methods.get("np").estimate_score(est.candidates[0], key.material)["key_fraction_up_to_complement"] == 1.0
    else:
        assert est.candidates[0].mask.tolist() == key.material.mask.tolist()  # read off the codes


def test_np_keeps_complements_together_when_polarities_tie(photos, prior):
    """A constant blue channel carries no polarity: two polarities fit equally well, and each
    candidate's complement must still follow it (the ordering sorts pairs, not masks)."""
    plain = [x.copy() for x in crops(photos, TARGETS, 2, seed=3)]
    for x in plain:
        x[..., 2] = 90
    key, images = keyed("np", 4, plain, secret=6)
    est = co.estimate("np", 4, images, prior)
    assert len(est.candidates) == 8
    for a, b in zip(est.candidates[::2], est.candidates[1::2]):
        assert a.mask.tolist() == (~b.mask).tolist()
    assert len(est.notes["polarity_agreement"]) == 4


def test_ffx_with_a_known_password_takes_its_table(photos, prior):
    plain = crops(photos, TARGETS, 1, seed=2)
    key, images = keyed("ffx", 4, plain, secret=3)
    est = co.estimate("ffx", 4, images, prior, password=key.password)
    assert est.candidates[0].equals(key.material)


def test_shf_m2_positions_from_four_images(photos, prior):
    plain = crops(photos, TARGETS, 4, seed=1)
    key, images = keyed("shf", 2, plain, secret=7)
    est = co.estimate("shf", 2, images, prior, seed=0)
    score = methods.get("shf").estimate_score(est.candidates[0], key.material)
    assert score["key_fraction"] >= 0.9, est.notes
    assert est.notes["objective"] >= est.notes["objective_before_refinement"]


def test_shf_candidates_are_the_six_channel_namings(photos):
    """Rocket and motorcycle crops (much blue sky), a prior from the other three photographs
    (warm colours, where a colour prior swaps red and blue): every block position is found, the
    six candidates are the same positions with the channels renamed, and the structure objective
    puts the key first; the score up to channel naming, checked against a renaming done here."""
    from keyshard.transforms import block_coords

    prior = co.skimage_prior(("astronaut", "chelsea", "coffee"))
    plain = crops(photos, ("rocket", "motorcycle"), 4, seed=4)  # crops and key where the colour prior
    key, images = keyed("shf", 4, plain, secret=5)                 # ranks red and blue swapped first
    est = co.estimate("shf", 4, images, prior, seed=0)
    assert len(est.candidates) == 6
    places = {block_coords(c.perm, 4)[0].tobytes() + block_coords(c.perm, 4)[1].tobytes() for c in est.candidates}
    assert len(places) == 1 and len({c.perm.tobytes() for c in est.candidates}) == 6
    assert exact_share(est.candidates[0], images, plain) == 1.0, est.notes
    truth = key.material.perm
    right = [np.mean(c.perm == truth) for c in est.candidates]
    assert right[0] == 1.0 and sorted(right)[:-1] == [0.0, 0.0, 1 / 3, 1 / 3, 1 / 3]  # renamings: 0 or 1 channel kept
    score = methods.get("shf").estimate_score(est.candidates[-1], key.material)  # a wrong naming
    assert score["key_fraction"] == right[-1] and score["key_fraction_up_to_channel_naming"] == 1.0


def test_the_prior_ships_small_and_rebuilds(tmp_path):
    shipped = image_prior.shipped_path()
    assert shipped.stat().st_size < 1 << 20
    loaded = image_prior.load()
    assert "scikit-image" in loaded.source and loaded.reach >= 2 * 16 - 1
    co.main(["build-prior", "-o", str(tmp_path / "p.npz")])
    rebuilt = image_prior.load(tmp_path / "p.npz")
    np.testing.assert_allclose(rebuilt.cov, loaded.cov, rtol=1e-5, atol=1e-3)


# -- the command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_shards(photos, tmp_path_factory):
    """Crops of the target photographs as an image folder, written as plain and as SHF M=4,
    NP M=4 and FFX M=2 shards (256²)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("co")
    for i, img in enumerate(crops(photos, TARGETS, 8, seed=4)):
        (root / "photos" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "photos" / f"c{i % 2}" / f"{i:02d}.png")
    out = {}
    for method, m in (("shf", 4), ("np", 4), ("ffx", 2)):
        keys.save(keys.Key(method, m, fixed_secret(11)), root / f"{method}.json")
        res = invoke("encrypt", "--image-folder", root / "photos", "--key", root / f"{method}.json", "-o",
                     root / method, "--image-size", 256, "--val-fraction", 0.25, "-j", 1, "-q")
        assert res.exit_code == 0, res.output
        out[method] = (root / method, root / f"{method}.json")
    res = invoke("encrypt", "--image-folder", root / "photos", "--plain", "-o", root / "plain", "--image-size", 256,
                 "--val-fraction", 0.25, "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    out["plain"] = root / "plain"
    out["prior"] = root / "prior"
    (root / "prior").mkdir()
    for name in ("chelsea", "rocket", "motorcycle"):  # never the targets' own photographs
        Image.fromarray(photos[name]).save(root / "prior" / f"{name}.png")
    return out


def _report(result) -> dict:
    assert result.exit_code == 0, result.output
    text = result.output
    return json.loads(text[text.index("{"): text.rindex("}") + 1])


@pytest.mark.parametrize("method", ["shf", "np", "ffx"])
def test_the_estimated_key_file_loads_and_decrypts(photo_shards, tmp_path, method):
    from keyshard.evaluate.known_plaintext import read_pixels
    from keyshard.manifest import read

    enc, true_key = photo_shards[method]
    out = tmp_path / "estimated.json"
    report = _report(invoke("attack", "ciphertext-only", "--encrypted", enc, "--images", 4, "-o", out,
                            "--prior", photo_shards["prior"], "-q"))
    assert report["images"] == 4 and report["method"] == method and "photographs of" in report["prior"]
    estimated = keys.load(out)
    assert estimated.derivation == keys.DERIVE_EXPLICIT and estimated.method == method
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    plain = read_pixels(photo_shards["plain"], read(photo_shards["plain"]))
    keyed_pixels = read_pixels(enc, read(enc))
    ids = sorted(keyed_pixels)[:4]
    share = exact_share(estimated.material, [keyed_pixels[i] for i in ids], [plain[i] for i in ids])
    assert share >= (0.9 if method == "shf" else 0.99), share


def test_stdout_is_the_report_and_a_short_shard_set_is_said(photo_shards, tmp_path):
    """stdout is the JSON report alone (the summary line is on stderr), and asking for more
    keyed samples than the shards hold says how many were used."""
    enc, _ = photo_shards["np"]
    res = invoke("attack", "ciphertext-only", "--encrypted", enc, "--split", "test", "--images", 50,
                 "-o", tmp_path / "e.json", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    held = report["images"]
    assert 1 <= held < 50
    assert f"warning: {enc} holds {held} keyed sample(s) of split 'test', not 50: estimated from those" in res.stderr
    assert f"key from {held} keyed image(s)" in res.stderr


def test_key_scores_match_an_independent_computation(photo_shards, tmp_path):
    """--key's numbers, recomputed here from the key files and the shards."""
    enc, true_key = photo_shards["ffx"]
    out = tmp_path / "e.json"
    report = _report(invoke("attack", "ciphertext-only", "--encrypted", enc, "--images", 1, "-o", out,
                            "--key", true_key, "-q"))  # one image: FFX M=2's table is not all right yet
    truth, estimate = keys.load(true_key).material, keys.load(out).material
    keyed_images = _first_samples(enc, 1)
    plan_true, plan_est = compile_plan(truth, 256, 256), compile_plan(estimate, 256, 256)
    plain = np.stack([plan_true.decrypt(y) for y in keyed_images]).astype(np.float64)
    mine = np.stack([plan_est.decrypt(y) for y in keyed_images]).astype(np.float64)
    mse = np.mean((mine - plain) ** 2)
    assert mse > 0, "the estimate is exact: nothing to check the PSNR on"
    scores = report["scores"]
    assert scores["pixels_exact"] == pytest.approx(np.mean(mine == plain), abs=1e-6)
    assert scores["psnr_db"] == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-4)
    keyed_scaled = np.stack(keyed_images).astype(np.float64) * 255 / truth.divisor
    assert scores["psnr_keyed_db"] == pytest.approx(10 * math.log10(255 ** 2 / np.mean((keyed_scaled - plain) ** 2)),
                                                    abs=1e-4)
    n = truth.mask.size
    mask_right, table_right = np.sum(estimate.mask == truth.mask), np.sum(estimate.table == truth.table)
    assert scores["mask_fraction"] == pytest.approx(mask_right / n, abs=1e-6)
    assert scores["table_fraction"] == pytest.approx(table_right / 256, abs=1e-6)
    assert scores["key_fraction"] == pytest.approx((mask_right + table_right) / (n + 256), abs=1e-6)


def _first_samples(source, n: int) -> list[np.ndarray]:
    """The first n samples' pixels in manifest and shard order (what the attack reads)."""
    from keyshard.manifest import read
    from keyshard.shardformat import decode_npy, stream_shard

    out = []
    for shard in read(source).shards:
        out += [decode_npy(files["img.npy"]) for _, files in stream_shard(source / shard.file, shard.entry())]
    return out[:n]


# -- the audit and the stolen model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def np_run(tmp_path_factory):
    """Toy VOC at 32², NP M=4, the demo network one epoch (as tests/test_audit_schema.py)."""
    return keyed_run(tmp_path_factory.mktemp("np"), "np", 4, images=24, seed=5, epochs=1, shard_size=16)


def test_the_audit_row_is_present(np_run, tmp_path):
    from keyshard.evaluate.report import table

    out = tmp_path / "audit"
    res = invoke("evaluate", "--checkpoint", np_run / "run" / "best.pt", "--key", np_run / "key.json", "--test",
                 np_run / "plain", "--wrong-keys", 2, "--workers", 0, "--ciphertext-only", 4, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    audit = json.loads((out / "audit.json").read_text())
    row = audit["ciphertext_only"]
    assert row["images"] == 4 and row["password_known"] is False
    assert 0 <= row["scores"]["key_fraction"] <= 1 and 0 <= row["scores"]["pixels_exact"] <= 1
    assert row["model"]["correct_key"] == audit["results"]["correct"]["miou"]
    md = (out / "audit.md").read_text()
    assert "ciphertext-only: from 4 keyed test image(s) alone an attacker recovers" in md
    assert "ciphertext-only" in res.output
    assert "Ciphertext-only key estimation" in table([audit])[0]


def test_the_stolen_model_scores_the_estimate(np_run, tmp_path):
    report = _report(invoke("attack", "ciphertext-only", "--encrypted", np_run / "enc", "--images", 8,
                            "-o", tmp_path / "e.json", "--key", np_run / "key.json",
                            "--checkpoint", np_run / "run" / "best.pt", "--test", np_run / "plain", "-q"))
    model = report["model"]
    assert model["metric"] == "miou" and len(model["candidates"]) == 8
    assert model["estimated_key"] == max(model["candidates"])
    assert report["chosen_by"] == "the stolen model's score"
    assert 0 <= model["correct_key"] <= 1


# -- bad input ---------------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line(photo_shards, np_run, tmp_path):
    out = tmp_path / "e.json"
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", tmp_path / "none", "-o", out), "none")
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", tmp_path / "empty", "-o", out), "empty")
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", photo_shards["plain"], "-o", out),
                      "holds plain shards")
    enc, _ = photo_shards["np"]
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", enc, "--split", "val", "-o", out),
                      "no keyed shards of split 'val' (its splits: train, holdout, test)")
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", enc, "--images", 5000, "-o", out),
                      "--images 5000")
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", enc, "--checkpoint", "x.pt", "-o", out),
                      "--checkpoint and --test go together")
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", enc, "--prior", tmp_path / "empty",
                             "-o", out), "no readable photographs")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in enc.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    doc = json.loads((bad / "manifest.json").read_text())
    doc["encryption"]["method"] = "nope"
    (bad / "manifest.json").write_text(json.dumps(doc))
    assert_user_error(invoke("attack", "ciphertext-only", "--encrypted", bad, "-o", out), "nope")
    assert not out.exists()
    assert_user_error(invoke("evaluate", "--checkpoint", np_run / "run" / "best.pt", "--key", np_run / "key.json",
                             "--test", np_run / "plain", "--ciphertext-only", 5000, "-o", tmp_path / "a", "-q"),
                      "--ciphertext-only 5000")


def test_a_method_without_an_estimator_is_refused(tmp_path):
    """A plug-in that does not implement ``estimate`` (tests/test_method_plugins.py's additive
    shift) is refused by name, before any sample is read."""
    from test_method_plugins import Additive

    if "add" not in methods.names():
        methods.register(Additive)
    with pytest.raises(Exception, match="method 'add' has no ciphertext-only estimator"):
        co.check_estimable("add")
    assert methods.get("add").estimate(2, [], None, None) is None


# -- the warnings' table --------------------------------------------------------------------------------

def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ciphertext_only.py"
    spec = importlib.util.spec_from_file_location("bench_ciphertext_only", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_warning_table_holds():
    """Every entry says ≥ 99 % of pixels from ≤ 16 images; the entries at M ≤ 4 are measured
    again here, with the benchmark's own keys, crops and folds (every trial)."""
    from keyshard.methods import defaults

    table = json.loads(open(defaults.CIPHERTEXT_ONLY_TABLE).read())
    assert table["source"] == "benchmarks/bench_ciphertext_only.py" and table["entries"]
    bench = _benchmark()
    sets = bench.image_sets(None)
    for entry in table["entries"]:
        assert entry["images"] <= 16 and entry["pixels_exact"] >= 0.99, entry
        if entry["block_size"] > 4:
            continue
        runs = [bench.one(entry["method"], entry["block_size"], entry["images"], t, sets) for t in range(3)]
        assert np.mean([r["pixels_exact"] for r in runs]) >= 0.99, (entry, runs)


def test_key_info_and_encrypt_warn_from_the_table(tmp_path, toy):
    from keyshard.methods import defaults

    entry = json.loads(open(defaults.CIPHERTEXT_ONLY_TABLE).read())["entries"][0]
    keys.save(keys.Key(entry["method"], entry["block_size"], fixed_secret(1)), tmp_path / "k.json")
    res = invoke("key-info", tmp_path / "k.json")
    lines = [line for line in res.output.splitlines() if "ciphertext-only" in line]
    assert res.exit_code == 0 and len(lines) == 1 and f"from {entry['images']} keyed image(s)" in lines[0]
    assert lines[0].startswith("warning: ciphertext-only: "), lines
    res = invoke("encrypt", "--voc", toy, "--key", tmp_path / "k.json", "-o", tmp_path / "out", "--image-size", 32,
                 "--splits", "test", "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    assert len([line for line in res.output.splitlines() if line.startswith("warning: ciphertext-only")]) == 1
    assert defaults.ciphertext_only_warning("shf", 7) is None  # not measured: no claim
