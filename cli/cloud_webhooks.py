"""`orz cloud webhook add|list|rm|test|log`: be told in Slack (or anywhere) when an agent needs you.

The signing secret is printed once, by `add`; nothing prints it again (docs/webhooks.md).
"""

from __future__ import annotations

import click
from pydantic import ValidationError

from api import schemas
from cli import output
from cli.connect import client, cloud_command
from cli.errors import EXIT_USAGE, CliError


@click.group("webhook")
def webhook() -> None:
    """Webhooks: a signed POST to a URL when an agent needs input, goes idle, exits, or a session fails."""


@webhook.command("add")
@click.argument("url")
@click.option("--format", "fmt", type=click.Choice(["slack", "json"]), default=None,
              help="slack: a Slack incoming-webhook message; json: the event's fields. "
                   "[default: slack for hooks.slack.com URLs, else json]")
@click.option("--event", "events", multiple=True, type=click.Choice(schemas.WEBHOOK_EVENTS),
              help="An event to send (repeat for more). [default: " + ", ".join(schemas.DEFAULT_WEBHOOK_EVENTS) + "]")
@click.option("--description", help="A note for yourself (shown by list).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer, secret included.")
@cloud_command
async def add(url: str, fmt: str | None, events: tuple[str, ...], description: str | None, as_json: bool) -> None:
    """Send your sessions' events to URL (https; Slack incoming-webhook URLs work as they are)."""
    fmt = fmt or ("slack" if url.lower().startswith("https://hooks.slack.com/") else "json")
    try:
        body = schemas.WebhookCreate(url=url, format=fmt, description=description,  # type: ignore[arg-type]
                                     **({"events": list(events)} if events else {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CliError(f"invalid webhook {'.'.join(str(p) for p in err['loc'][:1])}: {err['msg']}",
                       EXIT_USAGE) from None
    async with client() as api:
        created = await api.create_webhook(body)
    if as_json:
        click.echo(output.to_json(created))
        return
    click.echo(f"webhook {created.id} added ({created.format}; events: {', '.join(created.events)})")
    click.echo(f"signing secret (shown only now; keep it to verify deliveries): {created.secret}")
    click.echo(f"send a test: orz cloud webhook test {created.id}")


@webhook.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's WebhookList (no secrets).")
@cloud_command
async def list_cmd(as_json: bool) -> None:
    """Your webhooks."""
    async with client() as api:
        listing = await api.list_webhooks()
    if as_json:
        click.echo(output.to_json(listing))
        return
    if not listing.webhooks:
        click.echo("no webhooks; add one with: orz cloud webhook add https://hooks.slack.com/services/...")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in ("ID", "FORMAT", "URL", "EVENTS", "CREATED"):
        table.add_column(column, overflow="fold" if column in ("URL", "EVENTS") else "ellipsis")
    for hook in listing.webhooks:
        table.add_row(hook.id, hook.format, hook.url, ", ".join(hook.events), output.relative(hook.created_at))
    output.print_table(table)


@webhook.command("rm")
@click.argument("webhook_id", metavar="ID")
@cloud_command
async def rm(webhook_id: str) -> None:
    """Delete a webhook (deliveries not yet sent are dropped)."""
    async with client() as api:
        await api.delete_webhook(webhook_id)
    click.echo(f"webhook {webhook_id} deleted")


@webhook.command("test")
@click.argument("webhook_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the API's WebhookDelivery.")
@cloud_command
async def test(webhook_id: str, as_json: bool) -> None:
    """Send a test delivery now; fails (exit 1) unless the receiver answered 2xx."""
    async with client() as api:
        delivery = await api.test_webhook(webhook_id)
    if as_json:
        click.echo(output.to_json(delivery))
    if delivery.state != "delivered":
        retry = " (retried later with backoff)" if delivery.state == "pending" else ""
        raise CliError(f"test delivery {delivery.id} not delivered{retry}: {delivery.error or 'no answer'}")
    if not as_json:
        click.echo(f"delivered: the receiver answered {delivery.status_code}")


@webhook.command("log")
@click.argument("webhook_id", metavar="ID")
@click.option("--limit", metavar="N", type=click.IntRange(1, 200), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the API's WebhookDeliveryList.")
@cloud_command
async def log(webhook_id: str, limit: int, as_json: bool) -> None:
    """The webhook's latest deliveries: event, state, attempts, last answer or error."""
    async with client() as api:
        listing = await api.webhook_deliveries(webhook_id, limit)
    if as_json:
        click.echo(output.to_json(listing))
        return
    if not listing.deliveries:
        click.echo(f"no deliveries yet; send one with: orz cloud webhook test {webhook_id}")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in ("WHEN", "EVENT", "SESSION", "STATE", "ATTEMPTS", "LAST"):
        table.add_column(column, overflow="fold" if column == "LAST" else "ellipsis")
    for d in listing.deliveries:
        last = str(d.status_code) if d.status_code is not None else ""
        if d.error:
            last = f"{last} {output.printable(d.error)}".strip()
        table.add_row(output.relative(d.created_at), d.event, d.session_id or "-", d.state, str(d.attempts), last)
    output.print_table(table)
