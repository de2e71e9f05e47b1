"""`orz cloud`: what users type. Account commands, SSH set-up and validation live here; sessions and
secrets have their own modules."""

from __future__ import annotations

import os
from pathlib import Path

import click

from api.client import ApiClient, ApiError
from cli import attach as attaching
from cli import (
    cloud_api_tokens,
    cloud_automation,
    cloud_proxy,
    cloud_replay,
    cloud_secrets,
    cloud_sessions,
    cloud_token,
    cloud_watch,
    cloud_webhooks,
    keys,
    known_hosts,
    output,
    ssh_config,
)
from cli.cloud_yaml_check import load_validator, secret_keys
from cli.config import (
    DEFAULT_API_URL,
    Credentials,
    cleartext_problem,
    forget_credentials,
    load_credentials,
    token_path,
)
from cli.connect import CliApiClient, check_api_url, client, cloud_command, one_line
from cli.errors import EXIT_NOT_FOUND, EXIT_USAGE, CliError, exit_code_for, shown
from cli.login import DeviceLogin, TokenLogin, login


@click.group("cloud")
def cloud() -> None:
    """Your sessions: AI coding agents in cloud tmux sessions you attach to over SSH."""


def _default_api_url() -> str:
    try:
        saved = load_credentials()
    except ValueError:
        saved = None
    return os.environ.get("ORZBOB_API_URL") or (saved.api_url if saved else DEFAULT_API_URL)


# Sign-in refusals that end with "sign in again later": the person will run the login command again.
RETRY_LATER = ("approval_pending", "expired_token")


@cloud.command("login")
@click.option("--token", metavar="T", envvar="ORZBOB_TOKEN",
              help="An API token (orz_...), e.g. from orz cloud api-token create or an admin's orz admin create-token.")
@click.option("--with-token", is_flag=True,
              help="Read the token from standard input (keeps it out of shell history and ps; for CI).")
@click.option("--provider", type=click.Choice(["oidc", "github"]), default=None,
              help="The identity provider to sign in with (default: the server's first).")
@click.option("--no-browser", is_flag=True, help="Only print the sign-in URL and code; do not open a browser.")
@click.option("--api-url", metavar="U", help="The API's URL (default: ORZBOB_API_URL, the saved one, or http://127.0.0.1:8080).")
def login_cmd(token: str | None, with_token: bool, provider: str | None, no_browser: bool,
              api_url: str | None) -> None:
    """Sign in: with no token, through the server's identity provider (a code to approve in the browser);
    with --token/--with-token, check that token. The login is saved with mode 0600."""
    if with_token:
        token = click.get_text_stream("stdin").read().strip()
        if not token:
            raise CliError("--with-token read no token from standard input", EXIT_USAGE)
    _login(token, provider, no_browser, api_url)


@cloud_command
async def _login(token: str | None, provider: str | None, no_browser: bool, api_url: str | None) -> None:
    where = "--api-url" if api_url else "ORZBOB_API_URL" if os.environ.get("ORZBOB_API_URL") else "the saved API URL"
    url = check_api_url(api_url or _default_api_url(), where)
    if problem := cleartext_problem(url):
        click.echo(f"orz: warning: {problem}", err=True)
    flow: TokenLogin | DeviceLogin = TokenLogin(token) if token else DeviceLogin(provider, open_browser=not no_browser)
    try:
        creds, me = await login(flow, url)
    except ApiError as exc:
        if exc.code in RETRY_LATER and url != _default_api_url().rstrip("/"):
            # Nothing was saved, so a bare `orz cloud login` next time would ask another server (the
            # default one): say which command gets this one.
            raise CliError(f"{one_line(exc.detail)}; then: orz cloud login --api-url {url}",
                           exit_code_for(exc.status)) from None
        if exc.status == 401 and token:
            # Not "the API refused your token; run orz cloud login": this is that login, with this token.
            raise CliError(f"the API at {url} refused this token ({one_line(exc.detail)}); nothing was saved",
                           exit_code_for(exc.status)) from None
        raise
    via = f" via {creds.source}" if creds.source and creds.source != "token" else ""
    click.echo(f"logged in to {creds.api_url} as {me.user.email}{via} (org {me.org.name}, {me.org.plan} plan)")
    click.echo(f"login saved in {token_path()}", err=True)


@cloud.command("logout")
@cloud_command
async def logout() -> None:
    """Log out: revoke the token (and its refresh token) on the server, then forget it here."""
    try:
        saved = load_credentials()
    except ValueError:
        saved = None
    if saved is not None:
        try:
            await _revoke(saved)
        except ApiError as exc:
            if exc.status != 401:  # a revoked (or expired admin-minted) token has nothing left to revoke
                click.echo(f"orz: warning: the server did not revoke the token ({exc.detail}); "
                           "it is forgotten here", err=True)
    if forget_credentials():
        click.echo(f"logged out (removed {token_path()})")
    else:
        click.echo("not logged in")


async def _revoke(saved: Credentials) -> None:
    """Revoke the saved login on the server. An expired sign-in token is renewed first: its refresh token
    stays valid on the server until revoked, and only a valid API token may revoke its sign-in."""
    try:
        async with CliApiClient(saved) as api:
            await api.revoke()
            return
    except CliError:
        pass  # the refresh token is spent or revoked; the API token may still be good
    async with ApiClient(saved.api_url, saved.api_token) as plain:
        await plain.revoke()


