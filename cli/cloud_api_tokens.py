"""`orz cloud api-token create|list|revoke`: your API tokens, for scripts and CI, and to revoke a lost one.

Not `orz cloud token`, which prints a one-time attach token for one session's ssh.
"""

from __future__ import annotations

import click
from pydantic import ValidationError

from api import schemas
from api.db import tokens
from cli import output
from cli.connect import client, cloud_command
from cli.errors import EXIT_USAGE, CliError


@click.group("api-token")
def api_token() -> None:
    """API tokens: mint one for a script or CI, list yours, revoke one (a lost laptop, a leaked secret)."""


@api_token.command("create")
@click.argument("name")
@click.option("--expires-in-days", metavar="N", type=click.IntRange(1, 366), default=90, show_default=True,
              help="Days until it stops working.")
@click.option("--no-expiry", is_flag=True, help="Good until revoked.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer, token included.")
@cloud_command
async def create(name: str, expires_in_days: int, no_expiry: bool, as_json: bool) -> None:
    """Mint an API token named NAME for yourself; it is printed once (to stdout) and never shown again."""
    try:
        body = schemas.ApiTokenCreate(name=name, expires_in_days=None if no_expiry else expires_in_days)
    except ValidationError as exc:
        raise CliError(f"invalid token name: {exc.errors()[0]['msg']}", EXIT_USAGE) from None
    async with client() as api:
        created = await api.create_api_token(body)
    if as_json:
        click.echo(output.to_json(created))
        return
    click.echo(created.token)
    until = f"until {created.expires_at:%Y-%m-%d}" if created.expires_at else "until revoked"
    click.echo(f"API token {created.id} ({created.prefix}...) {until}; shown only now. Use it with "
               f"orz cloud login --token, or as an Authorization: Bearer header; revoke it with: "
               f"orz cloud api-token revoke {created.id}", err=True)


@api_token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's ApiTokenList (no token values).")
@cloud_command
async def list_cmd(as_json: bool) -> None:
    """Your API tokens that still work, and which one this CLI uses."""
    async with client() as api:
        listing = await api.list_api_tokens()
    if as_json:
        click.echo(output.to_json(listing))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "EXPIRES"):
        table.add_column(column, no_wrap=column != "NAME", overflow="ellipsis")
    for t in listing.tokens:
        table.add_row(t.id, output.printable(t.name), t.prefix,
                      output.relative(t.created_at), output.relative(t.last_used_at) if t.last_used_at else "never",
                      f"{t.expires_at:%Y-%m-%d}" if t.expires_at else "never")
    output.print_table(table)
    # Named below rather than marked in the table: a marker after the name wrapped onto a line of its own
    # in 80 columns for the names logins get ("orz-server", "sign-in (oidc:Google)").
    current = next((t for t in listing.tokens if t.current), None)
    if current is not None:
        click.echo(f"this CLI's login: {current.id} (where each came from: --json, source)")


@api_token.command("revoke")
@click.argument("token_id", metavar="ID|PREFIX|NAME")
@cloud_command
async def revoke(token_id: str) -> None:
    """Revoke one of your API tokens by its ID or PREFIX (from list), or its NAME when no other of yours has
    it; a sign-in's token ends its sign-in."""
    if tokens.looks_like(token_id, tokens.API_TOKEN_PREFIX) and len(token_id) > 24:
        # A token's value would go into the request's path, and so into the API's access log.
        raise CliError("that looks like a token's value: revoke it by its ID or PREFIX (orz cloud api-token list "
                       "shows them)", EXIT_USAGE)
    async with client() as api:
        listed = (await api.list_api_tokens()).tokens
        named = [t for t in listed if t.name == token_id]
        own = next((t for t in listed if token_id in (t.id, t.prefix)), named[0] if len(named) == 1 else None)
        await api.revoke_api_token(token_id)
    click.echo(f"API token {token_id} revoked" if own is None or token_id in (own.id, own.prefix)
               else f"API token {own.id} ({own.name}) revoked")
    if own is not None and own.current:
        click.echo("that was this CLI's login: orz cloud login to sign in again", err=True)
