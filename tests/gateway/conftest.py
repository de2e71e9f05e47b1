"""A real gateway on a free port, in front of the API and runner stand-ins, driven by real OpenSSH."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from api.credentials import jwt as attach_jwt
from api.credentials import ssh_ca
from api.settings import Settings
from gateway import keys, splice
from gateway.server import Gateway
from tests.gateway.standins import FakeApi, FakeRunner, FakeSession
from tests.support import free_port

SERVICE_TOKEN = "svc-test-token"
SESSION = "demo-1"
USER = "usr_alice"
TEAMMATE = "usr_carol"  # alice's colleague in the same org

pytestmark = pytest.mark.integration

if not shutil.which("ssh"):
    pytest.skip("OpenSSH client not installed", allow_module_level=True)


@dataclass
class SshResult:
    returncode: int
    stdout: bytes
    stderr: bytes


@dataclass
class Env:
    tmp: Path
    settings: Settings
    ca: asyncssh.SSHKey
    jwt_key: ec.EllipticCurvePrivateKey
    api: FakeApi
    runner: FakeRunner
    gateway: Gateway
    known_hosts: Path

    @property
    def port(self) -> int:
        return self.gateway.port

    def user_key(self, name: str = "id") -> Path:
        path = self.tmp / name
        if not path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519")
            key.write_private_key(path)
            path.chmod(0o600)
            key.write_public_key(path.with_suffix(".pub"))
        return path

    def certificate(self, session_id: str = SESSION, user_id: str = USER, *, ttl_s: int = 300,
                    now: float | None = None, ca: asyncssh.SSHKey | None = None, readonly: bool = False,
                    name: str = "id") -> Path:
        key = self.user_key(name)
        signed = ssh_ca.sign_user_certificate(ca or self.ca, key.with_suffix(".pub").read_text(),
                                              session_id=session_id, user_id=user_id, ttl_s=ttl_s, now=now,
                                              readonly=readonly)
        cert = self.tmp / f"{name}-cert.pub"
        cert.write_text(signed.text + "\n")
        return cert

    def token(self, session_id: str = SESSION, user_id: str = USER, **kw: object) -> str:
        return attach_jwt.issue(self.jwt_key, user_id=user_id, session_id=session_id,
                                ttl_s=int(kw.pop("ttl_s", 120)), **kw).token  # type: ignore[arg-type]

    def base_args(self, identity_agent: str = "none") -> list[str]:
        return ["ssh", "-F", "/dev/null", "-p", str(self.port),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IgnoreUnknown=ObscureKeystrokeTiming",
                "-o", "ObscureKeystrokeTiming=no", "-o", f"IdentityAgent={identity_agent}",
                "-o", "ConnectTimeout=10"]

    def cert_args(self, cert: Path | None = None, name: str = "id") -> list[str]:
        cert = cert or self.certificate(name=name)
        return ["-i", str(self.user_key(name)), "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes",
                "-o", "PreferredAuthentications=publickey", "-o", "BatchMode=yes"]

    def password_env(self, token: str) -> dict[str, str]:
        askpass = self.tmp / "askpass.sh"
        (self.tmp / "token").write_text(token)
        askpass.write_text(f"#!/bin/sh\ncat {self.tmp / 'token'}\n")
        askpass.chmod(stat.S_IRWXU)
        return {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}

    def token_args(self, method: str = "password") -> list[str]:
        return ["-o", f"PreferredAuthentications={method}", "-o", "NumberOfPasswordPrompts=1",
                "-o", "PubkeyAuthentication=no"]

    async def ssh(self, *args: str, env: dict[str, str] | None = None, stdin: bytes = b"",
                  timeout: float = 15, session_id: str = SESSION) -> SshResult:
        return await run(*self.base_args(), *args, env=env, stdin=stdin, timeout=timeout,
                         target=f"{session_id}@127.0.0.1")


async def run(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"", timeout: float = 15,
              target: str | None = None) -> SshResult:
    """Run a client binary to completion; `target` goes right after the options."""
    argv = list(args)
    if target is not None:
        split = argv.index("--") if "--" in argv else len(argv)
        argv = [*argv[:split], target, *argv[split + 1:]]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return SshResult(proc.returncode or 0, out, err)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with gateway_env(tmp_path) as built:
        yield built


@contextlib.asynccontextmanager
async def gateway_env(tmp_path: Path, client_key: asyncssh.SSHKey | None = None,
                      route: dict[str, object] | None = None, **settings_overrides: Any) -> AsyncIterator[Env]:
    """Gateway + API stand-in; the runner stand-in unless a real runner's `route` is given."""
    settings = Settings(data_dir=tmp_path / "data", ssh_port=0, gateway_web_port=0, service_token=SERVICE_TOKEN,
                        auth_fail_limit=5, auth_fail_window_s=60, gateway_metrics_port=free_port(),
                        **settings_overrides)
    ca = ssh_ca.load_or_create_ca(settings)
    jwt_key = attach_jwt.load_or_create_signing_key(settings)
    api = FakeApi(SERVICE_TOKEN, users={USER: "acme", TEAMMATE: "acme", "usr_bob": "bobs-org"},
                  auth_fail_limit=settings.auth_fail_limit, auth_fail_window_s=settings.auth_fail_window_s)
    await api.start()
    settings = settings.model_copy(update={"internal_api_url": api.url})
    key_path = keys.client_key_path(settings)
    if client_key is not None:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        client_key.write_private_key(key_path)
    client_key = keys.load_or_create(key_path, "gw")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    runner = FakeRunner(client_key, workspace)
    if route is None:
        await runner.start()
        route = runner.route
    api.sessions[SESSION] = FakeSession(owner=USER, route=route)
    gateway = Gateway(settings)
    gateway.router.poll_interval_s = 0.2
    await gateway.start()
    known_hosts = tmp_path / "known_hosts"
    host_pub = gateway.host_key.export_public_key().decode().strip()
    known_hosts.write_text(f"[127.0.0.1]:{gateway.port} {host_pub}\n")
    try:
        yield Env(tmp_path, settings, ca, jwt_key, api, runner, gateway, known_hosts)
    finally:
        await gateway.close()
        if runner.acceptor is not None:
            await runner.close()
        await api.close()


