"""`orz admin`: migrations and bootstrap of orgs, users and tokens."""

from __future__ import annotations

import asyncio

import click

from api import admin as ops
from api.db import migrate
from api.db.engine import create_engine, session_factory
from api.settings import Settings, load_settings
from cli.errors import CliError, run_async

database_option = click.option("--database-url", envvar="ORZ_DATABASE_URL", default=None,
                               help="Database URL (default: SQLite in the data dir).")


def _settings(database_url: str | None) -> Settings:
    return load_settings(database_url=database_url)


async def _with_db(settings: Settings, action):  # type: ignore[no-untyped-def]
    await migrate.ensure_at_head(settings.database_url)
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
@click.option("--revision", default="head", show_default=True, help="Target revision (e.g. -1 to step back).")
def migrate_cmd(database_url: str | None, revision: str) -> None:
    """Upgrade (or downgrade) the database schema."""
    settings = _settings(database_url)
    try:
        if revision.startswith("-") or revision == "base":
            migrate.downgrade(settings.database_url, revision)
        else:
            migrate.upgrade(settings.database_url, revision)
        current = asyncio.run(migrate.current_revision(settings.database_url))
    except Exception as exc:
        raise CliError(f"migration failed: {exc}") from None
    click.echo(f"database at revision {current or 'base'}")


migrate_cmd.name = "migrate"


@admin.command("create-org")
@database_option
@click.argument("name")
@click.option("--plan", type=click.Choice(ops.PLANS), default="free", show_default=True)
@run_async
async def create_org(database_url: str | None, name: str, plan: str) -> None:
    """Create an org on a plan."""
    org = await _with_db(_settings(database_url), lambda s: ops.create_org(s, name, plan))
    click.echo(f"created org {org.name} ({org.plan})")


@admin.command("set-plan")
@database_option
@click.argument("name")
@click.argument("plan", type=click.Choice(ops.PLANS))
@run_async
async def set_plan(database_url: str | None, name: str, plan: str) -> None:
    """Move an org to another plan."""
    org = await _with_db(_settings(database_url), lambda s: ops.set_plan(s, name, plan))
    click.echo(f"org {org.name} is now on {org.plan}")


@admin.command("create-user")
@database_option
@click.argument("email")
@click.option("--org", "org_name", required=True, help="The org the user belongs to.")
@click.option("--admin", "is_admin", is_flag=True, help="Org admin: may attach to the org's sessions.")
@run_async
async def create_user(database_url: str | None, email: str, org_name: str, is_admin: bool) -> None:
    """Create a user in an org."""
    user = await _with_db(_settings(database_url), lambda s: ops.create_user(s, email, org_name, is_admin=is_admin))
    click.echo(f"created user {user.email}")


@admin.command("disable-user")
@database_option
@click.argument("email")
@run_async
async def disable_user(database_url: str | None, email: str) -> None:
    """Disable a user: tokens, certificates and attach tokens stop working at once."""
    user = await _with_db(_settings(database_url), lambda s: ops.set_user_active(s, email, False))
    click.echo(f"disabled {user.email}")


@admin.command("enable-user")
@database_option
@click.argument("email")
@run_async
async def enable_user(database_url: str | None, email: str) -> None:
    """Enable a disabled user again."""
    user = await _with_db(_settings(database_url), lambda s: ops.set_user_active(s, email, True))
    click.echo(f"enabled {user.email}")


@admin.command("create-token")
@database_option
@click.argument("email")
@click.option("--name", default="default", show_default=True, help="A label for the token.")
@run_async
async def create_token(database_url: str | None, email: str, name: str) -> None:
    """Mint an API token for a user. It is printed once and cannot be shown again."""
    token = await _with_db(_settings(database_url), lambda s: ops.create_token(s, email, name))
    click.echo(token)
