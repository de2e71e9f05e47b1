"""Sidecars for ``services:``: local PostgreSQL and Redis from the installed binaries, or pod containers.

In Kubernetes each service is a container of its image beside the runner: the runner only reports
the services (``pod_sidecars``) and waits for their ports. Locally we can only run what is installed,
so any other image is a clear error. Data lives in the session's state dir, so a stop/start keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from api.cloud_yaml import service_label
from api.schemas import SidecarSpec
from runner.cloud_config import (
    CloudConfig,
    Health,
    Service,
    image_kind,
    local_provider_problems,
    resolve_service_env,
)
from runner.errors import CloudConfigError, ServiceError
from runner.reaping import reaped
from runner.workspace import tail

log = logging.getLogger(__name__)

STARTUP_DEADLINE_S = 30.0
# Pod mode: how long init waits for the sidecars' ports (their images may still be pulling).
POD_PORTS_DEADLINE_S = 300.0
STOP_TIMEOUT_S = 10.0
# postgres will not run as root; when the runner is root, sidecars run as this user.
UNPRIVILEGED_USER = "nobody"


def _postgres_bin() -> Path | None:
    found = shutil.which("postgres")
    if found:
        # Resolve symlinks (e.g. /usr/local/bin/postgres → /usr/lib/postgresql/15/bin/postgres) so
        # initdb and createdb come from the same installation.
        bindir = Path(found).resolve().parent
        if (bindir / "initdb").exists():
            return bindir
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2] or 0)
                  if p.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if Path(d, "postgres").exists() and Path(d, "initdb").exists():
            return Path(d)
    return None


@dataclass
class _Running:
    name: str
    kind: str
    port: int
    proc: asyncio.subprocess.Process
    log_path: Path
    stop_signal: int = signal.SIGTERM


@dataclass
class ServiceManager:
    """Starts every service, waits for its health check, and stops them all on shutdown."""

    state_dir: Path
    base_env: Mapping[str, str]
    running: list[_Running] = field(default_factory=list)

    async def start_all(self, config: CloudConfig, secrets: Mapping[str, str]) -> None:
        # Every image is checked first: one that cannot run here fails the session before any other
        # service starts, with the file, line and key to fix (as the Kubernetes provider's refusals do).
        problems = local_provider_problems(config)
        if problems:
            raise ServiceError(problems[0])
        for name, service in config.services.items():
            env = resolve_service_env(config, name, secrets)
            await self.start(name, service, env, label=config.service_label(name))

    async def start(self, name: str, service: Service, env: Mapping[str, str], *, label: str | None = None) -> None:
        kind = image_kind(service.image)
        # The directory is named by the service's DNS label (`My_DB` → my-db), as its container would be.
        root = self.state_dir / "services" / (label or service_label(name))
        root.mkdir(parents=True, exist_ok=True)
        if kind == "postgres":
            running = await self._postgres(name, service, env, root)
        elif kind == "redis":
            running = await self._redis(name, service, env, root)
        else:
            raise ServiceError(
                f"service {name!r} (image {service.image}) cannot run on the local provider: "
                "only postgres and redis run locally, from their installed binaries"
            )
        self.running.append(running)
        health_env = {**self.base_env, **env, **_client_env(kind, running.port, env)}
        await self._wait_healthy(running, service.health or _default_health(kind, running.port), health_env)
        if kind == "postgres":
            await self._postgres_db(running, env, root)
        log.info("service %s (%s) is up on port %s", name, kind, running.port)

    async def stop_all(self) -> None:
        for svc in reversed(self.running):
            if svc.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    svc.proc.send_signal(svc.stop_signal)
                try:
                    await asyncio.wait_for(svc.proc.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        svc.proc.kill()
                    await svc.proc.wait()
        self.running.clear()

    # -- postgres --------------------------------------------------------------------------------

    async def _postgres(self, name: str, service: Service, env: Mapping[str, str], root: Path) -> _Running:
        bindir = _postgres_bin()
        if bindir is None:
            raise ServiceError(f"service {name!r} needs PostgreSQL, but no postgres/initdb binaries are "
                               "installed here (looked on PATH and in /usr/lib/postgresql/*/bin)")
        port = service.ports[0] if service.ports else 5432
        data, sockets = root / "data", root / "run"
        sockets.mkdir(exist_ok=True)
        prefix = self._drop_root(name, root)
        user = env.get("POSTGRES_USER", "postgres")
        password = env.get("POSTGRES_PASSWORD")
        if not (data / "PG_VERSION").exists():
            args = [str(bindir / "initdb"), "-D", str(data), "-U", user, "-E", "UTF8", "--no-locale",
                    "--auth-local=trust", f"--auth-host={'scram-sha-256' if password else 'trust'}"]
            pwfile = root / "pwfile"
            if password:
                # initdb reads the password from a file so it is never on a command line.
                pwfile.write_text(password + "\n", encoding="utf-8")
                pwfile.chmod(0o600)
                self._chown(pwfile)
                args.append(f"--pwfile={pwfile}")
            try:
                await self._check(name, "initdb", [*prefix, *args], root / "initdb.log")
            finally:
                pwfile.unlink(missing_ok=True)
        log_path = root / "service.log"
        proc = await self._spawn([*prefix, str(bindir / "postgres"), "-D", str(data), "-k", str(sockets),
                                  "-p", str(port), "-h", "localhost"], log_path)
        return _Running(name, "postgres", port, proc, log_path, stop_signal=signal.SIGINT)

    async def _postgres_db(self, svc: _Running, env: Mapping[str, str], root: Path) -> None:
        user = env.get("POSTGRES_USER", "postgres")
        db = env.get("POSTGRES_DB", user)
        bindir = _postgres_bin()
        if db == "postgres" or bindir is None:
            return
        prefix = self._drop_root(svc.name, root)
        createdb = str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb"
        proc = await asyncio.create_subprocess_exec(
            *prefix, createdb, "-h", str(root / "run"), "-p", str(svc.port), "-U", user,
            "--", db, env=self._proc_env(), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await reaped(proc, proc.communicate())
        if proc.returncode != 0 and b"already exists" not in err:
            raise ServiceError(f"service {svc.name!r}: could not create database {db!r}: "
                               f"{err.decode('utf-8', 'replace').strip()}")

    # -- redis -----------------------------------------------------------------------------------

    async def _redis(self, name: str, service: Service, env: Mapping[str, str], root: Path) -> _Running:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(f"service {name!r} needs Redis, but no redis-server binary is installed here")
        port = service.ports[0] if service.ports else 6379
        conf = root / "redis.conf"
        lines = [f"port {port}", "bind 127.0.0.1 -::1", f"dir {root}", "daemonize no", 'save ""',
                 "protected-mode yes"]
        if env.get("REDIS_PASSWORD"):
            lines.append(f"requirepass {env['REDIS_PASSWORD']}")
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        conf.chmod(0o600)
        log_path = root / "service.log"
        proc = await self._spawn([binary, str(conf)], log_path)
        return _Running(name, "redis", port, proc, log_path)

    # -- shared ----------------------------------------------------------------------------------

    def _drop_root(self, name: str, root: Path) -> list[str]:
        """The command prefix that runs a sidecar unprivileged when we are root, after chowning its dir."""
        if os.geteuid() != 0:
            return []
        setpriv = shutil.which("setpriv")
        try:
            pw = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            pw = None
        if setpriv is None or pw is None:
            raise ServiceError(f"service {name!r}: running as root and cannot switch to an unprivileged "
                               f"user (needs setpriv and user {UNPRIVILEGED_USER!r})")
        for path in [root, *root.rglob("*")]:
            self._chown(path)
        if not _can_reach(pw.pw_uid, pw.pw_gid, root):
            raise ServiceError(f"service {name!r}: running as root, and user {UNPRIVILEGED_USER!r} cannot "
                               f"reach {root} (a parent directory is not searchable)")
        return [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)

    def _proc_env(self) -> dict[str, str]:
        return {"PATH": self.base_env.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": "/"}

    async def _spawn(self, argv: list[str], log_path: Path) -> asyncio.subprocess.Process:
        with log_path.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *argv, env=self._proc_env(), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def _check(self, name: str, label: str, argv: list[str], log_path: Path) -> None:
        with log_path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self._proc_env(), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
            code = await reaped(proc, proc.wait())
        if code != 0:
            detail = tail(log_path, 500).strip()
            raise ServiceError(f"service {name!r}: {label} failed: {detail}")

    async def _wait_healthy(self, svc: _Running, health: Health, env: Mapping[str, str]) -> None:
        """Run the health command every interval until it passes; fail after retries (or 30 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(STARTUP_DEADLINE_S, health.interval * health.retries)
        failures = 0
        while True:
            if svc.proc.returncode is not None:
                raise ServiceError(f"service {svc.name!r} exited with {svc.proc.returncode}: "
                                   f"{tail(svc.log_path, 500).strip()}")
            if await _run_health(health, env):
                return
            failures += 1
            if loop.time() > deadline:
                raise ServiceError(f"service {svc.name!r} failed its health check "
                                   f"({health.command!r}) {failures} times")
            await asyncio.sleep(health.interval if failures > 1 else min(health.interval, 0.2))


def pod_sidecars(config: CloudConfig | None) -> list[SidecarSpec]:
    """The services as reported to the API in pod mode; env values keep their ``${SECRET}`` references."""
    if config is None:
        return []
    reported = []
    for name, service in config.services.items():
        try:
            reported.append(SidecarSpec(
                name=name, image=service.image, env=dict(service.env), ports=list(service.ports),
                # Only the keys we know: unknown ones were warned about and stay out of the report.
                health=service.health.model_dump(include=set(Health.model_fields)) if service.health else None,
            ))
        except ValidationError as exc:
            raise CloudConfigError([config.problem(("services", name, *err["loc"]), err["msg"])
                                    for err in exc.errors()]) from None
    return reported


async def wait_for_ports(ports: Iterable[int], timeout_s: float = POD_PORTS_DEADLINE_S) -> list[int]:
    """Wait until every port accepts connections on loopback; return those still closed at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    closed = list(ports)
    while closed:
        closed = [port for port in closed if not await _accepts(port)]
        if not closed or loop.time() >= deadline:
            break
        await asyncio.sleep(0.5)
    return closed


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _default_health(kind: str, port: int) -> Health:
    if kind == "postgres":
        return Health(command=f"pg_isready -q -h 127.0.0.1 -p {port}", interval=0.5, retries=60)
    return Health(command=f"redis-cli -p {port} ping", interval=0.5, retries=60)


def _client_env(kind: str, port: int, env: Mapping[str, str]) -> dict[str, str]:
    """Defaults so a health command like ``pg_isready`` finds the sidecar on loopback."""
    if kind == "postgres":
        return {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": env.get("POSTGRES_USER", "postgres")}
    return {"REDISCLI_PORT": str(port)}


async def _run_health(health: Health, env: Mapping[str, str]) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", health.command, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    try:
        return await reaped(proc, asyncio.wait_for(proc.wait(), health.timeout), group=True) == 0
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return False


def _can_reach(uid: int, gid: int, path: Path) -> bool:
    """Whether uid/gid may search every directory down to ``path`` (the sidecar's own dir)."""
    for parent in [*reversed(path.parents), path]:
        try:
            st = parent.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True
