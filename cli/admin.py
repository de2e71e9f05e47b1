"""`orz admin`: migrations and bootstrap of orgs, users and tokens."""

from __future__ import annotations

import asyncio
import sys

import click
import sqlalchemy
import sqlalchemy.exc

from api import admin as ops
from api import api_tokens
from api import log as orz_log
from api.credentials.secrets_box import SecretsBox
from api.credentials.secrets_keys import key_file_path, prepend_new_key
from api.db import migrate
from api.db.engine import create_engine, session_factory
from api.schemas import ROLES
from api.secrets.rotate import key_usage, rotate_all
from api.settings import Settings, load_settings
from cli.errors import CliError, run_async
from cli.output import printable

database_option = click.option("--database-url", envvar="ORZ_DATABASE_URL", default=None,
                               help="Database URL (default: SQLite in the data dir).")


def _settings(database_url: str | None) -> Settings:
    return load_settings(database_url=database_url)


async def _with_db(settings: Settings, action):  # type: ignore[no-untyped-def]
    try:
        await migrate.ensure_at_head(settings.database_url)
    except (OSError, sqlalchemy.exc.DBAPIError) as exc:
        # The first contact: a refused connection, an unknown host or database read as "[Errno 111] ..."
        # or "internal error: DBAPIError" without saying it was the database (password left out).
        where = sqlalchemy.make_url(settings.database_url).render_as_string(hide_password=True)
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        raise CliError(f"cannot use the database at {where}: {reason} "
                       "(--database-url or ORZ_DATABASE_URL)") from None
    engine = create_engine(settings.database_url)
    try:
        return await action(session_factory(engine))
    finally:
        await engine.dispose()


@click.group()
def admin() -> None:
    """Operate the control plane: migrations, orgs, users, tokens."""


@admin.command()
@database_option
@click.option("--revision", default="head", show_default=True,
              help="Target revision: head, an older one to roll back to, -1 to step back, base.")
@click.option("--wait", "wait_s", type=float, default=None,
              help="Seconds to wait for the database to answer (ORZ_DB_WAIT_S, default 120).")
def migrate_cmd(database_url: str | None, revision: str, wait_s: float | None) -> None:
    """Upgrade (or roll back) the database schema; safe to run from several places at once.

    Waits for the database, takes a lock (PostgreSQL) so concurrent runs take turns, and does nothing
    when the schema is already at this version's head or ahead of it and compatible."""
    settings = _settings(database_url)
    # On a terminal our own few lines (waiting for the database, for another run's lock) read as sentences;
    # a job's log collector gets them in the configured format. Alembic's own are replaced by the lines below.
    orz_log.configure(settings.log_level, settings.log_json and not sys.stderr.isatty())
    try:
        result = asyncio.run(migrate.migrate(settings.database_url, revision=revision,
                                             wait_s=settings.db_wait_s if wait_s is None else wait_s))
    except migrate.MigrationError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:
        raise CliError(f"migration failed: {exc}") from None
    if result.action == "ahead":
        head = migrate.head_revision(settings.database_url)
        click.echo(f"database at revision {result.after}, ahead of this version's {head} and compatible "
                   "with it: nothing to do")
    elif not result.steps:
        click.echo(f"database at revision {result.after or 'base'}: already up to date")
    else:
        for step in result.steps:
            verb = "rolled back" if step.rolled_back else "applied"
            click.echo(f"{verb} {step.revision}" + (f": {step.doc}" if step.doc else ""))
        click.echo(f"database at revision {result.after or 'base'}")


migrate_cmd.name = "migrate"


