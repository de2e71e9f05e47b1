"""`orz server`: the embedded default. API, gateway, scheduler and local sessions in one process tree."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from pydantic import SecretStr

from api import admin
from api.app import create_app, create_metrics_app
from api.db import migrate
from api.serve import ApiServer, api_connection_cap
from api.settings import Settings
from cli.config import Credentials, load_credentials, save_credentials, token_path
from cli.errors import CliError
from cli.server_log import session_event

log = logging.getLogger(__name__)
# Sessions the server stopped on its way down carry this reason and are started again on the next start.
SHUTDOWN_REASON = "orz server stopped"


@dataclass
class RunningServer:
    settings: Settings
    api_port: int
    ssh_port: int | None
    token_file: Path
    new_token: bool
    resumed: list[str] = field(default_factory=list)
    metrics_port: int | None = None

    def banner(self, log_file: Path | None = None) -> str:
        lines = [
            f"Orzbob Cloud is running (data in {self.settings.data_dir}).",
            f"  API  {self.settings.public_api_url}",
        ]
        if self.ssh_port:
            lines.append(f"  SSH  {self.settings.public_ssh_host} port {self.ssh_port}")
            lines.append(f"  Web  {web_base(self.settings)}/s/<session-id>   (browser terminal, SSH over WebSocket)")
        if self.metrics_port:
            lines.append(f"  Metrics  http://{_client_host(self.settings.api_host)}:{self.metrics_port}/metrics")
        lines.append(f"  CLI login saved in {self.token_file}" + (" (new admin token)" if self.new_token else ""))
        if log_file is not None:
            lines.append(f"  Logs {log_file}   (here: one line per session change, warnings and errors)")
        if self.resumed:
            lines.append(f"  Resumed {len(self.resumed)} session(s): {', '.join(self.resumed)}")
        lines += ["", "Next, in another terminal:"]
        path_step = path_hint()
        if path_step:
            lines.append(path_step)
        lines += [
            "  orz cloud new --repo <git-url> --branch main    # start a session and attach",
            "  orz cloud list                                  # your sessions",
            "  orz cloud attach <session-id>                   # attach again later",
            "",
            "Press Ctrl-C to stop; running sessions resume on the next start.",
        ]
        return "\n".join(lines)


def path_hint(path_env: str | None = None) -> str | None:
    """The `export PATH=...` step when the `orz` beside this interpreter is not what the shell finds."""
    here = Path(sys.executable).parent
    found = shutil.which("orz", path=path_env if path_env is not None else os.environ.get("PATH", ""))
    if not (here / "orz").exists() or (found and Path(found).parent.resolve() == here.resolve()):
        return None
    return f'  export PATH="{here}:$PATH"   # once per terminal: puts orz on your PATH'


# The ports `orz server` listens on: the setting, its flag and its environment variable.
PORTS = (("api_port", "API", "--api-port", "ORZ_API_PORT"),
         ("ssh_port", "SSH gateway", "--ssh-port", "ORZ_SSH_PORT"),
         ("gateway_web_port", "browser terminal", "--web-port", "ORZ_GATEWAY_WEB_PORT"),
         ("api_metrics_port", "metrics", None, "ORZ_API_METRICS_PORT"))


def check_ports(settings: Settings) -> None:
    """Before anything starts: a port already taken is named with the flag and variable that change it."""
    taken = []
    ours = {getattr(settings, field_name) for field_name, *_ in PORTS}
    for field_name, what, flag, env in PORTS:
        port = getattr(settings, field_name)
        host = settings.ssh_host if field_name == "ssh_port" else (
            settings.gateway_web_host if field_name == "gateway_web_port" else settings.api_host)
        if port and not _can_listen(host, port):
            how = f"{flag} PORT or {env}=PORT" if flag else f"{env}=PORT"
            free = _free_port_after(host, port, ours)
            example = f"make dev ARGS='{flag} {free}'" if flag else f"{env}={free} make dev"
            taken.append(f"port {port} ({what}) on {host} is already in use; choose another with {how} "
                         f"(e.g. {example})")
    if taken:
        raise CliError("; ".join(taken))


def _free_port_after(host: str, port: int, ours: set[int]) -> int:
    """The first port after ``port`` that is free now and not another of this server's (suggesting port + 1
    named the server's own SSH port when its API port was taken: `--api-port 18731 --ssh-port 18732`)."""
    for candidate in range(port + 1, min(port + 100, 65535) + 1):
        if candidate not in ours and _can_listen(host, candidate):
            return candidate
    return 0  # none near it: 0 is any free port, which `orz server` then prints


