"""`orz cloud token ID`: a one-time attach token, for clients that cannot use `orz cloud attach`'s certificate
(any ssh without the CLI: paste it at the gateway's `Token:` prompt)."""

from __future__ import annotations

from datetime import UTC

import click

from api import schemas
from cli import attach as attaching
from cli.completion import complete_session_ids
from cli.connect import client, cloud_command


@click.command("token")
@click.argument("session_id", metavar="ID", callback=lambda _c, _p, v: attaching.check_session_id(v),
                shell_complete=complete_session_ids)
@click.option("--readonly", is_flag=True, help="A token that only watches.")
def token(session_id: str, readonly: bool) -> None:
    """Print a one-time attach token (for ssh's Token: prompt); how to use it goes to stderr."""
    grant = _grant(session_id, readonly)
    click.echo(grant.token)
    until = grant.token_expires_at.astimezone(UTC).strftime("%H:%M:%S UTC")
    click.echo(f"single use, until {until}; paste it at the Token: prompt of: {grant.ssh}", err=True)


@cloud_command
async def _grant(session_id: str, readonly: bool) -> schemas.AttachGrant:
    async with client() as api:
        return await api.attach(session_id, schemas.AttachRequest(readonly=readonly))


COMMANDS = [token]
