"""The wheel maps pipeline/ (and the manifest schema) under keyshard, with no top-level modules."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("keyshard-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "keyshard/pipeline/encrypt_job.py" in names
    assert "keyshard/train/loop.py" in names and "keyshard/evaluate/audit.py" in names
    assert "keyshard/manifests/manifest.schema.json" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"keyshard"} | {n for n in tops if n.endswith(".dist-info")}


def test_installed_package_imports_subpackages():
    out = subprocess.run([sys.executable, "-c", "import keyshard.pipeline.encrypt_job, keyshard.manifests;"
                          "import keyshard.train.loop, keyshard.evaluate.audit;"
                          "import importlib.util as u; print(u.find_spec('pipeline'), u.find_spec('train'),"
                          " u.find_spec('evaluate'))"],
                         cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None", "None"]


def test_example_manifest_matches_the_schema():
    import json

    from keyshard.manifest import validate

    validate(json.loads((ROOT / "manifests" / "example-manifest.json").read_text()), "example")


def _imports(path: Path) -> set[tuple[str, str | None]]:
    """What a file imports at run time, as (module, name) pairs: ``from m import n`` gives
    ``(m, n)``, ``import m`` gives ``(m, None)`` (``if TYPE_CHECKING:`` blocks only name types)."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for stmt in node.body for inner in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            out.update((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update((alias.name, None) for alias in node.names)
    return out


# pipeline/'s public entry points, the only ones evaluate/'s orchestrators (demo, sweep) use: the
# encryption job, the toy data sets and verify
PIPELINE_ENTRY_POINTS = ("keyshard.pipeline.encrypt_job", "keyshard.pipeline.toy_voc", "keyshard.pipeline.toy_classes",
                         "keyshard.pipeline.manifest.verify")
ORCHESTRATORS = ("demo.py", "sweep.py")


def _entry_point(module: str, name: str | None) -> bool:
    """``from module import name`` / ``import module`` reaches only pipeline's entry points."""
    dotted = module if name is None else f"{module}.{name}"
    return any(dotted == e or dotted.startswith(e + ".") or module == e for e in PIPELINE_ENTRY_POINTS)


def test_dependency_direction():
    """core ← pipeline; core ← train ← evaluate.  The core reaches a stage only through the CLI root;
    pipeline imports no other stage; train imports neither pipeline nor evaluate (it reads manifests
    through the core's Manifest); in evaluate only the orchestrators import pipeline, and only its
    entry points."""
    forbidden = {
        "keyshard": ("keyshard.pipeline", "keyshard.train", "keyshard.evaluate"),
        "pipeline": ("keyshard.train", "keyshard.evaluate"),
        "train": ("keyshard.pipeline", "keyshard.evaluate"),
        "evaluate": ("keyshard.pipeline",),
    }
    for folder, stages in forbidden.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "keyshard" and path.name == "cli.py":
                continue  # registers the stages' commands lazily
            imports = _imports(path)
            if folder == "evaluate" and path.name in ORCHESTRATORS:
                imports = {(m, n) for m, n in imports if not _entry_point(m, n)}
            bad = {m if n is None else f"{m}.{n}" for m, n in imports
                   if m.startswith(stages) or (n is not None and f"{m}.{n}".startswith(stages))}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
