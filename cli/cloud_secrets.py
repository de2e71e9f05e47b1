"""`orz cloud secrets create|list|delete`: named sets of environment variables for sessions.

Values go to the API and nowhere else: never printed, never logged, and not echoed by `list`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import click
from pydantic import ValidationError

from api import schemas
from api.client import ApiError
from cli import output
from cli.connect import client, cloud_command
from cli.errors import EXIT_USAGE, CliError, shown


def parse_pairs(pairs: tuple[str, ...], from_env: tuple[str, ...]) -> dict[str, str]:
    """`K=V` words (split at the first '=') plus variables copied from this environment."""
    data: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            # Do not echo the word: it may be a value typed without its KEY=.
            raise CliError("--data wants KEY=VALUE (one of the words has no KEY= before its value)", EXIT_USAGE)
        data[key] = value
    for key in from_env:
        if key not in os.environ:
            raise CliError(f"--from-env {shown(key, quote=False)}: no such environment variable", EXIT_USAGE)
        data[key] = os.environ[key]
    if not data:
        raise CliError("give at least one --data KEY=VALUE or --from-env KEY", EXIT_USAGE)
    return data


@click.group("secrets")
def secrets() -> None:
    """Secrets: environment variables for your sessions (values are never shown)."""


# What each rule of schemas.SecretCreate asks for, in words (pydantic's own message names a regex).
_RULES = {
    "name": "a name is lowercase letters, digits, '-' and '_', starts and ends with a letter or digit, "
            "at most 64 characters",
    "key": "a key is a variable name: letters, digits and '_', not starting with a digit, at most 128 characters",
    "value": "a value is at most 65536 characters, without control characters other than tab and newline",
    "data": "give 1 to 64 variables (--data KEY=VALUE or --from-env KEY)",
}


def _invalid(err: Mapping[str, Any]) -> str:
    """One pydantic error of SecretCreate as the user reads it: the field and its rule, never a value."""
    loc = tuple(str(p) for p in err["loc"])
    if err["type"] == "control_character":  # a model-wide check: the key's path is in ctx
        where = str(err.get("ctx", {}).get("path", "")).strip(".[]'\"")
        return f"invalid secret data{' ' + shown(where, 64, quote=False) if where else ''}: {_RULES['value']}"
    if loc[:1] == ("name",):
        return f"invalid secret name: {_RULES['name']}"
    if loc[:1] == ("data",) and len(loc) >= 2:
        # pydantic marks a dict key's own error with "[key]" after the key (a value's error has none).
        rule = _RULES["key"] if loc[-1] == "[key]" else _RULES["value"]
        return f"invalid secret data {shown(loc[1], 64, quote=False)}: {rule}"
    return f"invalid secret {'.'.join(loc) or 'data'}: {_RULES['data']}"


@secrets.command("create")
@click.argument("name")
@click.option("--data", "pairs", multiple=True, metavar="KEY=VALUE", help="A variable (repeat for more).")
@click.option("--from-env", multiple=True, metavar="KEY",
              help="Copy KEY's value from this environment (keeps it out of shell history).")
@click.option("--scope", type=click.Choice(["user", "org"]), default="user", show_default=True,
              help="user: only you; org: everyone in your org.")
@click.option("--replace", is_flag=True,
              help="Replace the data of the existing secret NAME (sessions get it at their next start).")
@cloud_command
async def create(name: str, pairs: tuple[str, ...], from_env: tuple[str, ...], scope: str, replace: bool) -> None:
    """Create a secret NAME from KEY=VALUE pairs (or, with --replace, give an existing one new data)."""
    try:
        body = schemas.SecretCreate(name=name, data=parse_pairs(pairs, from_env), scope=scope)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise CliError(_invalid(exc.errors()[0]), EXIT_USAGE) from None
    async with client() as api:
        if replace:
            secret = await api.replace_secret(name, schemas.SecretReplace(data=body.data), scope)
            click.echo(f"secret {secret.name} replaced ({secret.scope} scope; keys: {', '.join(secret.keys)})")
            return
        try:
            secret = await api.create_secret(body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            # The API's answer says "use PUT"; here that is --replace.
            raise CliError(f"a {scope} secret named {name} already exists; give it new data with: "
                           f"orz cloud secrets create {name} --replace ...") from None
    click.echo(f"secret {secret.name} created ({secret.scope} scope; keys: {', '.join(secret.keys)})")


@secrets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's SecretList (names and keys only).")
@cloud_command
async def list_cmd(as_json: bool) -> None:
    """Your secrets and the org's shared ones (names and keys, no values)."""
    async with client() as api:
        listing = await api.list_secrets()
    if as_json:
        click.echo(output.to_json(listing))
        return
    if not listing.secrets:
        click.echo("no secrets; create one with: orz cloud secrets create NAME --data KEY=VALUE")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in ("NAME", "SCOPE", "KEYS", "UPDATED"):
        table.add_column(column, overflow="fold" if column == "KEYS" else "ellipsis")
    for secret in listing.secrets:
        table.add_row(secret.name, secret.scope, ", ".join(secret.keys), output.relative(secret.updated_at))
    output.print_table(table)


@secrets.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete it even though sessions use it.")
@cloud_command
async def delete(name: str, force: bool) -> None:
    """Delete a secret (sessions already running keep the values they started with)."""
    if not schemas.SECRET_NAME_RE.match(name):
        raise CliError(f"not a secret name: {shown(name)}", EXIT_USAGE)
    async with client() as api:
        users = [i for i in (await api.list_instances()).instances if name in i.secrets and i.status != "deleted"]
        if users and not force:
            raise CliError(f"secret {name} is used by {_sessions(users)}, which cannot start again without it "
                           "(a running session keeps its values until it stops); kill them first, or delete it "
                           "anyway with --force")
        await api.delete_secret(name)
    click.echo(f"secret {name} deleted")
    if users:
        click.echo(f"warning: {_sessions(users)} will fail to start until it is created again", err=True)


def _sessions(instances: list[schemas.Instance]) -> str:
    shown = ", ".join(f"{i.id} ({i.status})" for i in instances[:5])
    more = f" and {len(instances) - 5} more" if len(instances) > 5 else ""
    return f"session{'s' if len(instances) > 1 else ''} {shown}{more}"
