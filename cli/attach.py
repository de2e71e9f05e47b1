"""Attaching: get a certificate for the user's key from the API, then run the system `ssh` (again after a
gateway restart: cli/reconnect.py)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from api import schemas
from api.client import ApiClient
from cli import keys, known_hosts, reconnect, ssh_config
from cli.errors import EXIT_USAGE, CliError, shown

_ATTACH_PATH = re.compile(r"^(?:/.*)?/v1/instances/([^/]+)/attach/?$")


def check_session_id(session_id: str) -> str:
    if not schemas.SESSION_ID_RE.match(session_id):
        raise CliError(f"not a session id: {shown(session_id)} (ids are a-z, 0-9 and '-', at most 32 characters)",
                       EXIT_USAGE)
    return session_id


def session_from_id_or_url(value: str) -> str:
    """A session id, or the id in an attach URL (``http(s)://`` or ``ws(s)://host/v1/instances/<id>/attach``),
    as the Go CLI's ``attach`` took either. The URL's token is not needed: we attach with a certificate."""
    if "://" not in value:
        return check_session_id(value)
    parts = urlsplit(value)
    match = _ATTACH_PATH.match(parts.path)
    if parts.scheme not in ("http", "https", "ws", "wss") or not match:
        where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # never the query: its ?token= is a credential
        raise CliError(f"not an attach URL: {shown(where, 96, quote=False)} "
                       "(expected .../v1/instances/<session-id>/attach)", EXIT_USAGE)
    return check_session_id(match.group(1))


async def fetch_certificate(api: ApiClient, session_id: str, *, readonly: bool = False,
                            ttl_s: int | None = None) -> tuple[schemas.AttachGrant, Path]:
    """POST attach with our public key; store the certificate and the session's ssh_config block."""
    pair = keys.ensure_key_pair()
    grant = await api.attach(session_id, schemas.AttachRequest(public_key=pair.public_line(), readonly=readonly,
                                                               ttl_s=ttl_s))
    if grant.id != session_id:  # the id goes onto ssh's command line (attach_command)
        raise CliError(f"the API answered for session {grant.id[:40]!r}, not {session_id}; "
                       "is the API URL the right one (orz cloud login --api-url)?")
    ssh_config.checked_endpoint(grant.ssh_host, grant.ssh_port)  # before it reaches any file
    if not grant.certificate:
        raise CliError(f"the API gave no SSH certificate for {session_id}; is its SSH CA configured?")
    cert = keys.save_certificate(session_id, grant.certificate, readonly)
    known_hosts.pin(ssh_config.known_hosts_path(), grant.ssh_host, grant.ssh_port, grant.host_keys)
    if not readonly:
        ssh_config.write_host_file(session_id, grant.ssh_host, grant.ssh_port, cert)
    return grant, cert


def is_fresh(session_id: str) -> bool:
    """True when the session's certificate has >= 60 s left and its ssh_config block exists."""
    host_file = ssh_config.hosts_dir() / f"{session_id}.conf"
    return host_file.exists() and not keys.needs_refresh(session_id)


def attach_command(grant: schemas.AttachGrant, cert: Path) -> list[str]:
    return ssh_config.attach_argv(grant.id, grant.ssh_host, grant.ssh_port, keys.key_pair().private, cert,
                                  ssh_config.known_hosts_path())


def run_attached(session_id: str, argv: list[str], fresh_argv: Callable[[], list[str]]) -> NoReturn:
    """Run `ssh` in this terminal and exit with its status; after a gateway restart it runs again,
    through the same address, with a fresh certificate from ``fresh_argv`` (cli/reconnect.py)."""
    _check_ssh(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(reconnect.attach_until_done(session_id, argv, fresh_argv))


def _check_ssh(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise CliError(f"`{argv[0]}` not found; install an OpenSSH client (e.g. apt install openssh-client)")
    ssh_config.known_hosts_path().parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def exec_ssh(argv: list[str]) -> None:
    """Replace this process with `ssh` so the terminal belongs to it alone (no relay in between)."""
    _check_ssh(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # noqa: S606  # nosec B606  # an argv list for ssh, no shell
