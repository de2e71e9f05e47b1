"""`orz`: the Orzbob Cloud command line (users' `orz cloud`, operators' services and admin)."""

from __future__ import annotations

import importlib
import os
import sys

import click

from api.settings import SettingsInvalid
from cli import services
from cli.cloud import cloud


class _LazyGroup(click.Group):
    """Imports `orz admin` (SQLAlchemy, Alembic: ~0.7 s) only when it runs, because ssh runs
    `orz cloud _refresh-cert` on every `ssh <id>.orz` connection and must start fast."""

    lazy = {"admin": ("cli.admin", "admin")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attr = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orzbob-cloud", prog_name="orz")
def orz() -> None:
    """Orzbob Cloud: AI coding agents in cloud tmux sessions you attach to over SSH."""


for command in services.COMMANDS:
    orz.add_command(command)

orz.add_command(cloud)


def main() -> None:
    try:
        # prog_name: the same name (help, and completion's _ORZ_COMPLETE) for `orz` and `python -m cli`.
        orz(prog_name="orz", standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except SettingsInvalid as exc:  # a bad ORZ_* value: the operator's to fix, not a bug to report
        click.echo(f"orz: invalid configuration: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        # Last resort: a bug still ends in one line; ORZ_DEBUG=1 shows the traceback for a report.
        if os.environ.get("ORZ_DEBUG"):
            raise
        detail = " ".join(str(exc).split()) or "no detail"
        click.echo(f"orz: internal error: {type(exc).__name__}: {detail} (ORZ_DEBUG=1 shows more)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
