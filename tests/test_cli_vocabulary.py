"""One CLI vocabulary (issue 21, part 4), checked over the whole click tree: every command and
option has help, what a command writes is ``-o/--output``, image sizes are ``--image-size``, the
old names ``--out``/``--size`` are hidden deprecated aliases that still work (one stderr line),
and ``keyshard --help`` lists the commands in sections.  No training or encryption runs here."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from keyshard.cli import OTHER_SECTION, cli
from keyshard.options import deprecation_line
from keyshard.train.presets import PRESETS, by_preset


def walk(command: click.Command, path: tuple[str, ...] = ("keyshard",)):
    """(path, command) for the root and every command under it, groups included."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, path + (name,))


COMMANDS = {" ".join(path): command for path, command in walk(cli)}
OLD_NAMES = {"--out", "--size"}


def options(command: click.Command, hidden: bool = False) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.hidden == hidden]


def flags(option: click.Option) -> set[str]:
    return set(option.opts) | set(option.secondary_opts)


def run(*args):
    """The CLI in-process with stdout and stderr kept apart (click < 8.2 needs mix_stderr=False)."""
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click 8.2+: stderr is always separate (result.output interleaves both)
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("keyshard: warning:")]


# -- the tree ----------------------------------------------------------------------------------

def test_the_walk_reaches_subcommands():
    assert {"keyshard", "keyshard train", "keyshard attack", "keyshard attack search",
            "keyshard attack finetune", "keyshard attack known-plaintext"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    assert (COMMANDS[name].help or "").strip(), f"{name}: no help"


def test_every_visible_option_has_help():
    missing = [f"{name} {'/'.join(option.opts)}" for name, command in COMMANDS.items()
               for option in options(command) if not (option.help or "").strip()]
    assert missing == []


def test_no_visible_option_uses_an_old_name():
    old = [f"{name} {sorted(flags(option) & OLD_NAMES)}" for name, command in COMMANDS.items()
           for option in options(command) if flags(option) & OLD_NAMES]
    assert old == []


def test_outputs_are_dash_o_output():
    for name, command in COMMANDS.items():
        for option in options(command):
            if option.name == "output" or flags(option) & {"-o", "--output"}:
                assert {"-o", "--output"} <= flags(option), f"{name}: {option.opts}"
    writers = ["keygen", "signing-key", "encrypt", "decrypt", "preview", "train", "protect", "evaluate", "sweep",
               "attack known-plaintext", "attack search", "attack finetune"]
    for name in writers:
        assert any({"-o", "--output"} <= flags(o) for o in options(COMMANDS[f"keyshard {name}"])), name


def test_image_sizes_are_image_size():
    for name in ("keygen", "encrypt", "preview", "sweep", "demo"):
        (option,) = [o for o in options(COMMANDS[f"keyshard {name}"]) if o.name == "image_size"]
        assert option.opts == ["--image-size"], name


def test_old_names_are_hidden_aliases_of_the_new_ones():
    expected = {"train": "--out", "evaluate": "--out", "sweep": "--out", "attack search": "--out",
                "attack finetune": "--out", "encrypt": "--size", "demo": "--size"}
    found = {name.removeprefix("keyshard "): opt for name, command in COMMANDS.items()
             for option in options(command, hidden=True) for opt in option.opts if opt in OLD_NAMES}
    assert found == expected
    for name, old in expected.items():
        help_text = run(*name.split(), "--help").output
        assert f"{old} " not in help_text and f"{old}," not in help_text, name


def test_preset_dependent_defaults_name_each_preset():
    train = COMMANDS["keyshard train"]
    by_name = {o.name: o for o in options(train)}
    for setting in PRESETS["paper"]:
        assert by_preset(setting) in by_name[setting].help, setting
    epochs = by_name["epochs"].help
    for preset, values in PRESETS.items():
        assert f"{values['epochs']} with --preset {preset}" in epochs


# -- the aliases at work -----------------------------------------------------------------------

def test_size_alias_works_with_one_notice(tmp_path):
    args = ["encrypt", "--voc", tmp_path / "missing", "--plain", "-o", tmp_path / "out"]
    old = run(*args, "--size", 32)
    assert old.exit_code == 1 and "VOC dataset not found" in old.stderr  # got past the options
    assert warnings(old) == [deprecation_line("--size", "--image-size")]
    new = run(*args, "--image-size", 32)
    assert new.exit_code == 1 and warnings(new) == []
    same = run(*args, "--size", 32, "--image-size", 32)
    assert same.exit_code == 1 and len(warnings(same)) == 1
    clash = run(*args, "--size", 32, "--image-size", 64)
    assert clash.exit_code == 2
    assert "--size 32 and --image-size 64 disagree" in clash.stderr
    bad = run(*args, "--size", 0)  # refused under the name that was typed
    assert bad.exit_code == 2 and "'--size'" in bad.stderr


def test_size_alias_sets_the_image_size(tmp_path):
    from keyshard.pipeline.toy_voc import make_toy_voc

    voc = make_toy_voc(tmp_path / "toy", images=4, seed=0, min_side=16, max_side=24, progress=False)
    res = run("encrypt", "--voc", voc, "--plain", "-o", tmp_path / "shards", "--size", 8, "--shard-size", 4,
              "-j", 1, "-q")
    assert res.exit_code == 0, res.output
    assert len(warnings(res)) == 1
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["image"]["height"] == 8


def test_demo_size_alias(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "x").write_text("x")
    res = run("demo", "--workdir", tmp_path / "work", "--size", 32)
    assert res.exit_code == 1 and "not empty" in res.stderr
    assert warnings(res) == [deprecation_line("--size", "--image-size")]


def test_out_alias_reaches_the_output_option(tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "audit.json").write_text("{}")
    res = run("evaluate", "--checkpoint", tmp_path / "none.pt", "--test", tmp_path, "--out", audit)
    assert res.exit_code == 1
    assert f"{audit}: already holds an audit; choose another --output" in res.stderr
    assert warnings(res) == [deprecation_line("--out", "-o/--output")]
    clash = run("evaluate", "--checkpoint", tmp_path / "none.pt", "--test", tmp_path, "--out", audit,
                "-o", tmp_path / "other")
    assert clash.exit_code == 2 and "disagree; give only -o/--output" in clash.stderr


@pytest.mark.parametrize("args", [
    ["train", "--shards", "{tmp}/missing"],
    ["sweep", "--voc", "{tmp}"],
    ["attack", "search", "--checkpoint", "{tmp}/none.pt", "--labelled-shards", "{tmp}", "--test", "{tmp}"],
    ["attack", "finetune", "--checkpoint", "{tmp}/none.pt", "--plain-train", "{tmp}", "--test", "{tmp}"],
], ids=["train", "sweep", "attack search", "attack finetune"])
def test_out_alias_is_accepted_everywhere(args, tmp_path):
    """--out satisfies a required --output (exit 1 for the missing input, not 2 for a missing option)."""
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")  # sweep: a non-empty directory that is not a sweep
    out = tmp_path / "busy" if args[0] == "sweep" else tmp_path / "result.json"
    res = run(*[a.format(tmp=tmp_path) for a in args], "--out", out)
    assert res.exit_code == 1, res.output
    assert len([line for line in res.stderr.splitlines() if line.startswith("keyshard: error:")]) == 1
    assert warnings(res) == [deprecation_line("--out", "-o/--output")]
    if args[0] == "sweep":
        assert f"{out}: exists, is not empty" in res.stderr


# -- keyshard --help -----------------------------------------------------------------------------

SECTIONS = [
    ("Prepare", ["keygen", "key-info", "signing-key", "encrypt", "verify", "decrypt", "preview"]),
    ("Train", ["train", "protect"]),
    ("Audit", ["evaluate", "report", "attack"]),
    ("Use", ["predict", "export"]),
    ("Reproduce", ["sweep", "demo"]),
    ("Sample data", ["toy-voc", "toy-classes"]),
]


def help_sections(text: str) -> list[tuple[str, list[str]]]:
    """The sections after Options: as (heading, [command, ...])."""
    sections = []
    for line in text.split("\nOptions:\n", 1)[1].splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            sections.append((line[:-1], []))
        elif sections and line.startswith("  ") and not line.startswith("   "):
            sections[-1][1].append(line.split()[0])
    return sections


def test_root_help_groups_the_commands():
    res = run("--help")
    assert res.exit_code == 0
    assert help_sections(res.output) == SECTIONS
    assert {c for _, names in SECTIONS for c in names} == set(cli.commands)  # every command, once
    assert "--out " not in res.output and "--size " not in res.output  # the example chain too


def test_a_command_missing_from_the_table_is_still_listed():
    group = type(cli)("keyshard", commands={**cli.commands, "zz-new": click.Command("zz-new", help="New.")})
    text = group.get_help(click.Context(group, info_name="keyshard"))
    assert help_sections(text) == SECTIONS + [(OTHER_SECTION, ["zz-new"])]