def _can_listen(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
            sock.bind((host, port))
            sock.listen(1)
    except OSError as exc:
        return exc.errno not in (errno.EADDRINUSE, errno.EACCES)
    return True


def _secret_file(path: Path, make: Any) -> str:
    """Read a secret kept in the data dir, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def ensure_ed25519_key(path: Path) -> str:
    """Create an Ed25519 key pair at path / path.pub unless present; return the public key line."""
    pub = Path(f"{path}.pub")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="orz-gateway")
        key.write_private_key(str(path))
        os.chmod(path, 0o600)
        key.write_public_key(str(pub))
    return pub.read_text().strip()


def embedded_settings(settings: Settings) -> Settings:
    """Fill in what the embedded default generates for itself: service token and gateway client key."""
    keys = settings.keys_dir
    update: dict[str, Any] = {}
    if not settings.service_token.get_secret_value():
        # model_copy does not validate, so wrap it as the field's type (the gateway calls get_secret_value).
        update["service_token"] = SecretStr(_secret_file(keys / "service_token", lambda: secrets.token_urlsafe(32)))
    client_key = settings.gateway_client_key_file or keys / "gateway_client_ed25519"
    update["gateway_client_key_file"] = client_key
    if not settings.gateway_public_key:
        update["gateway_public_key"] = ensure_ed25519_key(client_key)
    return settings.model_copy(update=update)


@contextlib.asynccontextmanager
async def run_server(settings: Settings) -> AsyncIterator[RunningServer]:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings = embedded_settings(settings)
    # Records which versions may run on the schema too, so going back to an older `orz` works when
    # the newer one only added to it.
    await migrate.migrate(settings.database_url, wait_s=settings.db_wait_s)

    app = create_app(settings)
    api = await ApiServer.start(app, settings.api_host, settings.api_port, cap=api_connection_cap(settings))
    if settings.api_port == 0:
        url = f"http://{_client_host(settings.api_host)}:{api.port}"
        bound_url: dict[str, Any] = {"api_port": api.port, "public_api_url": url}
        if settings.internal_api_url == settings.public_api_url:  # not set apart: it follows the port too
            bound_url["internal_api_url"] = url
        settings = settings.model_copy(update=bound_url)
    state = app.ctx.state
    state.settings = settings
    state.instances.settings = settings
    state.instances.on_transition.append(session_event)

    stack = contextlib.AsyncExitStack()
    try:
        metrics_port = None
        if settings.api_metrics_port:
            # Not on the API's port: on a listener of its own (ORZ_API_METRICS_PORT), as `orz api` does.
            metrics = await ApiServer.start(create_metrics_app(app), settings.api_host, settings.api_metrics_port)
            stack.push_async_callback(metrics.stop)
            metrics_port = metrics.port
        token_file, new_token = await _ensure_login(state.sessions, settings)
        ssh_port, web_port = await stack.enter_async_context(_gateway(settings))
        if ssh_port:
            # One process, one scrape: the API's metrics also show the embedded gateway's.
            from gateway import metrics as gateway_metrics

            app.ctx.extra_metrics.append(gateway_metrics.REGISTRY)
        bound: dict[str, Any] = {}
        # Asked for any free port: the ssh lines and attach URLs the API shows must name the ones we got.
        if ssh_port and settings.ssh_port == 0:
            bound.update(ssh_port=ssh_port, public_ssh_port=ssh_port)
        if web_port is not None and settings.gateway_web_port == 0:
            bound.update(gateway_web_port=web_port)
        if bound:
            settings = settings.model_copy(update=bound)
            state.settings = state.instances.settings = settings
        # The scheduler shares the API's provider: one set of watches and pid files, one view of compute.
        await stack.enter_async_context(_scheduler(settings, state.provider, state.instances.secret_env))
        resumed = await state.instances.resume_after_shutdown(SHUTDOWN_REASON)
        yield RunningServer(settings, api.port, ssh_port, token_file, new_token, resumed, metrics_port)
    finally:
        try:
            await state.instances.suspend_for_shutdown(SHUTDOWN_REASON)
        finally:
            await stack.aclose()
            await api.stop()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104  # nosec B104  # compares, binds nothing


async def _ensure_login(sessions: Any, settings: Settings) -> tuple[Path, bool]:
    """On first start create the admin org/user/token and save the CLI login; keep an existing login."""
    boot = await admin.bootstrap(sessions)
    existing = load_credentials()
    token = boot.token
    if token is None and existing is not None and existing.api_url == settings.public_api_url:
        return token_path(), False
    if token is None:
        token = await admin.create_token(sessions, boot.user.email, name="orz-server")
    save_credentials(Credentials(api_url=settings.public_api_url, api_token=token))
    return token_path(), True


@contextlib.asynccontextmanager
async def _gateway(settings: Settings) -> AsyncIterator[tuple[int, int | None]]:
    """(SSH port, web door port) of the started gateway."""
    from gateway.server import serve  # here: the other `orz` commands need not import the gateway

    async with serve(settings) as listener:
        yield listener.port, (listener.web.port if listener.web is not None else None)


def web_base(settings: Settings) -> str:
    """The browser's URL of the gateway's web door."""
    if settings.public_web_url:
        return settings.public_web_url.replace("wss://", "https://").replace("ws://", "http://").rstrip("/")
    return f"http://{_client_host(settings.gateway_web_host)}:{settings.gateway_web_port}"


@contextlib.asynccontextmanager
async def _scheduler(settings: Settings, provider: Any, secret_env: Any) -> AsyncIterator[None]:
    from api.jobs.scheduler import running_scheduler

    async with running_scheduler(settings, provider=provider, secret_env=secret_env):
        yield None
