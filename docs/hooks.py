"""mkdocs hook: give mkdocstrings the installed package layout of ``keyshard``.

``pipeline/``, ``train/`` and ``evaluate/`` live at the top of the repository but are installed as
``keyshard.pipeline``, ``keyshard.train`` and ``keyshard.evaluate`` (setuptools ``package-dir``).
griffe, which reads the sources for mkdocstrings, only follows a package's own directory, so
before the build this hook lays out ``build/api-src/keyshard/`` as symbolic links that mirror
``package-dir`` (read from ``pyproject.toml``, the one place it is written), and mkdocs.yml points
mkdocstrings' ``paths`` there.  Nothing is copied; the API pages always show the working tree.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "api-src"


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: (ROOT / path).resolve() for name, path in mapping.items()}


def _lay_out() -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    for name, source in sorted(_package_dirs().items()):
        target = TREE.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            if entry.suffix == ".py" or entry.suffix == ".json":
                (target / entry.name).symlink_to(entry)


@event_priority(100)  # before mkdocstrings reads its ``paths``
def on_config(config):
    _lay_out()
    return config
