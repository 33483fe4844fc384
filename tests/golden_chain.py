"""The golden chain: fixed inputs through the public CLI, reduced to what must never change.

``python tests/golden_chain.py record`` writes ``tests/golden/`` from the current code;
``tests/test_golden.py`` runs the same chain and compares.  Only stable interfaces are used —
key files written as their JSON format says, CLI commands and the files they write — so a
refactor of the code behind them cannot change the chain itself.

What is compared (and why it is enough to call a refactor behaviour-preserving):

* every shard's sha256, per method at M=2 and M=16 and for plain shards: byte-identical shards;
* every manifest as JSON, less the fields that name when, how and with which versions it was
  written (``created``, ``command``, tool/library versions);
* the tensors of a checkpoint after one CPU epoch with a fixed seed (within 1e-6), for a
  segmentation and a classification model;
* every number in their audits (within 1e-9).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
CELLS = [(method, m) for method in ("shf", "np", "ffx") for m in (2, 16)]
# "version": the manifest's tool.version (a release changes no behaviour; tests/golden/ was recorded at 0.1.0)
VOLATILE = {"created_utc", "command", "libraries", "keyshard_version", "tool_version", "version", "python", "platform"}


def fixed_key(path: Path, method: str, block_size: int, i: int) -> Path:
    """A key file in the keyshard-key/1 format with a fixed, public secret."""
    secret = bytes((i * 7 + j) % 256 for j in range(32)).hex()
    doc = {"format": "keyshard-key/1", "method": method, "block_size": block_size, "channels": 3,
           "secret": secret}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def cli(*args) -> None:
    from click.testing import CliRunner

    from keyshard.cli import cli as root

    result = CliRunner().invoke(root, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)


def _stable(doc, work: Path):
    """JSON with the volatile fields removed at any depth, and paths relative to the work dir."""
    if isinstance(doc, dict):
        return {k: _stable(v, work) for k, v in sorted(doc.items()) if k not in VOLATILE}
    if isinstance(doc, list):
        return [_stable(v, work) for v in doc]
    if isinstance(doc, str) and doc.startswith(str(work)):
        return "<work>" + doc[len(str(work)):]
    return doc


def _shards(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.tar"))}


def _numbers(doc, prefix=""):
    """Every number in a JSON document, by its path: what an audit measured."""
    if isinstance(doc, dict):
        return {k: v for key, value in doc.items() for k, v in _numbers(value, f"{prefix}/{key}").items()}
    if isinstance(doc, list):
        return {k: v for i, value in enumerate(doc) for k, v in _numbers(value, f"{prefix}/{i}").items()}
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return {prefix: doc}
    return {}


def _segmentation(work: Path, out: dict) -> None:
    cli("toy-voc", work / "toy", "--images", 16, "--seed", 3, "--min-side", 40, "--max-side", 64)
    voc = work / "toy"
    cli("encrypt", "--voc", voc, "--plain", "-o", work / "plain", "--image-size", 32, "--jobs", 1,
        "--shard-size", 4, "--quiet")
    out["shards"]["plain"] = _shards(work / "plain")
    out["manifests"]["plain"] = _stable(json.loads((work / "plain" / "manifest.json").read_text()), work)
    for i, (method, m) in enumerate(CELLS):
        key = fixed_key(work / f"{method}{m}.json", method, m, i)
        name = f"{method}{m}"
        cli("encrypt", "--voc", voc, "--key", key, "-o", work / name, "--image-size", 32, "--jobs", 1,
            "--shard-size", 4, "--augment-copies", 1, "--quiet")
        out["shards"][name] = _shards(work / name)
        out["manifests"][name] = _stable(json.loads((work / name / "manifest.json").read_text()), work)
    cli("train", "--shards", work / "np2", "-o", work / "run", "--preset", "demo", "--epochs", 1,
        "--seed", 0, "--workers", 0, "--quiet")
    cli("evaluate", "--checkpoint", work / "run" / "last.pt", "--key", work / "np2.json", "--test",
        work / "plain", "--wrong-keys", 4, "--seed", 0, "--near-miss", "1,4", "--near-miss-keys", 2,
        "--workers", 0, "-o", work / "audit")
    out["audits"]["segmentation"] = _numbers(json.loads((work / "audit" / "audit.json").read_text()))


def _classification(work: Path, out: dict) -> None:
    cli("toy-classes", work / "classes", "--classes", 3, "--images", 30, "--seed", 2)
    key = fixed_key(work / "cls-key.json", "shf", 4, 99)
    cli("encrypt", "--image-folder", work / "classes", "--key", key, "-o", work / "cls-enc",
        "--image-size", 32, "--jobs", 1, "--shard-size", 8, "--quiet")
    cli("encrypt", "--image-folder", work / "classes", "--plain", "-o", work / "cls-plain",
        "--image-size", 32, "--jobs", 1, "--shard-size", 8, "--quiet")
    for name in ("cls-enc", "cls-plain"):
        out["shards"][name] = _shards(work / name)
        out["manifests"][name] = _stable(json.loads((work / name / "manifest.json").read_text()), work)
    cli("train", "--shards", work / "cls-enc", "-o", work / "cls-run", "--preset", "demo", "--epochs", 1,
        "--seed", 0, "--workers", 0, "--quiet")
    cli("evaluate", "--checkpoint", work / "cls-run" / "last.pt", "--key", key, "--test", work / "cls-plain",
        "--wrong-keys", 4, "--seed", 0, "--workers", 0, "-o", work / "cls-audit")
    out["audits"]["classification"] = _numbers(json.loads((work / "cls-audit" / "audit.json").read_text()))


def checkpoint_tensors(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    model = state["model"] if "model" in state else state
    return {k: v.detach().clone() for k, v in model.items() if hasattr(v, "dtype")}


def run_chain(work: Path) -> tuple[dict, dict]:
    """Run the whole chain in ``work``; return (JSON-able outputs, checkpoint tensors)."""
    import torch

    torch.set_num_threads(2)  # CPU kernels may sum in another order on another thread count
    out = {"shards": {}, "manifests": {}, "audits": {}}
    _segmentation(work, out)
    _classification(work, out)
    tensors = {f"segmentation/{k}": v for k, v in checkpoint_tensors(work / "run" / "last.pt").items()}
    tensors.update({f"classification/{k}": v for k, v in checkpoint_tensors(work / "cls-run" / "last.pt").items()})
    return out, tensors


def record() -> None:
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out, tensors = run_chain(Path(tmp))
    GOLDEN.mkdir(exist_ok=True)
    (GOLDEN / "outputs.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    torch.save(tensors, GOLDEN / "checkpoints.pt")
    print(f"recorded {sum(len(v) for v in out['shards'].values())} shards, {len(tensors)} tensors")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    record()
