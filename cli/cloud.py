"""`orz cloud`: what users type. Account commands, SSH set-up and validation live here; sessions and
secrets have their own modules."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import click

from cli import attach as attaching
from cli import cloud_automation, cloud_proxy, cloud_secrets, cloud_sessions, cloud_watch, keys, output, ssh_config
from cli.config import DEFAULT_API_URL, forget_credentials, load_credentials, token_path
from cli.connect import client, cloud_command
from cli.errors import CliError
from cli.login import FLOWS, login


@click.group("cloud")
def cloud() -> None:
    """Your sessions: AI coding agents in cloud tmux sessions you attach to over SSH."""


def _default_api_url() -> str:
    try:
        saved = load_credentials()
    except ValueError:
        saved = None
    return os.environ.get("ORZBOB_API_URL") or (saved.api_url if saved else DEFAULT_API_URL)


@cloud.command("login")
@click.option("--token", envvar="ORZBOB_TOKEN", help="An API token (orz_...), e.g. from orz admin create-token.")
@click.option("--api-url", help="The API's URL (default: ORZBOB_API_URL, the saved one, or http://127.0.0.1:8080).")
@click.option("--method", type=click.Choice(sorted(FLOWS)), default="token", show_default=True,
              help="How to log in (more flows, e.g. device code, plug in here).")
@cloud_command
async def login_cmd(token: str | None, api_url: str | None, method: str) -> None:
    """Log in: check the token against the API and save it (mode 0600)."""
    url = (api_url or _default_api_url()).rstrip("/")
    flow = FLOWS[method](token)
    creds, me = await login(flow, url)
    click.echo(f"logged in to {creds.api_url} as {me.user.email} (org {me.org.name}, {me.org.plan} plan)")
    click.echo(f"login saved in {token_path()}", err=True)


@cloud.command("logout")
def logout() -> None:
    """Forget the saved login (the token itself stays valid until an admin revokes it)."""
    if forget_credentials():
        click.echo(f"logged out (removed {token_path()})")
    else:
        click.echo("not logged in")


@cloud.command("whoami")
@click.option("--json", "as_json", is_flag=True, help="Print the API's Me object as JSON.")
@cloud_command
async def whoami(as_json: bool) -> None:
    """Who you are logged in as, your org, plan and quota use."""
    async with client() as api:
        me = await api.me()
        url = api.base_url
    if as_json:
        click.echo(output.to_json(me))
        return
    admin = ", org admin" if me.user.is_admin else ""
    click.echo(f"{me.user.email} (org {me.org.name}{admin}) at {url}")
    click.echo(output.quota_line(me.quota))


@cloud.command("ssh-config")
@click.option("--write", is_flag=True, help="Write ~/.config/orzbob/ssh_config and Include it from ~/.ssh/config.")
@click.option("--websocket", is_flag=True,
              help="Reach the gateway over its WebSocket door (ProxyCommand orz cloud proxy), for networks "
                   "where only HTTPS gets through.")
def ssh_config_cmd(write: bool, websocket: bool) -> None:
    """Set up plain `ssh <id>.orz` (and VS Code Remote-SSH) with self-refreshing certificates."""
    try:
        if not write:
            click.echo(ssh_config.render_main_config(websocket=websocket), nl=False)
            click.echo(f"# Save as {ssh_config.orz_ssh_config_path()} and add at the top of ~/.ssh/config:",
                       err=True)
            click.echo(f"#   Include {ssh_config.orz_ssh_config_path()}   (or run with --write)", err=True)
            return
        keys.ensure_key_pair()  # the config names it; make it now rather than on the first connection
        target = ssh_config.write_main_config(websocket=websocket)
        user_config = ssh_config.user_ssh_config_path()
        changed = ssh_config.install_include(user_config, target)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    click.echo(f"wrote {target}")
    click.echo(f"{'added an Include to' if changed else 'already included from'} {user_config}")
    click.echo(f"now: ssh <session-id>{ssh_config.HOST_SUFFIX}")


@cloud.command("_refresh-cert", hidden=True)
@click.argument("host")
def refresh_cert(host: str) -> None:
    """For ssh's `Match exec`: make sure <id>.orz has a certificate with >= 60 s left."""
    session_id = attaching.check_session_id(ssh_config.session_from_host(host))
    if attaching.is_fresh(session_id):
        return
    _refresh(session_id)


@cloud_command
async def _refresh(session_id: str) -> None:
    async with client() as api:
        await attaching.fetch_certificate(api, session_id)


def _load_validator():  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module("runner.cloud_config")
    except ModuleNotFoundError as exc:
        if exc.name in ("runner", "runner.cloud_config"):
            raise CliError("validate needs the runner package (runner.cloud_config), "
                           "which this installation does not include") from None
        raise


@cloud.command("validate")
@click.argument("path", type=click.Path(path_type=Path), default=".")
@click.option("--secrets", "secret_names", metavar="NAME,...",
              help="Check each ${KEY} the file uses against the keys of these secrets (asks the API).")
def validate(path: Path, secret_names: str | None) -> None:
    """Check .orz/cloud.yaml (in PATH, a directory, or PATH itself) with the runner's validator.

    Keys this version does not know are warnings, as they were ignored by the Go version; errors exit 1."""
    file = path / ".orz" / "cloud.yaml" if path.is_dir() else path
    if not file.exists():
        raise CliError(f"{file}: no such file (a repo's config lives in .orz/cloud.yaml)")
    validator = _load_validator()
    try:
        config = validator.validate_file(file)
    except validator.CloudConfigError as exc:
        for problem in exc.problems:
            click.echo(f"orz: {problem}", err=True)
        raise click.exceptions.Exit(1) from None
    for warning in config.warnings:
        click.echo(f"orz: warning: {warning}", err=True)
    refs = sorted(validator.secret_refs(config))
    names = [n.strip() for n in (secret_names or "").split(",") if n.strip()]
    if names:
        problems = validator.missing_secrets(config, _secret_keys(names))
        for problem in problems:
            click.echo(f"orz: {problem}", err=True)
        if problems:
            raise click.exceptions.Exit(1)
    elif refs:
        used = ", ".join(f"${{{ref}}}" for ref in refs)
        click.echo(f"orz: note: the file uses {used}: start sessions with secrets that have these keys "
                   "(orz cloud new --secrets NAME,...); check them with: orz cloud validate --secrets NAME,...",
                   err=True)
    services = config.services
    click.echo(f"{file}: ok ({len(services)} service{'s' if len(services) != 1 else ''})")


@cloud_command
async def _secret_keys(names: list[str]) -> frozenset[str]:
    """The keys of the named secrets, as the session would see them; an unknown name is an error."""
    async with client() as api:
        listing = await api.list_secrets()
    by_name = {s.name: s for s in listing.secrets}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CliError(f"no secret named {unknown[0]} (orz cloud secrets list shows yours)")
    return frozenset(key for n in names for key in by_name[n].keys)


for _command in [*cloud_sessions.COMMANDS, *cloud_watch.COMMANDS, *cloud_proxy.COMMANDS,
                 *cloud_automation.COMMANDS]:
    cloud.add_command(_command)
cloud.add_command(cloud_secrets.secrets)
