"""The per-session launcher: starts bwrap, networks its namespace, relays host ports, forwards SIGTERM.

The namespace reaches the internet through slirp4netns, whose connections leave from this host: without
more, a session would reach what the host reaches and the internet does not (the cloud metadata service,
the LAN, services on the host's own addresses, past the cloud firewall). Routes inside the namespace refuse
those (``prohibit``: connect fails at once with EACCES) unless the operator's allow-list names them.

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
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
CGROUP_ROOT = Path("/sys/fs/cgroup")
READY_TIMEOUT_S = 10.0
# IPv4 networks that are not the public internet (the API's repository and webhook rules refuse the same).
# Loopback and 0.0.0.0/8 are the namespace's own and stay open: the relays listen there.
NON_PUBLIC_V4 = ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
                 "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
                 "224.0.0.0/4", "240.0.0.0/4")
SLIRP_NETWORK = "10.0.2.0/24"  # the namespace's own link to slirp4netns: its gateway and DNS forwarder
# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE = 20, 22, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_PROHIBIT = 254, 4, 0, 8
RTA_DST, IFA_ADDRESS, IFA_LOCAL = 1, 1, 2
_RELAY_CHUNK = 65536
DEFAULT_RELAY_MAX_CONNECTIONS = 64  # ORZ_SANDBOX_RELAY_MAX_CONNECTIONS's default, for a plan without it
# Inside the namespace the runner connects to the API from this loopback address (RunnerSpec.api_source_address),
# and the API port's relay keeps RUNNER_CONNECTIONS connections for it beyond the session's shared bound:
# the session's own programs holding every relayed connection (a pool to a host database, a test suite's
# connections to the API) must not leave the runner's heartbeats without one (the session would be
# marked unhealthy, then failed). Code in the session can bind the address too, and so hold at most
# RUNNER_CONNECTIONS more: the bound per session stays (it can end its own runner anyway).
RUNNER_SOURCE = "127.0.0.2"
RUNNER_CONNECTIONS = 4


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


def own_cgroup_dir(controller: str) -> Path | None:
    """This process's own cgroup of ``controller`` (v1), None when the machine has no such hierarchy."""
    own = _own_cgroup(controller)
    base = CGROUP_ROOT / controller
    if own is None or not base.is_dir():
        return None
    return base / own.lstrip("/")


def enter_cgroups(name: str, limits: dict[str, int], parent: str | None = None,
                  parent_limits: dict[str, int] | None = None) -> list[Path]:
    """Make one cgroup per controller under ours (under ``parent`` there, see make_cgroups), set the limits
    and move this process in (children follow)."""
    return make_cgroups(name, limits, os.getpid(), parent=parent, parent_limits=parent_limits)


