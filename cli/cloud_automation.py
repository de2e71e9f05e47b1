"""`orz cloud cert` and `orz cloud agent`: credentials for automation (docs/automation.md)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import click

from api import schemas
from cli import agent, keys
from cli import attach as attaching
from cli.connect import client, cloud_command
from cli.errors import shown
from runner.reaping import reaped

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
# How long an interrupted `orz cloud agent -- COMMAND` gives its command to end after SIGTERM.
COMMAND_GRACE_S = 5.0


def _seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smh]?)", text.strip())
    if not match:
        raise click.BadParameter(f"{shown(text)}: give seconds, or a number with s, m or h (e.g. 30m)")
    return int(match[1]) * _UNITS[match[2]]


def _ttl_seconds(text: str) -> int:
    """--ttl in seconds, refused here when no server could grant it (the request model would raise)."""
    seconds = _seconds(text)
    if not schemas.CERT_TTL_MIN_S <= seconds <= schemas.CERT_TTL_MAX_S:
        raise click.BadParameter(f"{shown(text)}: a certificate lasts from {schemas.CERT_TTL_MIN_S} s to "
                                 f"{schemas.CERT_TTL_MAX_S // 3600} h (the server's cert_max_ttl_s may allow less)",
                                 param_hint="'--ttl'")
    return seconds


@click.command("cert")
@click.argument("session_id", metavar="ID")
@click.option("--ttl", metavar="DURATION",
              help="How long it lasts (e.g. 900, 30m, 2h); the server's cert_max_ttl_s is the limit.")
@click.option("--readonly", is_flag=True, help="A read-only certificate (watch, do not type).")
def cert_cmd(session_id: str, ttl: str | None, readonly: bool) -> None:
    """Fetch a certificate for session ID into a file, for a tool that can only read one.

    Prints the certificate's path, the key's and when it expires. Prefer `orz cloud agent`, which never
    runs out; an admin decides how long a certificate may last (default: 5 minutes).
    """
    ttl_s = _ttl_seconds(ttl) if ttl is not None else None
    grant, path = _fetch_cert(attaching.check_session_id(session_id), readonly, ttl_s)
    click.echo(f"certificate: {path}")
    click.echo(f"key:         {keys.key_pair().private}")
    expires = grant.certificate_expires_at
    click.echo(f"expires:     {expires.strftime('%Y-%m-%dT%H:%M:%SZ') if expires else 'unknown'}")


@cloud_command
async def _fetch_cert(session_id: str, readonly: bool, ttl_s: int | None) -> tuple[schemas.AttachGrant, Path]:
    async with client() as api:
        return await attaching.fetch_certificate(api, session_id, readonly=readonly, ttl_s=ttl_s)


@click.command("agent", context_settings={"ignore_unknown_options": True})
@click.option("-s", "--session", "sessions", multiple=True, required=True, metavar="SESSION_ID",
              help="A session to hold a certificate for (repeat for more).")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Where to listen (default: ~/.config/orzbob/agent.<pid>.sock).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def agent_cmd(sessions: tuple[str, ...], socket_path: Path | None, command: tuple[str, ...]) -> None:
    """An ssh-agent for automation: offers each session's certificate, always fresh.

    With COMMAND (after --), run it with SSH_AUTH_SOCK set and exit with its status; without, print the
    SSH_AUTH_SOCK line for a shell to eval and serve until interrupted. Ansible, Fabric, paramiko and
    OpenSSH all use the agent: no certificate file to keep fresh.
    """
    ids = [attaching.check_session_id(s) for s in sessions]
    code = _run_agent(ids, socket_path or agent.default_socket(), list(command))
    raise SystemExit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as shells say


@cloud_command
async def _run_agent(session_ids: list[str], socket_path: Path, command: list[str]) -> int:
    async def refresh(session_id: str) -> None:
        async with client() as api:
            await attaching.fetch_certificate(api, session_id)

    holder = agent.CertificateAgent(session_ids, refresh)
    await holder.prime()
    server = await agent.listen(holder, socket_path)
    try:
        if command:
            return await _run_command(command, socket_path)
        click.echo(f"SSH_AUTH_SOCK={shlex.quote(str(socket_path))}; export SSH_AUTH_SOCK;")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        return 0
    finally:
        server.close()
        agent.remove_socket(socket_path)


async def _run_command(command: list[str], socket_path: Path) -> int:
    """The command's exit status. Interrupted, it is asked to stop (SIGTERM), killed if it has not within
    COMMAND_GRACE_S, and reaped: not left running without its agent. SIGINT reaches us as asyncio.run's
    cancellation (then `Aborted!`); SIGTERM, a CI runner's or systemd's stop, would end the process at
    once and orphan the command, so it cancels the same way and we exit as killed by it (143).

    The handler is in place before the command starts: a SIGTERM that came as soon as the command had
    started (the command's first output seen) ended orz at once and left the command running. Cancelled
    while asyncio is still starting it, asyncio kills and reaps the half-started command itself."""
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        proc = await asyncio.create_subprocess_exec(*command, env={**os.environ, "SSH_AUTH_SOCK": str(socket_path)})
        return await reaped(proc, proc.wait(), grace_s=COMMAND_GRACE_S)
    except asyncio.CancelledError:
        if not terminated:
            raise
        task.uncancel()
        return -signal.SIGTERM
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


COMMANDS = [cert_cmd, agent_cmd]
