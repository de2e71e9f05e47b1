"""The per-session launcher: starts bwrap, networks its namespace, relays host ports, forwards SIGTERM.

Run by the local provider as ``python -I -S .../sandbox_launch.py PLAN_JSON`` (the plan
from ``sandbox.launcher_plan``; the runner's environment, secrets included, is this process's own).
Standard library only: it starts for every session. It lives as long as the sandbox and exits with the
runner's exit code. Because bwrap runs with --die-with-parent and slirp4netns with an exit fd held here,
killing this process (SIGKILL included) ends the whole session: every process in its pid namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
CGROUP_ROOT = Path("/sys/fs/cgroup")
READY_TIMEOUT_S = 10.0
_RELAY_CHUNK = 65536


def log(message: str) -> None:
    # stderr is the session's runner.log (the provider opened it).
    print(f"sandbox: {message}", file=sys.stderr, flush=True)


def create_in_state(path: str, text: str = "") -> None:
    """Write a new file into the session's state dir, which its uid owns: never through a link it put there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def fail(plan: dict[str, Any], reason: str) -> None:
    """Log, and leave the reason where the provider reports a failed session from (the runner's fatal file)."""
    log(reason)
    with contextlib.suppress(OSError):
        create_in_state(plan["fatal_file"], reason + "\n")


# -- cgroups (v1) ----------------------------------------------------------------------------------

def _own_cgroup(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def enter_cgroups(name: str, limits: dict[str, int]) -> list[Path]:
    """Make one cgroup per controller under ours, set the limits and move this process in (children follow)."""
    made: list[Path] = []
    for controller in sorted({key.split(".")[0] for key in limits}):
        own = _own_cgroup(controller)
        base = CGROUP_ROOT / controller
        if own is None or not base.is_dir():
            log(f"cgroup controller {controller} not available: its limits are not enforced")
            continue
        group = base / own.lstrip("/") / name
        try:
            group.mkdir(exist_ok=True)
            for key, value in limits.items():
                if key.startswith(controller + "."):
                    (group / key).write_text(str(value))
            (group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            log(f"cgroup {controller} limits not enforced: {exc.strerror}")
            continue
        made.append(group)
    return made


def leave_cgroups(groups: list[Path]) -> None:
    for group in groups:
        with contextlib.suppress(OSError):
            (group.parent / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.02)  # the kernel is still killing what was left in the namespace


def remove_cgroups(name: str) -> None:
    """Remove a session's cgroups left by a launcher that was killed (the server calls this; best effort)."""
    for controller in ("pids", "memory", "cpu"):
        own = _own_cgroup(controller)
        if own is not None:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / controller / own.lstrip("/") / name).rmdir()


# -- namespaces ------------------------------------------------------------------------------------

def _setns(path: str, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _loopback_up() -> bool:
    """Whether this namespace's lo is up with 127.0.0.1 (bwrap's last step in configuring it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq))[1]
        if not flags & IFF_UP:
            return False
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError:
            return False
    return True


def listen_in_namespace(pid: int, ports: list[int], join_userns: bool) -> list[socket.socket]:
    """Listening sockets on 127.0.0.1:<port> inside the sandbox's network namespace (made by a forked child).

    Returns once bwrap has brought the namespace's loopback up: slirp4netns must not configure the namespace
    while bwrap still does (their netlink requests collide).
    """
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            if join_userns:
                _setns(f"/proc/{pid}/ns/user", CLONE_NEWUSER)
            _setns(f"/proc/{pid}/ns/net", CLONE_NEWNET)
            for _ in range(500):
                if _loopback_up():
                    break
                time.sleep(0.01)  # bwrap is still configuring it
            made = []
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen(128)
                made.append(sock)
            socket.send_fds(theirs, [b"ok"], [s.fileno() for s in made]) if made else theirs.send(b"ok")
            code = 0
        except BaseException as exc:
            with contextlib.suppress(Exception):
                log(f"cannot listen inside the sandbox: {exc}")
        os._exit(code)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 16, max(len(ports), 1))
    finally:
        ours.close()
        os.waitpid(child, 0)
    if len(fds) != len(ports):
        raise RuntimeError("could not relay host ports into the sandbox")
    # SCM_RIGHTS hands fds over inheritable (Python makes its own close-on-exec, not these; and 3.11's
    # recv_fds drops its flags argument, so MSG_CMSG_CLOEXEC cannot say it): a listening socket inside
    # the sandbox must not reach a child this launcher starts.
    for fd in fds:
        os.set_inheritable(fd, False)
    return [socket.socket(fileno=fd) for fd in fds]


# -- relays ----------------------------------------------------------------------------------------

async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def relay_to_host(port: int, source: str | None = None):  # type: ignore[no-untyped-def]
    """A connection handler relaying to the host's 127.0.0.1:port from ``source`` (the session's own address)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0) if source else None)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    return handle