@admin.command("create-org")
@database_option
@click.argument("name")
@click.option("--plan", type=click.Choice(ops.PLANS), default="free", show_default=True)
@run_async
async def create_org(database_url: str | None, name: str, plan: str) -> None:
    """Create an org on a plan."""
    settings = _settings(database_url)
    org = await _with_db(settings, lambda s: ops.create_org(s, name, plan))
    click.echo(f"created org {org.name} ({org.plan})")
    if settings.provider == "local" and settings.sandbox == "off":
        click.echo("warning: ORZ_SANDBOX=off: sessions are not isolated from each other or from the server's "
                   "data dir; with more than one org the server refuses to start sessions until the sandbox "
                   "is on (see docs/security.md)", err=True)


@admin.command("set-plan")
@database_option
@click.argument("name")
@click.argument("plan", type=click.Choice(ops.PLANS))
@run_async
async def set_plan(database_url: str | None, name: str, plan: str) -> None:
    """Move an org to another plan."""
    org = await _with_db(_settings(database_url), lambda s: ops.set_plan(s, name, plan))
    click.echo(f"org {org.name} is now on {org.plan}")


@admin.command("set-recording")
@database_option
@click.argument("name")
@click.argument("state", type=click.Choice(["on", "off"]))
@run_async
async def set_recording(database_url: str | None, name: str, state: str) -> None:
    """Record the org's sessions' agent panes (on, the default) or not (off).

    Off: the API stops serving the org's recordings and refuses its runners' uploads at once; runners are
    not told to record from each session's next start. Stored recordings stay until their session is deleted.
    Recordings hold whatever the agent printed, secrets included (docs/security.md#recordings)."""
    org = await _with_db(_settings(database_url), lambda s: ops.set_recording(s, name, state == "on"))
    click.echo(f"recording is now {'on' if org.recording_enabled else 'off'} for org {org.name}")


@admin.command("create-user")
@database_option
@click.argument("email")
@click.option("--org", "org_name", required=True, help="The org the user belongs to.")
@click.option("--role", type=click.Choice(ROLES), default="member", show_default=True,
              help="member: sees and manages only their own sessions; admin: all of the org's.")
@run_async
async def create_user(database_url: str | None, email: str, org_name: str, role: str) -> None:
    """Create a user in an org."""
    user = await _with_db(_settings(database_url), lambda s: ops.create_user(s, email, org_name, role=role))
    click.echo(f"created user {user.email} ({user.role})")


@admin.command("set-role")
@database_option
@click.argument("email")
@click.argument("role", type=click.Choice(ROLES))
@run_async
async def set_role(database_url: str | None, email: str, role: str) -> None:
    """Make a user an org admin (all of the org's sessions) or a member (only their own)."""
    user = await _with_db(_settings(database_url), lambda s: ops.set_role(s, email, role))
    click.echo(f"{user.email} is now {user.role}")


@admin.command("disable-user")
@database_option
@click.argument("email")
@run_async
async def disable_user(database_url: str | None, email: str) -> None:
    """Disable a user: tokens, certificates and attach tokens stop working at once, and their API tokens
    and sign-ins are revoked for good (enable-user does not bring them back)."""
    user = await _with_db(_settings(database_url), lambda s: ops.set_user_active(s, email, False))
    click.echo(f"disabled {user.email}; their API tokens and sign-ins are revoked")


@admin.command("enable-user")
@database_option
@click.argument("email")
@run_async
async def enable_user(database_url: str | None, email: str) -> None:
    """Enable a disabled user again. Their tokens from before the disable stay revoked: they sign in again
    (orz cloud login) or use a token from orz admin create-token."""
    user = await _with_db(_settings(database_url), lambda s: ops.set_user_active(s, email, True))
    click.echo(f"enabled {user.email}: they sign in again or use a token from orz admin create-token")


@admin.command("approve")
@database_option
@click.argument("email")
@run_async
async def approve(database_url: str | None, email: str) -> None:
    """Let in a person whose first sign-in waits for approval (ORZ_SIGNIN_NEW_USERS=pending)."""
    user = await _with_db(_settings(database_url), lambda s: ops.approve_user(s, email))
    click.echo(f"approved {user.email}: their next orz cloud login signs them in")


