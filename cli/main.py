"""`orz`: the Orzbob Cloud command line (users' `orz cloud`, operators' services and admin)."""

from __future__ import annotations

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


if __name__ == "__main__":
    main()