def make_cgroups(name: str, limits: dict[str, int], pid: int | None = None, *, parent: str | None = None,
                 parent_limits: dict[str, int] | None = None) -> list[Path]:
    """One cgroup per controller of ``limits`` (and of ``parent_limits``) under this process's own, with the
    limits set; ``pid``, when given, is moved in (its children follow). With ``parent`` the cgroup is made
    in that one (every session's, whose limits hold for all of them together); a parent that is not there
    (removed when it was empty) is made with ``parent_limits``. A controller this machine lacks or refuses
    is logged and left out: its limits are not enforced. (The rehearsal's kubelet makes its containers'
    cgroups with this.)"""
    made: list[Path] = []
    every = {**(parent_limits or {}), **limits}
    for controller in sorted({key.split(".")[0] for key in every}):
        own = own_cgroup_dir(controller)
        if own is None:
            log(f"cgroup controller {controller} not available: its limits are not enforced")
            continue
        group = own / parent / name if parent else own / name
        try:
            if parent:
                with contextlib.suppress(FileExistsError):
                    group.parent.mkdir()
                    _write_limits(group.parent, controller, parent_limits or {})
            group.mkdir(exist_ok=True)
            _write_limits(group, controller, limits)
            if pid is not None:
                (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log(f"cgroup {controller} limits not enforced: {exc.strerror}")
            continue
        made.append(group)
    return made


def _write_limits(group: Path, controller: str, limits: dict[str, int]) -> None:
    for key, value in limits.items():
        if key.startswith(controller + "."):
            (group / key).write_text(str(value))


def leave_cgroups(groups: list[Path], up: int = 1) -> None:
    """Move this process ``up`` levels (out of a session's parent too: 2) and remove ``groups``."""
    for group in groups:
        with contextlib.suppress(OSError):
            (group.parents[up - 1] / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.02)  # the kernel is still killing what was left in the namespace


def remove_cgroups(name: str) -> None:
    """Remove a session's cgroups left by a launcher that was killed, or (``name`` a parent) the sessions'
    parent once it is empty (the server calls this; best effort: a cgroup in use stays)."""
    for controller in ("pids", "memory", "cpu"):
        own = own_cgroup_dir(controller)
        if own is not None:
            with contextlib.suppress(OSError):
                (own / name).rmdir()


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


# -- egress ----------------------------------------------------------------------------------------

def _netlink_messages(data: bytes, header: str = "=IH", size: int = 16) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message (or, with ``"=HH", 4``, of each attribute) in ``data``."""
    offset = 0
    while offset + size <= len(data):
        length, kind = struct.unpack_from(header, data, offset)[:2]
        if length < size:
            break
        yield kind, data[offset + size: offset + length]
        offset += (length + 3) & ~3


def _netlink(kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
    """One rtnetlink request in this process's network namespace: its answers, up to the ack or the dump's end."""
    answers = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body)
        while True:
            for answer, payload in _netlink_messages(sock.recv(65536)):
                if answer == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", payload)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return answers
                if answer == NLMSG_DONE:
                    return answers
                answers.append((answer, payload))


def host_addresses() -> list[str]:
    """This host's own IPv4 addresses, every interface's: slirp4netns would connect a session to them."""
    found = set()
    request = struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0)
    for kind, payload in _netlink(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, request):
        if kind == RTM_NEWADDR:
            found |= {socket.inet_ntoa(value) for attr, value in _netlink_messages(payload[8:], "=HH", 4)
                      if attr in (IFA_ADDRESS, IFA_LOCAL) and len(value) == 4}
    return sorted(found)


def allowed_networks(entries: Iterable[str]) -> list[str]:
    """The operator's allow-list as IPv4 networks; a host name counts for the addresses it resolves to now."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            try:
                infos = socket.getaddrinfo(entry, None, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                log(f"the egress allow-list's {entry} does not resolve ({exc}); it stays refused")
                continue
            networks += [ipaddress.ip_network(info[4][0]) for info in infos]
    return sorted({str(net) for net in networks if net.version == 4})


def denied_networks(allowed: Iterable[str], own: Iterable[str]) -> list[str]:
    """What a session may not reach: the non-public ranges and this host's own addresses, less the allowed
    networks and the namespace's own link."""
    own_nets = [ipaddress.IPv4Network(address) for address in own if not ipaddress.IPv4Address(address).is_loopback]
    denied = list(ipaddress.collapse_addresses([*map(ipaddress.IPv4Network, NON_PUBLIC_V4), *own_nets]))
    for entry in (SLIRP_NETWORK, *allowed):
        hole = ipaddress.IPv4Network(entry)
        denied = [piece for net in denied for piece in (
            [net] if not net.overlaps(hole) else [] if net.subnet_of(hole) else net.address_exclude(hole))]
    return [str(net) for net in sorted(denied)]


def prohibit_routes(networks: Iterable[str]) -> None:
    """Make connections to ``networks`` from this network namespace fail at once (EACCES)."""
    for entry in networks:
        net = ipaddress.IPv4Network(entry)
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                           RT_SCOPE_UNIVERSE, RTN_PROHIBIT, 0)
        body += struct.pack("=HH", 8, RTA_DST) + net.network_address.packed
        _netlink(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


# -- namespaces ------------------------------------------------------------------------------------

def prepare_namespace(pid: int, ports: list[int], join_userns: bool, denied: list[str]) -> list[socket.socket]:
    """Inside the sandbox's network namespace (from a forked child): the ``denied`` networks refused, and
    listening sockets on 127.0.0.1:<port>, returned.

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
            prohibit_routes(denied)
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
                log(f"cannot set up the sandbox's network: {exc}")
        os._exit(code)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 16, max(len(ports), 1))
    finally:
        ours.close()
        _, status = os.waitpid(child, 0)
    if len(fds) != len(ports) or os.waitstatus_to_exitcode(status) != 0:
        for fd in fds:
            os.close(fd)
        raise RuntimeError("could not restrict its network or relay host ports into it")
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


def relay_to_host(port: int, source: str | None = None,  # type: ignore[no-untyped-def]
                  slots: asyncio.Semaphore | None = None, runner_slots: asyncio.Semaphore | None = None):
    """A connection handler relaying to the host's 127.0.0.1:port from ``source`` (the session's own address).

    ``slots`` (one for all of a session's relayed ports) bounds the connections it holds at once: the host
    service is the server every session shares (the API), whose file descriptors one session's connections
    would otherwise use up. One more is closed at once, before anything is opened on the host.
    ``runner_slots`` (the API port's only) are for connections from RUNNER_SOURCE, the runner's own, first:
    the session's other connections cannot take them."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        mine = runner_slots is not None and isinstance(peer, tuple) and peer[0] == RUNNER_SOURCE
        pools = [p for p in ((runner_slots if mine else None), slots) if p is not None]
        taken = next((p for p in pools if not p.locked()), None)
        if pools and taken is None:
            writer.close()
            return
        if taken is not None:
            await taken.acquire()  # free (checked above): returns at once
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0) if source else None)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            if taken is not None:
                taken.release()
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
    groups = enter_cgroups(plan["cgroup"], plan["limits"], plan.get("cgroup_parent"),
                           plan.get("cgroup_parent_limits")) if plan.get("cgroup") else []
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
    # The system calls the session may not make (sandbox.seccomp_program), for bwrap to read at its start.
    filter_fd = os.memfd_create("orz-seccomp") if plan.get("seccomp") else None
    try:
        seccomp = []
        if filter_fd is not None:
            os.write(filter_fd, bytes.fromhex(plan["seccomp"]))
            os.lseek(filter_fd, 0, os.SEEK_SET)
            seccomp = ["--seccomp", str(filter_fd)]
        bwrap = await asyncio.create_subprocess_exec(
            *plan["bwrap"], "--info-fd", str(info_w), *seccomp, "--", *plan["command"],
            pass_fds=(info_w, *map(int, seccomp[1:])), start_new_session=True, stdin=asyncio.subprocess.DEVNULL)
    except BaseException:
        for fd in (info_r, exit_r, exit_w):
            os.close(fd)
        raise
    finally:  # bwrap has its own copies; ours go whether it started or not
        os.close(info_w)
        if filter_fd is not None:
            os.close(filter_fd)
    servers: list[asyncio.Server] = []
    try:
        info = json.loads(await loop.run_in_executor(None, _read_all, info_r) or b"{}")
        child_pid = info.get("child-pid")
        if not child_pid:
            fail(plan, "the session sandbox did not start (bwrap failed; see the runner log)")
            return await bwrap.wait() or 2
        join_userns = os.geteuid() != 0
        ports = list(plan["relay_ports"])
        try:
            denied = denied_networks(allowed_networks(plan.get("egress_allow", ())), host_addresses())
            listening = prepare_namespace(child_pid, ports, join_userns, denied)
        except (OSError, RuntimeError) as exc:
            fail(plan, f"the session sandbox could not be set up: {exc} (see the runner log)")
            bwrap.send_signal(signal.SIGKILL)
            await bwrap.wait()
            return 2
        slots = asyncio.Semaphore(int(plan.get("relay_max_connections") or DEFAULT_RELAY_MAX_CONNECTIONS))
        runner_slots = asyncio.Semaphore(RUNNER_CONNECTIONS)
        for sock, port in zip(listening, ports, strict=True):
            handler = relay_to_host(port, plan.get("relay_source"), slots,
                                    runner_slots if port == plan.get("api_port") else None)
            servers.append(await asyncio.start_server(handler, sock=sock))
        ready_r, ready_w = os.pipe()
        # It parses every packet the session sends, as root in the host's network namespace: in a mount
        # namespace of its own with one capability left (--enable-sandbox), under a system-call filter.
        args = [plan["slirp4netns"], "--configure", "--mtu=65520", "--disable-host-loopback",
                "--enable-sandbox", "--enable-seccomp", "--netns-type=path", f"--ready-fd={ready_w}",
                f"--exit-fd={exit_r}"]
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
        leave_cgroups(groups, 2 if plan.get("cgroup_parent") else 1)


def main() -> None:
    plan = json.loads(sys.argv[1])
    sys.exit(asyncio.run(run(plan)))


if __name__ == "__main__":
    main()
