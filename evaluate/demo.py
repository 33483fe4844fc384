"""``keyshard demo``: the whole chain on a synthetic VOC, on the CPU, in a few minutes.

toy-voc → keygen → encrypt (plain test/holdout shards, keyed train/holdout shards with
augmentation replicas, read from the official-layout tar) → verify → decrypt check → train (demo
preset) → evaluate with the correct key, plain images, 100 wrong keys and near-miss keys →
known-plaintext attack on the holdout pairs → report.  Every artifact's path is printed.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from keyshard import options, params, seeded
from keyshard.errors import KeyshardError
from keyshard.evaluate.wrong_keys import MAX_COUNT as MAX_WRONG_KEYS
from keyshard.methods.defaults import DEMO_BLOCK_SIZE as DEFAULT_BLOCK
from keyshard.methods.defaults import DEMO_METHOD as DEFAULT_METHOD


def demo_secret(key_seed: int) -> bytes:
    """The demo key's secret for ``--key-seed``: SHA-256 of ``keyshard-demo-key/1|<seed>``."""
    return seeded.public_secret("demo-key", key_seed)


@click.command("demo")
@click.option("--workdir", default="keyshard-demo", show_default=True, type=click.Path(file_okay=False),
              help="New directory for every artifact of the demo.")
@click.option("--images", type=click.IntRange(16, options.MAX_IMAGES), default=240, show_default=True, metavar="N",
              help="Images of the synthetic VOC (split about evenly into train and val/test).")
@options.image_size_option(default=64, show_default=True, metavar="SIZE",
                           help="Images are resized to SIZE x SIZE pixels (small, for the CPU); --block-size must "
                                "divide it.")
@click.option("--method", type=options.METHOD, default=DEFAULT_METHOD, show_default=True,
              help="Encryption method of the demo key. " + options.method_help())
@click.option("--block-size", "-M", type=options.BLOCK_SIZE, default=DEFAULT_BLOCK, show_default=True,
              help="Block size M of the demo key (pixels per block side).")
@click.option("--epochs", type=options.EPOCHS, default=15, show_default=True,
              help="Training epochs of the demo network (the rest of its recipe is `train --preset demo`'s).")
@click.option("--wrong-keys", type=click.IntRange(1, MAX_WRONG_KEYS), default=100, show_default=True,
              help="Random wrong keys the audit scores.")
@click.option("--jobs", "-j", type=options.JOBS, default=-1, show_default=True,
              help="Encryption worker processes: -1 = all cores, else 1 or more.")
@click.option("--key-seed", type=options.SEED, default=None,
              help="Derive the demo key from this number instead of a fresh random secret, so the whole "
                   "run is reproducible (the toy data and training are seeded already). Such a key is "
                   "public: never protect real data with it.")
@params.names_flags
def demo(workdir, images, image_size, method, block_size, epochs, wrong_keys, jobs, key_seed):
    """Run the whole chain on synthetic data and show that the model needs its key.

    Default: NP with M=8.  The paper reports that SHF and NP at small block sizes still work
    fairly well without the key; at M=8 access control is strong on this data.
    """
    from keyshard.evaluate.audit import run_audit
    from keyshard.evaluate.near_miss import max_distance
    from keyshard.evaluate.report import write_audit
    from keyshard.pipeline.toy_voc import TAR_NAME, make_toy_voc
    from keyshard.train.loop import TrainConfig, Trainer

    work = Path(workdir)
    if work.exists() and any(work.iterdir()):
        raise KeyshardError(f"{work}: exists and is not empty; choose another --workdir")
    click.echo(f"[1/8] synthetic VOC2012 layout, {images} images, and its official-layout tar")
    voc = make_toy_voc(work / "toy-voc", images=images, make_tar=True)
    key_path = work / "key.json"
    key = _make_key(method, block_size, key_seed, key_path)
    click.echo("[3/8] encrypt: plain test/holdout shards (the audit encrypts them itself), keyed "
               "train/holdout shards with 1 augmentation replica, read from the tar")
    plain_dir, enc_dir = work / "shards-plain", work / "shards-enc"
    _encrypt(voc, work / "toy-voc" / TAR_NAME, plain_dir, enc_dir, key, image_size, jobs)
    click.echo("[4/8] verify both shard sets; decrypt a keyed sample back to its plain image")
    _verify_and_decrypt(plain_dir, enc_dir, key, image_size)
    click.echo(f"[5/8] train the demo network on the keyed shards ({epochs} epochs, CPU)")
    run_dir = work / "run"
    Trainer(str(enc_dir), str(run_dir), TrainConfig.from_preset("demo", epochs=epochs, workers=1), log=click.echo).fit()
    click.echo(f"[6/8] audit: correct key, plain images, {wrong_keys} random wrong keys, near-miss keys")
    near = tuple(d for d in (1, 4, 16, 64) if d <= max_distance(key.material))
    audit = run_audit(str(run_dir / "best.pt"), str(key_path), str(plain_dir), wrong_keys, seed=0, workers=1,
                      near_miss=near, near_miss_count=3)
    audit_paths = write_audit(audit, run_dir / "audit")
    click.echo("[7/8] known-plaintext attack: plain and keyed holdout shards of the same ids")
    kpa, recovered_miou = _attack(work, plain_dir, enc_dir, run_dir, image_size)
    click.echo("[8/8] report")
    _report(work, audit, kpa, recovered_miou)
    rows = [
        ("toy VOC (dir)", voc), ("toy VOC (tar)", work / "toy-voc" / TAR_NAME), ("key (0600)", key_path),
        ("plain test shards", plain_dir / "manifest.json"), ("keyed shards", enc_dir / "manifest.json"),
        ("checkpoints", run_dir / "best.pt"), ("training log", run_dir / "metrics.jsonl"),
        *[("audit", p) for p in audit_paths], ("recovered key", work / "recovered-key.json"),
        ("report", work / "report.md"),
    ]
    click.echo("\nartifacts:")
    for label, path in rows:
        click.echo(f"  {label:18} {path}")


