"""The ``keyshard`` command: a click group; each stage's package contributes its commands.

User mistakes surface as ``KeyshardError`` and are printed as one ``keyshard: error: ...`` line
with exit status 1 — never a traceback.  An ``OSError`` that reaches the root (a read-only file
system, a full disk, a path the commands did not check) is printed the same way, naming the path.
"""

from __future__ import annotations

import click

from keyshard import __version__
from keyshard.errors import KeyshardError


# The sections of `keyshard --help`, in order, each with its commands in order.  A command that is
# not listed here still shows, under OTHER_SECTION (a new command never disappears from the help).
COMMAND_SECTIONS = (
    ("Prepare", ("keygen", "key-info", "signing-key", "encrypt", "verify", "decrypt", "preview")),
    ("Train", ("train", "protect")),
    ("Audit", ("evaluate", "report", "attack")),
    ("Use", ("predict", "export")),
    ("Reproduce", ("sweep", "demo")),
    ("Sample data", ("toy-voc", "toy-classes")),
)
OTHER_SECTION = "Other"


class _Group(click.Group):
    def format_commands(self, ctx, formatter):
        """One help section per entry of COMMAND_SECTIONS (then OTHER_SECTION) instead of one list."""
        commands = {}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                commands[name] = command
        if not commands:
            return
        listed = {name for _, names in COMMAND_SECTIONS for name in names}
        sections = [(title, [n for n in names if n in commands]) for title, names in COMMAND_SECTIONS]
        sections.append((OTHER_SECTION, [n for n in commands if n not in listed]))
        width = max(len(name) for name in commands)  # one column width for every section
        limit = formatter.width - 6 - width
        for title, names in sections:
            if names:
                with formatter.section(title):
                    formatter.write_dl([(n.ljust(width), commands[n].get_short_help_str(limit)) for n in names])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyshardError as exc:
            click.echo(f"keyshard: error: {exc}", err=True)
            ctx.exit(1)
        except OSError as exc:  # the file system refused something no command anticipated
            from keyshard.fsutil import os_error_line

            click.echo(f"keyshard: error: {os_error_line(exc)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("keyshard: interrupted (an unfinished job can be continued with --resume)", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="keyshard")
def cli():
    """Protect segmentation models with a secret block-wise key.

    \b
    Typical chain (or just: keyshard demo):
      keyshard toy-voc toy/ --images 240          # or the real VOC2012 dir / tar
      keyshard keygen --method np --block-size 8 -o key.json
      keyshard encrypt --voc toy/ --key key.json -o shards/enc --augment-copies 1
      keyshard encrypt --voc toy/ --plain -o shards/plain
      keyshard verify shards/enc
      keyshard train --shards shards/enc -o run --preset demo
      keyshard evaluate --checkpoint run/best.pt --key key.json --test shards/plain -o run/audit
      keyshard attack known-plaintext --plain shards/plain --encrypted shards/enc -o recovered.json
    """


def _register() -> None:
    from keyshard.evaluate.demo import demo
    from keyshard.key_commands import key_info, keygen, signing_key
    from keyshard.pipeline.commands import decrypt, encrypt, toy_voc, verify
    from keyshard.pipeline.preview import preview
    from keyshard.train.commands import protect, train
    from keyshard.evaluate.attack_commands import attack
    from keyshard.evaluate.commands import evaluate, report
    from keyshard.evaluate.export_commands import export
    from keyshard.evaluate.predict_commands import predict
    from keyshard.evaluate.sweep import sweep
    from keyshard.pipeline.classify_commands import toy_classes

    for command in (demo, keygen, key_info, signing_key, toy_voc, encrypt, verify, decrypt, train, protect,
                    evaluate, report, preview, attack, sweep, toy_classes, predict, export):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="keyshard")


if __name__ == "__main__":  # `python -m keyshard.cli` (torchrun -m keyshard.cli train ...)
    main()
