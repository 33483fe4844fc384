"""The documentation keeps its promises: CI runs what the README says, the site builds strictly,
and numbers the docs quote from code constants are the code's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _readme_commands() -> list[str]:
    """The two ```bash blocks of the README's install section, one command line each."""
    section = README.read_text(encoding="utf-8").split("## Install and run the demo", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)[:2]
    commands = [block.strip() for block in blocks]
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    return commands


def test_ci_runs_exactly_the_readme_commands():
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[:2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."']
    assert lines[2:] == _readme_commands()


def test_readme_install_uses_the_constraints_and_stays_short():
    install, test = _readme_commands()
    assert 'pip install -c constraints.txt -e ".[test]"' in install
    assert "--upgrade" not in install  # the venv's own pip must do
    assert test.endswith("python -m pytest -q")
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_constraints_pin_every_line_exactly():
    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [p for p in pins if p]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    assert {"torch", "torchvision", "webdataset", "mkdocs", "lightning", "s3fs", "moto"} <= names


def test_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").stat().st_size > 10_000
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "shuffle_buffer" in api and "pixel divisor" in api  # signatures and docstrings rendered