@pytest.fixture
def fast_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[splice.FastPath]]:
    """Every FastPath made in this process: the gateway's (one per client and per upstream connection), and a
    runner endpoint's (one per connection from the gateway)."""
    made: list[splice.FastPath] = []
    original = splice.FastPath.__init__

    def spy(self: splice.FastPath, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(splice.FastPath, "__init__", spy)
    yield made


async def asyncssh_client(env: Env, **options: Any) -> asyncssh.SSHClientConnection:
    """An asyncssh client with the test user's certificate, on AES-GCM (the fast path's cipher)."""
    key = asyncssh.read_private_key(env.user_key())
    cert = asyncssh.read_certificate(env.certificate())
    return await asyncssh.connect("127.0.0.1", env.port, username=SESSION, client_keys=[(key, cert)],
                                  known_hosts=str(env.known_hosts), config=None, agent_path=None,
                                  encryption_algs=["aes128-gcm@openssh.com"], **options)


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Wait until `predicate()` holds, polling; fail naming `what` after `timeout` seconds."""
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class BrowserTerminal:
    """The web door as the browser page uses it (subprotocol orz.terminal.v1): the terminal's bytes and
    the JSON control messages, in the order they came."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen = b""
        self.control: list[dict[str, Any]] = []

    async def _receive(self) -> None:
        msg = await asyncio.wait_for(self.ws.recv(), 10)
        if isinstance(msg, bytes):
            self.seen += msg
        else:
            self.control.append(json.loads(msg))

    async def until(self, marker: bytes) -> None:
        """Read until ``marker`` is on the terminal (each message within 10 s)."""
        while marker not in self.seen:
            await self._receive()

    async def until_closed(self) -> None:
        """Read until the gateway closes the WebSocket (each message within 10 s)."""
        with pytest.raises(ConnectionClosed):
            while True:
                await self._receive()


@contextlib.asynccontextmanager
async def browser_terminal(env: Env, session: str = SESSION) -> AsyncIterator[BrowserTerminal]:
    """A browser terminal attached to ``session`` through the gateway's web door, with a fresh token."""
    assert env.gateway.web is not None
    url = f"ws://127.0.0.1:{env.gateway.web.port}/v1/instances/{session}/attach?token={env.token(session)}"
    async with connect(url, subprotocols=[Subprotocol("orz.terminal.v1")]) as ws:
        yield BrowserTerminal(ws)