def _make_key(method: str, block_size: int, key_seed: int | None, key_path: Path):
    """Step 2: a fresh key, or the public one of ``--key-seed``, saved to ``key_path``."""
    from keyshard import keys

    why = " (the paper's strong-access-control regime for this data)" if (method, block_size) == (DEFAULT_METHOD, DEFAULT_BLOCK) else ""
    if key_seed is None:
        click.echo(f"[2/8] key: {method} M={block_size}{why}")
        key = keys.generate(method, block_size)
    else:
        click.echo(f"[2/8] key: {method} M={block_size}{why}, from --key-seed {key_seed} (reproducible, not secret)")
        keys.validate_params(method, block_size)
        key = keys.Key(method, block_size, demo_secret(key_seed))
    keys.save(key, key_path)
    return key


def _encrypt(voc: Path, tar: Path, plain_dir: Path, enc_dir: Path, key, image_size: int, jobs: int) -> None:
    """Step 3: plain holdout/test shards from the directory, keyed train/holdout shards from the tar."""
    from keyshard.pipeline import encrypt_job

    encrypt_job.run(str(voc), str(plain_dir), None, encrypt_job.EncryptOptions(size=image_size, shard_size=32, splits=("holdout", "test")),
                    jobs=jobs, command=["keyshard", "demo"])
    encrypt_job.run(str(tar), str(enc_dir), key,
                    encrypt_job.EncryptOptions(size=image_size, shard_size=32, augment_copies=1, splits=("train", "holdout")),
                    jobs=jobs, command=["keyshard", "demo"])


def _verify_and_decrypt(plain_dir: Path, enc_dir: Path, key, image_size: int) -> None:
    """Step 4: both shard sets verify, and a keyed sample decrypts to a plain image."""
    from keyshard.manifest import read
    from keyshard.pipeline.manifest import verify
    from keyshard.shardformat import decode_npy, iter_tar_samples
    from keyshard.transforms import compile_plan

    manifests = {d: read(d) for d in (plain_dir, enc_dir)}
    for d, manifest in manifests.items():
        problems = verify(d, progress=False, doc=manifest)
        if problems:
            raise KeyshardError(f"{d}: verify failed: {problems[0]}")
    name, files = next(iter_tar_samples(enc_dir / manifests[enc_dir].shards[0].file))
    restored = compile_plan(key.material, image_size, image_size).decrypt(decode_npy(files["img.npy"]))
    if restored.dtype != np.uint8 or restored.shape != (image_size, image_size, 3):
        raise KeyshardError("decrypted sample has the wrong shape (this is a bug)")


def _attack(work: Path, plain_dir: Path, enc_dir: Path, run_dir: Path, image_size: int) -> tuple[dict, float]:
    """Step 7: recover the key from the holdout pairs; the stolen model's mIoU with it."""
    from keyshard import keys
    from keyshard.evaluate import known_plaintext
    from keyshard.evaluate.audit import score_on_split
    from keyshard.manifest import read
    from keyshard.train.checkpoint import load_model
    from keyshard.transforms import compile_plan

    recovered, kpa, _ = known_plaintext.attack(plain_dir, enc_dir)
    keys.save(recovered, work / "recovered-key.json")
    model, _ = load_model(str(run_dir / "best.pt"), "cpu")
    plan = compile_plan(recovered.material, image_size, image_size).to_torch("cpu")
    scores = score_on_split(model, [(plan, recovered.material.divisor)], str(plain_dir), read(plain_dir), "cpu",
                            progress=False)
    return kpa, scores[0]["miou"]


def _report(work: Path, audit: dict, kpa: dict, recovered_miou: float) -> None:
    """Step 8: report.md/csv and the summary on stdout."""
    from keyshard.evaluate.report import markdown, table

    md, csv_text = table([audit])
    (work / "report.md").write_text(md)
    (work / "report.csv").write_text(csv_text)
    click.echo("\n" + markdown(audit).split("<details>")[0].rstrip())
    click.echo(f"\nKnown-plaintext attack: {kpa['pairs_needed']} plain/encrypted pair(s) gave the whole key "
               f"(it re-makes all {kpa['reproduced']} keyed holdout samples); with it the stolen model reaches "
               f"{recovered_miou:.4f} mIoU (correct key {audit['results']['correct']['miou']:.4f}). Encrypted "
               "shards of a public dataset are as secret as the key.")
