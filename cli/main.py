"""`orz`: the Orzbob Cloud command line (users' `orz cloud`, operators' services and admin)."""

from __future__ import annotations

import os
import sys

import click

from cli import admin, services


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orzbob-cloud", prog_name="orz")
def orz() -> None:
    """Orzbob Cloud: AI coding agents in cloud tmux sessions you attach to over SSH."""


orz.add_command(admin.admin)
for command in services.COMMANDS:
    orz.add_command(command)

try:
    from cli.cloud import cloud
except ModuleNotFoundError as exc:  # the user-facing commands live in their own module
    if exc.name != "cli.cloud":
        raise
else:
    orz.add_command(cloud)


def main() -> None:
    try:
        orz(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # Last resort: a bug still ends in one line; ORZ_DEBUG=1 shows the traceback for a report.
        if os.environ.get("ORZ_DEBUG"):
            raise
        detail = " ".join(str(exc).split()) or "no detail"
        click.echo(f"orz: internal error: {type(exc).__name__}: {detail} (ORZ_DEBUG=1 shows more)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
