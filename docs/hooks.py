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

from markdown.extensions import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "api-src"
CLI_PAGE = "reference/cli.md"  # the page mkdocs-click fills with the commands' help texts
_current_page = [""]


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
    config.markdown_extensions.append(ClickHelpTextExtension())
    return config


def _click_text_to_markdown(markdown: str) -> str:
    """Help texts as mkdocs-click emits them are click's text, not Markdown.

    click keeps the line breaks of a paragraph marked ``\\b``; mkdocs-click drops the marker,
    and in these help texts such paragraphs are the indented lines (commands, file layouts), so
    each run of indented lines becomes a code block here.  ``<split>``-style placeholders are
    text, not HTML tags.
    """
    out, fenced, verbatim = [], False, []
    for line in markdown.splitlines() + [""]:
        if verbatim and not line.startswith("  "):
            indent = min(len(v) - len(v.lstrip()) for v in verbatim)
            out += ["", "```text", *(v[indent:] for v in verbatim), "```"]
            verbatim = []
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("  ") and line.strip():
            verbatim.append(line)
            continue
        elif not fenced:
            line = line.replace("<", "&lt;").replace(">", "&gt;")
        out.append(line)
    return "\n".join(out[:-1])


class _ClickHelpText(Preprocessor):
    """Runs right after mkdocs-click's preprocessor (priority 141), before fences are parsed."""

    def run(self, lines):
        if _current_page[0] != CLI_PAGE:  # other pages are Markdown already
            return lines
        return _click_text_to_markdown("\n".join(lines)).splitlines()


class ClickHelpTextExtension(Extension):
    def extendMarkdown(self, md):
        md.preprocessors.register(_ClickHelpText(md), "keyshard_click_help_text", 140)


def on_page_markdown(markdown, page, config, files):
    _current_page[0] = page.file.src_uri  # the page whose Markdown is converted next
    return markdown