# -- the sandbox -----------------------------------------------------------------------------------

def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


async def run(plan: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    groups = enter_cgroups(plan["cgroup"], plan["limits"]) if plan.get("cgroup") else []
    with contextlib.suppress(FileNotFoundError):
        os.unlink(plan["socket"])  # a stale endpoint socket from the last run
    ready_file = plan["network_ready_file"]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ready_file)  # from the last run
    info_r, info_w = os.pipe()
    slirp = None
    exit_r, exit_w = os.pipe()
    stopping = False
    child_pid: int | None = None
    bwrap: asyncio.subprocess.Process | None = None

    def forward(signum: int) -> None:
        nonlocal stopping
        stopping = True
        runner = _first_child(child_pid) if child_pid else None
        with contextlib.suppress(ProcessLookupError):
            if runner is not None:
                os.kill(runner, signum)  # the runner shuts its session down, then its namespace ends
            elif bwrap is not None:
                bwrap.send_signal(signal.SIGKILL)  # the runner is not even started yet

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, forward, signum)
    bwrap = await asyncio.create_subprocess_exec(
        *plan["bwrap"], "--info-fd", str(info_w), "--", *plan["command"],
        pass_fds=(info_w,), start_new_session=True, stdin=asyncio.subprocess.DEVNULL)
    os.close(info_w)
    servers: list[asyncio.Server] = []
    try:
        info = json.loads(await loop.run_in_executor(None, _read_all, info_r) or b"{}")
        child_pid = info.get("child-pid")
        if not child_pid:
            fail(plan, "the session sandbox did not start (bwrap failed; see the runner log)")
            return await bwrap.wait() or 2
        join_userns = os.geteuid() != 0
        ports = list(plan["relay_ports"])
        for sock, port in zip(listen_in_namespace(child_pid, ports, join_userns), ports, strict=True):
            servers.append(await asyncio.start_server(relay_to_host(port, plan.get("relay_source")), sock=sock))
        ready_r, ready_w = os.pipe()
        args = [plan["slirp4netns"], "--configure", "--mtu=65520", "--disable-host-loopback",
                "--enable-sandbox", "--netns-type=path", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}"]
        if join_userns:
            args.append(f"--userns-path=/proc/{child_pid}/ns/user")
        args += [f"/proc/{child_pid}/ns/net", "tap0"]
        slirp = await asyncio.create_subprocess_exec(
            *args, pass_fds=(ready_w, exit_r), start_new_session=True, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL)
        os.close(ready_w)
        os.close(exit_r)
        try:
            ready = await asyncio.wait_for(loop.run_in_executor(None, _read_all, ready_r), READY_TIMEOUT_S)
        except TimeoutError:
            ready = b""
        if not ready:
            fail(plan, "the session sandbox got no network (slirp4netns failed; see the runner log)")
            bwrap.send_signal(signal.SIGKILL)
            await bwrap.wait()
            return 2
        # The runner has been importing meanwhile; it waits for this before it heartbeats or clones.
        create_in_state(ready_file)
        return await bwrap.wait()
    finally:
        for server in servers:
            server.close()
        os.close(exit_w)  # slirp4netns exits when this closes
        if slirp is not None:
            try:
                await asyncio.wait_for(slirp.wait(), 2.0)
            except TimeoutError:
                slirp.kill()
                await slirp.wait()
        leave_cgroups(groups)


def main() -> None:
    plan = json.loads(sys.argv[1])
    sys.exit(asyncio.run(run(plan)))


if __name__ == "__main__":
    main()