@admin.command("pending")
@database_option
@run_async
async def pending(database_url: str | None) -> None:
    """People whose first sign-in waits for `orz admin approve`."""
    users = await _with_db(_settings(database_url), ops.pending_users)
    for user in users:
        click.echo(f"{user.email}\t{user.created_at:%Y-%m-%d %H:%M}")
    if not users:
        click.echo("nobody is waiting for approval", err=True)


@admin.command("create-token")
@database_option
@click.argument("email")
@click.option("--name", default="default", show_default=True, help="A label for the token.")
@run_async
async def create_token(database_url: str | None, email: str, name: str) -> None:
    """Mint an API token for a user. It is printed once and cannot be shown again."""
    token = await _with_db(_settings(database_url), lambda s: ops.create_token(s, email, name))
    click.echo(token)


@admin.command("rotate-secrets-key")
@database_option
@click.option("--generate", is_flag=True,
              help="First put a newly generated key in front of the key file (keys held in a file only).")
@run_async
async def rotate_secrets_key(database_url: str | None, generate: bool) -> None:
    """Re-encrypt every stored secret under the current (first) secrets key, while the API keeps serving.

    With ORZ_SECRETS_KEY: put the new key first (new:...,old:...), roll that out to every replica,
    run this, then drop the old entry once it is no longer listed as in use.
    """
    settings = _settings(database_url)
    if generate:
        path = key_file_path(settings)
        if path is None:
            raise CliError("--generate needs the keys in a file; with ORZ_SECRETS_KEY put the new key first "
                           "(new:...,old:...), roll it out, then run this without --generate")
        if not path.exists():
            raise CliError(f"no secrets key file at {path}: there is nothing to rotate from")
        click.echo(f"added key {prepend_new_key(path)} in front of {path}")
    box = SecretsBox.from_settings(settings)
    report = await _with_db(settings, lambda s: rotate_all(s, box))
    usage = await _with_db(settings, key_usage)
    click.echo(f"{report.rotated} secrets re-encrypted under key {report.key_id}")
    old = {kid: n for kid, n in usage.items() if kid != report.key_id}
    if old:
        click.echo("still under older keys: " + ", ".join(f"{kid} ({n})" for kid, n in sorted(old.items())))
    else:
        click.echo("no secret uses an older key: older keys may be removed from the configuration")
    if report.failed:
        for secret_id, why in report.failed:
            click.echo(f"  {secret_id}: {why}", err=True)
        raise CliError(f"{len(report.failed)} secrets could not be re-encrypted; they keep their old key")


@admin.command("list-tokens")
@database_option
@click.argument("email")
@run_async
async def list_tokens(database_url: str | None, email: str) -> None:
    """A user's API tokens that still work: id, prefix, name, where from, created, last used, expiry."""
    rows = await _with_db(_settings(database_url), lambda s: api_tokens.tokens_of(s, email))
    for row in rows:
        used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never used"
        expires = f"expires {row.expires_at:%Y-%m-%d}" if row.expires_at else "no expiry"
        click.echo(f"{row.id}\t{row.prefix}\t{printable(row.name)}\t{row.source or 'admin'}\t"
                   f"{row.created_at:%Y-%m-%d %H:%M}\t{used}\t{expires}")
    if not rows:
        click.echo(f"{email} has no working API tokens", err=True)


@admin.command("revoke-token")
@database_option
@click.argument("token_id", metavar="ID_OR_PREFIX")
@run_async
async def revoke_token(database_url: str | None, token_id: str) -> None:
    """Revoke one API token of any user (and its sign-in); the API stops taking it within ORZ_AUTH_CACHE_TTL_S."""
    row, email = await _with_db(_settings(database_url), lambda s: api_tokens.revoke_any(s, token_id))
    click.echo(f"revoked {row.prefix}... ({row.id}, {printable(row.name)}) of {email}")
