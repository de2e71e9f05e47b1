"""`orz cloud proxy HOST`: ssh's ProxyCommand that carries the SSH connection over the gateway's WebSocket
door (for networks where only HTTPS gets through), and `orz cloud web ID`: the browser terminal's URL."""

from __future__ import annotations

import contextlib
import os
import threading
from urllib.parse import urlsplit, urlunsplit

import click
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from api import schemas
from cli import attach as attaching
from cli import known_hosts, ssh_config
from cli.completion import complete_session_ids
from cli.connect import client, cloud_command
from cli.errors import CliError

CHUNK = 64 * 1024
OPEN_TIMEOUT_S = 20


def session_from_target(target: str) -> str:
    """`%n`, `%h` or `%r@%h` as ssh expands them: `<id>.orz`, `<id>`, `<id>@host` all name the session."""
    if "@" in target:
        target = target.split("@", 1)[0]
    return attaching.check_session_id(ssh_config.session_from_host(target))


def tunnel_url(attach_url: str) -> str:
    """The SSH endpoint beside the attach endpoint the API named (same host, same token)."""
    parts = urlsplit(attach_url)
    if not parts.path.endswith("/attach") or parts.scheme not in ("ws", "wss"):
        raise CliError(f"unexpected attach URL from the API: {parts.scheme}://{parts.netloc}{parts.path}")
    return urlunsplit(parts._replace(path=parts.path.removesuffix("/attach") + "/ssh"))


@cloud_command
async def _grant(session_id: str) -> schemas.AttachGrant:
    async with client() as api:
        return await api.attach(session_id, schemas.AttachRequest())


def _open(url: str) -> ClientConnection:
    try:
        return connect(url, open_timeout=OPEN_TIMEOUT_S, compression=None, max_size=None)
    except InvalidStatus as exc:
        reason = exc.response.body.decode("utf-8", "replace").strip().removeprefix("orz: ")
        raise CliError(reason or f"the gateway refused the WebSocket ({exc.response.status_code})") from None
    except (OSError, TimeoutError, InvalidURI, WebSocketException) as exc:
        where = urlsplit(url).netloc
        raise CliError(f"cannot reach the gateway's web door at {where}: {exc}") from None


def _stdin_to_ws(ws: ClientConnection) -> None:
    try:
        while data := os.read(0, CHUNK):
            ws.send(data)
    except (OSError, ConnectionClosed):
        pass
    finally:
        ws.close()  # ssh closed our stdin: the connection is over


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(ws: ClientConnection) -> None:
    """stdin -> binary frames, binary frames -> stdout, until either side closes."""
    threading.Thread(target=_stdin_to_ws, args=(ws,), daemon=True, name="stdin").start()
    with contextlib.suppress(ConnectionClosed, BrokenPipeError):
        for message in ws:
            if isinstance(message, bytes):
                _write_all(1, message)
    ws.close()


def pin_gateway_key(target: str, grant: schemas.AttachGrant) -> None:
    """Pin the API's gateway key before ssh checks it: under the gateway's own name, and for `%r@%h` also
    under the host ssh was given (port 22), which is the name ssh looks up for a one-off
    `ssh -o ProxyCommand='orz cloud proxy %r@%h' <id>@host`. Whatever that host is, these bytes go to the
    API's gateway, so the API's key is the one to expect there."""
    path = ssh_config.known_hosts_path()
    known_hosts.pin(path, grant.ssh_host, grant.ssh_port, grant.host_keys)
    typed = target.split("@", 1)[1] if "@" in target else ""
    if typed and ssh_config.is_ssh_host(typed):
        known_hosts.pin(path, typed, 22, grant.host_keys)


@click.command("proxy", hidden=True)
@click.argument("host")
def proxy(host: str) -> None:
    """For ssh's ProxyCommand (`orz cloud proxy %n`): SSH to a session over wss when the SSH port is blocked.

    HOST is <id>.orz (%n), <id> or <id>@host (%r@%h); the gateway's host key is pinned first."""
    session_id = session_from_target(host)
    grant = _grant(session_id)
    pin_gateway_key(host, grant)
    ws = _open(tunnel_url(grant.attach_url))
    relay(ws)


@click.command("web")
@click.argument("session_id", metavar="ID", callback=lambda _c, _p, v: attaching.check_session_id(v),
                shell_complete=complete_session_ids)
@click.option("--readonly", is_flag=True, help="Watch without typing.")
def web(session_id: str, readonly: bool) -> None:
    """Print a browser terminal link for a session (one-time: its token works once, for 2 minutes)."""
    grant = _web_grant(session_id, readonly)
    parts = urlsplit(grant.attach_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    query = "?ro=1" if readonly else ""
    # The token rides in the fragment, which browsers never send to a server or put in a Referer.
    click.echo(f"{scheme}://{parts.netloc}/s/{session_id}{query}#token={grant.token}")


@cloud_command
async def _web_grant(session_id: str, readonly: bool) -> schemas.AttachGrant:
    async with client() as api:
        return await api.attach(session_id, schemas.AttachRequest(readonly=readonly))


COMMANDS = [proxy, web]