@cloud.command("whoami")
@click.option("--json", "as_json", is_flag=True, help="Print the API's Me object as JSON.")
@cloud_command
async def whoami(as_json: bool) -> None:
    """Who you are logged in as, how (identity source), your org, plan and quota use."""
    async with client() as api:
        me = await api.me()
        url = api.base_url
    if as_json:
        click.echo(output.to_json(me))
        return
    admin = ", org admin" if me.user.is_admin else ""
    via = f"sign-in with {me.source}"
    if me.source == "token":  # an admin minted it
        via = "an API token"
    elif me.source == "api":  # its owner did (orz cloud api-token create)
        via = "an API token of your own"
    click.echo(f"{me.user.email} (org {me.org.name}{admin}) at {url}, via {via}")
    click.echo(output.quota_line(me.quota))
    if limits := output.limits_line(me.org):
        click.echo(limits)


@cloud.command("known-hosts")
@cloud_command
async def known_hosts_cmd() -> None:
    """Print the gateway's host key as known_hosts lines, as the API vouches for it (for ~/.ssh/known_hosts)."""
    async with client() as api:
        me = await api.me()
    if me.gateway is None or not me.gateway.host_keys:
        raise CliError("this server does not publish its gateway's host key (an older server, or one whose "
                       "admin has not set ORZ_GATEWAY_HOST_PUBLIC_KEY); check the key ssh shows against the "
                       "fingerprint your admin publishes")
    for line in known_hosts.lines_for(me.gateway.ssh_host, me.gateway.ssh_port, me.gateway.host_keys):
        click.echo(line)


@cloud.command("ssh-config")
@click.option("--write", is_flag=True, help="Write ~/.config/orzbob/ssh_config and Include it from ~/.ssh/config.")
@click.option("--remove", is_flag=True,
              help="Undo --write: take the Include out of ~/.ssh/config and delete the generated files.")
@click.option("--dry-run", is_flag=True, help="With --write or --remove: say what would change, change nothing.")
@click.option("--websocket", is_flag=True,
              help="Reach the gateway over its WebSocket door (ProxyCommand orz cloud proxy), for networks "
                   "where only HTTPS gets through.")
def ssh_config_cmd(write: bool, remove: bool, dry_run: bool, websocket: bool) -> None:
    """Set up plain `ssh <id>.orz` (and VS Code Remote-SSH) with self-refreshing certificates."""
    if write and remove:
        raise click.UsageError("--write and --remove do opposite things; give one")
    if dry_run and not (write or remove):
        raise click.UsageError("--dry-run goes with --write or --remove (without them nothing is written anyway)")
    try:
        if remove:
            _remove_ssh_config(dry_run)
        elif write:
            _write_ssh_config(websocket, dry_run)
        else:
            click.echo(ssh_config.render_main_config(websocket=websocket), nl=False)
            click.echo(f"# Save as {ssh_config.orz_ssh_config_path()} and add at the top of ~/.ssh/config:",
                       err=True)
            click.echo(f"#   Include {ssh_config.orz_ssh_config_path()}   (or run with --write)", err=True)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None


def _write_ssh_config(websocket: bool, dry_run: bool) -> None:
    target = ssh_config.orz_ssh_config_path()
    user_config = ssh_config.user_ssh_config_path()
    if dry_run:
        click.echo(f"would write {target}:")
        click.echo(ssh_config.render_main_config(websocket=websocket), nl=False)
        if ssh_config.with_include(ssh_config.read_user_config(user_config), target) is None:
            click.echo(f"{user_config} already includes it")
        else:
            click.echo(f"would add at the top of {user_config}:")
            click.echo(ssh_config.include_block(target), nl=False)
        return
    keys.ensure_key_pair()  # the config names it; make it now rather than on the first connection
    target = ssh_config.write_main_config(websocket=websocket)
    changed = ssh_config.install_include(user_config, target)
    click.echo(f"wrote {target}")
    click.echo(f"{'added an Include to' if changed else 'already included from'} {user_config}")
    click.echo(f"now: ssh <session-id>{ssh_config.HOST_SUFFIX}   (undo with: orz cloud ssh-config --remove)")


def _remove_ssh_config(dry_run: bool) -> None:
    user_config = ssh_config.user_ssh_config_path()
    files = ssh_config.generated_files()
    included = ssh_config.without_include(ssh_config.read_user_config(user_config)) is not None
    would = "would " if dry_run else ""
    if not included and not files:
        click.echo("nothing to remove: ssh-config --write was not run (or was undone)")
        return
    if included:
        if not dry_run:
            ssh_config.remove_include(user_config)
        click.echo(f"{would}remove the Orzbob Cloud Include block from {user_config} (the rest stays as it is)")
    for path in files:
        if not dry_run:
            path.unlink(missing_ok=True)
        click.echo(f"{would}delete {path}")
    if not dry_run:
        click.echo(f"ssh <session-id>{ssh_config.HOST_SUFFIX} no longer works; orz cloud attach still does")


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
    validator = load_validator()
    if validator is None:
        raise CliError("validate needs the runner package (runner.cloud_config), "
                       "which this installation does not include")
    return validator


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
    # Where sessions run is the server's business, not the file's: say what a local-provider server refuses.
    for problem in validator.local_provider_problems(config):
        click.echo(f"orz: note: {problem}", err=True)
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
        known = {s.name for s in listing.secrets}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CliError(f"no secret named {shown(unknown[0], quote=False)} (orz cloud secrets list shows yours)",
                           EXIT_NOT_FOUND)
        return await secret_keys(api, names)


for _command in [*cloud_sessions.COMMANDS, *cloud_watch.COMMANDS, *cloud_proxy.COMMANDS,
                 *cloud_automation.COMMANDS, *cloud_token.COMMANDS, *cloud_replay.COMMANDS]:
    cloud.add_command(_command)
cloud.add_command(cloud_secrets.secrets)
cloud.add_command(cloud_webhooks.webhook)
cloud.add_command(cloud_api_tokens.api_token)
