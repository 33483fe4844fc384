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
    api = " ".join((tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8").split())
    assert "shuffle_buffer" in api and "pixel divisor" in api  # signatures and docstrings rendered
    assert _list_items_swallowed_by_paragraphs(tmp_path / "site") == []


def _list_items_swallowed_by_paragraphs(site: Path) -> list[str]:
    """Markdown list items that rendered as text inside a paragraph (a list item right after an
    indented paragraph, without a blank line, is a lazy continuation line to Python-Markdown)."""
    found = []
    for page in sorted(site.rglob("*.html")):
        for paragraph in re.findall(r"<p>(.*?)</p>", page.read_text(encoding="utf-8"), re.S):
            for line in paragraph.split("\n")[1:]:
                text = re.sub(r"<[^>]+>", "", line).strip()
                if re.match(r"(\d+\.|[*+-]) \S", text):
                    found.append(f"{page.relative_to(site)}: {text[:60]}")
    return found


def _quoted_numbers(pattern: str) -> list[tuple[str, int]]:
    """Every number the README and the docs pages quote in ``pattern``'s group, with its file."""
    found = []
    for path in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for match in re.finditer(pattern, path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(ROOT)), int(match.group(1).replace(",", ""))))
    return found


def _code_constants() -> dict[str, int]:
    """The values the docs quote, computed from the code (not copied from it)."""
    import torch

    from keyshard import keys, options, sources
    from keyshard.cli import cli
    from keyshard.train.models import build_model

    shard_size = next(p.default for p in cli.commands["encrypt"].params if p.name == "shard_size")
    secret_np2 = keys.generate("np", 2)
    reference_np2 = keys.generate("np", 2, reference_seed=0)
    torch.manual_seed(0)
    return {
        "retries": sources.RETRIES,
        "small_parameters": sum(p.numel() for p in build_model("small").parameters()),
        "shard_size": shard_size,
        "np2_keys": secret_np2.keyspace_count(),
        "np2_reference_keys": reference_np2.keyspace_count(),
        "warn_bits": keys.SMALL_KEYSPACE_BITS,
        "max_block_size": keys.MAX_BLOCK_SIZE,
        "max_image_size": options.MAX_IMAGE_SIZE,
    }


QUOTES = {  # pattern (one number in its group) -> the constant it quotes
    r"\b(\d+) attempts": "retries",
    r"`small`, ([\d,]+) parameters": "small_parameters",
    r"samples \(default (\d+)": "shard_size",
    r"M=2 have (?:only )?(\d+) (?:keys|masks)": "np2_keys",
    r"\((\d+) for reference-seed keys": "np2_reference_keys",
    r"(?:or|and) (\d+) for\s+reference-seed keys": "np2_reference_keys",
    r"below 2\^(\d+) keys": "warn_bits",
    r"block sizes 1 to (\d+)": "max_block_size",
    r"an integer from 1 to (\d+)": "max_block_size",
    r"image sizes 1 to (\d+)": "max_image_size",
}


def test_numbers_quoted_from_code_constants_are_the_codes():
    constants = _code_constants()
    assert constants["np2_keys"] == 924 and constants["np2_reference_keys"] == 792  # C(12,6), C(12,5)
    for pattern, name in QUOTES.items():
        quotes = _quoted_numbers(pattern)
        wrong = [(where, value) for where, value in quotes if value != constants[name]]
        assert not wrong, f"{name} is {constants[name]} in the code; the docs say {wrong}"
    for name in constants:  # every constant is quoted somewhere, so this test cannot pass vacuously
        assert any(_quoted_numbers(p) for p, n in QUOTES.items() if n == name), f"no page quotes {name}"


def test_the_architecture_page_names_every_module():
    """docs/architecture.md's module tables stay complete: each product module is named there."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for folder in ("keyshard", "pipeline", "train", "evaluate"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            inner = path.relative_to(ROOT / folder).as_posix()
            names = {f"`{inner}`", f"`{path.name}`"}
            if not any(name in text for name in names):
                missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, missing
