"""The local provider's session sandbox: a pure builder of the bubblewrap command and the launcher's plan.

Each session runs as ``sandbox_launch`` (outside, as the server's user) -> ``bwrap`` (as the session's own
uid when the server is root) -> the runner. Inside: its own pid, ipc, uts, user and network namespaces;
the system directories and the Python that runs the runner read-only; the session's workspace, state dir
and home read-write at their own paths; a private /tmp; nothing else of the data dir. The launcher gives
the namespace outbound networking (slirp4netns; the host's loopback, its other addresses and the private
and link-local ranges refused unless allowed), relays the named host ports (the
API's among them) into the namespace's loopback, and sets cgroup limits where this machine allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import platform
import secrets
import shutil
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from api.instances.providers import sandbox_launch
from api.instances.providers.base import ProviderFailure
from api.settings import Settings, quantity_bytes

log = logging.getLogger(__name__)

# The directories of the host a session sees read-only (when they exist); nothing under /home, /root, /var.
SYSTEM_DIRS = ("/usr", "/etc", "/opt")
TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SHM = "/dev/shm"  # noqa: S108  # nosec B108  # a mount point inside the sandbox, not the host's
SOCKET_NAME = "ssh.sock"
NETWORK_READY_NAME = "network-ready"
FATAL_NAME = "fatal_error"  # the runner's own (runner/main.py FATAL_FILE): the provider reads it
ETC_FILES = ("passwd", "group", "resolv.conf", "gitconfig")
# slirp4netns's DNS forwarder: the host's resolver may be on its loopback, which the session cannot reach.
SLIRP_DNS = "10.0.2.3"
_TIERS_CPU_PERIOD_US = 100_000


class SandboxUnavailable(ProviderFailure):
    """A tool the sandbox needs is missing: sessions cannot start (never silently unsandboxed)."""


@dataclass(frozen=True)
class Tools:
    bwrap: str
    slirp4netns: str


def find_tools() -> Tools:
    """The sandbox's programs, or SandboxUnavailable naming the Debian package to install (or the CPU the
    system-call filter has no table for)."""
    check_architecture()
    found = {}
    for cmd, package in (("bwrap", "bubblewrap"), ("slirp4netns", "slirp4netns")):
        path = shutil.which(cmd)
        if path is None:
            raise SandboxUnavailable(
                f"cannot start sessions: the session sandbox needs `{cmd}` (Debian package {package}: "
                f"apt-get install {package}); a single developer may set ORZ_SANDBOX=off instead")
        found[cmd] = path
    return Tools(bwrap=found["bwrap"], slirp4netns=found["slirp4netns"])


@dataclass(frozen=True)
class SessionPaths:
    base: Path

    @property
    def workspace(self) -> Path:
        return self.base / "workspace"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def tmp(self) -> Path:
        """The sandbox's /tmp and /var/tmp when the session has its own disk (emptied at each start)."""
        return self.base / "tmp"

    @property
    def etc(self) -> Path:
        """Files the provider writes for the sandbox's /etc (passwd, group, resolv.conf); root-owned."""
        return self.base / "sandbox-etc"

    @property
    def socket(self) -> Path:
        return self.state / SOCKET_NAME

    @property
    def network_ready(self) -> Path:
        return self.state / NETWORK_READY_NAME

    def writable(self) -> tuple[Path, ...]:
        return (self.workspace, self.state, self.home)


def runs_as_root() -> bool:
    return os.geteuid() == 0


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces or parentheses: split after its closing paren.
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited already
        return None
    return int(fields[19])


def _read_proc(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _namespace(kind: str) -> str:
    """This process's namespace of ``kind`` ("mnt:[4026531841]"), "" when unreadable."""
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def _process_uids() -> set[int]:
    """Every uid (real, effective, saved, fs) of a process this process's pid namespace shows."""
    uids: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        for line in _read_proc(f"/proc/{entry.name}/status").splitlines():
            if line.startswith("Uid:"):
                uids.update(int(field) for field in line.split()[1:])
                break
    return uids


@dataclass(frozen=True)
class Server:
    """Who claims: enough for any other server to tell whether this one, or what it started, may still run."""

    boot: str  # /proc/sys/kernel/random/boot_id: every process of an earlier boot is gone
    pid: int
    start: int | None  # the pid's start time: a reused pid is not this server
    mnt: str  # its mount and pid namespaces: another server in both sees what it sees
    pidns: str

    @classmethod
    def this(cls) -> Server:
        return cls(boot=_read_proc("/proc/sys/kernel/random/boot_id"), pid=os.getpid(),
                   start=process_start_time(os.getpid()), mnt=_namespace("mnt"), pidns=_namespace("pid"))


@dataclass(frozen=True)
class Claim:
    """One claim file: the session directory holding the uid, its server, and the identity of its sessions
    directory (``root``: device and inode, the same whatever path or mount namespace it is seen from)."""

    dir: str
    root: str
    server: Server | None  # None: a claim from before servers were recorded (kept until its session drops it)

    def to_json(self) -> str:
        return json.dumps({"dir": self.dir, "root": self.root,
                           "server": dataclasses.asdict(self.server) if self.server else None})

    @classmethod
    def parse(cls, text: str) -> Claim | None:
        text = text.strip()
        if not text.startswith("{"):
            return cls(dir=text, root="", server=None) if text.startswith("/") else None
        try:
            data = json.loads(text)
            server = data.get("server")
            return cls(dir=str(data["dir"]), root=str(data.get("root") or ""),
                       server=Server(**server) if isinstance(server, dict) else None)
        except (ValueError, TypeError, KeyError):
            return None


ROOT_MARK = ".uid-claims-root"


def _root_id(sessions_dir: Path) -> str:
    """A sessions directory's identity, whatever path or mount namespace it is seen from: its device and
    inode (kept by a rename) and a random mark written in it once (a new directory that reuses a deleted
    one's inode is not it); "" when it is not there."""
    mark_path = sessions_dir / ROOT_MARK
    try:
        st = os.stat(sessions_dir)
        with contextlib.suppress(FileExistsError):  # written by another server meanwhile: read below
            fd = os.open(mark_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_hex(16) + "\n")
        fd = os.open(mark_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            mark = fh.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}:{mark}"


class UidClaims:
    """Which sandbox uid belongs to which session, for every ``orz server`` on this machine.

    A uid owns files (a session's workspace, state and home) and processes, so two servers that both hand
    out the lowest free uid of the same range give two users' sessions one uid: each could signal the
    other's processes and read its files. Each server's own sessions are not enough to know what is free.

    ``directory`` (ORZ_SANDBOX_UID_CLAIMS_DIR, root's, 0700; refused when another user owns it or others may
    write it) holds one file per uid in use, named by the uid, naming the session directory that holds it,
    the identity of that session's sessions directory and the claiming server (boot id, pid and its start
    time, mount and pid namespaces). Servers pick under one ``flock`` of ``.lock`` there (waited for
    ``LOCK_WAIT_S`` at most), and create a claim with O_EXCL; nothing there is followed through a symlink.

    Another server's view of the filesystem and processes may not be this one's (systemd's ProtectHome= or
    PrivateTmp=, a container sharing only this directory): a session directory it cannot see proves
    nothing. So a claim is taken over only when it is provably dead:
    - it names a session of this server's own sessions directory that is gone (a delete that crashed
      before releasing it); or
    - it was made in an earlier boot (every process of the uid ended with it) and its directory is not
      to be seen (a session still there is its server's to start again); or
    - its server saw what this one sees (same boot, mount and pid namespaces), is gone, and neither its
      session directory nor any process of the uid is left.
    Anything else is kept: a stopped server's sessions start again with their uid, and a server that
    restarts claims its sessions' uids again before anything else (``adopt``).
    """

    LOCK = ".lock"
    LOCK_WAIT_S = 10.0

    def __init__(self, directory: Path, base: int, count: int) -> None:
        self.directory, self.base, self.count = directory, base, count
        self.server = Server.this()

    def claim(self, session_dir: Path, wanted: int | None = None, taken: Iterable[int] = ()) -> int:
        """The uid of the session at ``session_dir``: ``wanted`` (the one it had) when nobody else holds it,
        else the lowest free one of the range; claimed before it is returned. Blocks (see ``LOCK_WAIT_S``):
        call it off the event loop."""
        session_dir = session_dir.resolve()
        used = set(taken)
        with self._locked() as fd:
            mine = Claim(dir=str(session_dir), root=_root_id(session_dir.parent), server=self.server)
            claims = self._claims(fd, session_dir)
            held = sorted(uid for uid, by in claims.items() if self._same(by, mine) and uid not in used)
            if wanted is not None and wanted not in used and self.base <= wanted < self.base + self.count \
                    and (wanted not in claims or self._same(claims[wanted], mine)):
                chosen = wanted
            elif held:
                chosen = held[0]  # claimed for this session already (a start that failed, tried again)
            else:
                chosen = next((uid for uid in range(self.base, self.base + self.count)
                               if uid not in used and uid not in claims), None)
            if chosen is not None:
                for uid in held:
                    if uid != chosen:  # one uid a session: the one it no longer uses is free again
                        self._unlink(fd, uid)
                self._write(fd, chosen, mine)  # new, or this server's now (a restart, a renamed data dir)
                return chosen
        raise ProviderFailure(f"no free sandbox uid left in the range of {self.count} "
                              "(ORZ_SANDBOX_UID_BASE / ORZ_SANDBOX_UID_COUNT)")

    def adopt(self, sessions: Mapping[Path, int]) -> list[Path]:
        """At a server's start: claim again each of its sessions' uids (recording this server as their
        holder), before any other server could take them over. Returns the sessions whose uid another
        session holds now (they get a free uid at their next start)."""
        refused = []
        with self._locked() as fd:
            cache: dict[Path, dict[int, Claim]] = {}
            for given, uid in sessions.items():
                session_dir = given.resolve()
                if not self.base <= uid < self.base + self.count:
                    refused.append(given)
                    continue
                if session_dir.parent not in cache:
                    cache[session_dir.parent] = self._claims(fd, session_dir)
                claims = cache[session_dir.parent]
                mine = Claim(dir=str(session_dir), root=_root_id(session_dir.parent), server=self.server)
                if uid in claims and not self._same(claims[uid], mine):
                    refused.append(given)
                    continue
                self._write(fd, uid, mine)
                claims[uid] = mine
        return refused

    def release(self, session_dir: Path, uid: int | None = None) -> None:
        """Give up the session's claim (its uid, or every claim naming its directory)."""
        session_dir = session_dir.resolve()
        with self._locked() as fd:
            mine = Claim(dir=str(session_dir), root=_root_id(session_dir.parent), server=self.server)
            for held, by in self._claims(fd, session_dir, recover=False).items():
                if self._same(by, mine) and uid in (None, held):
                    self._unlink(fd, held)

    @staticmethod
    def _same(claim: Claim, mine: Claim) -> bool:
        """Whether ``claim`` is the session's of ``mine``: the same sessions directory (by identity: a
        renamed data dir, another mount namespace) and name; a claim without one by its path."""
        if claim.root and mine.root:
            return claim.root == mine.root and Path(claim.dir).name == Path(mine.dir).name
        return claim.dir == mine.dir

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The claims directory's fd, under its lock."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:  # a symlink, a file
            raise ProviderFailure(f"ORZ_SANDBOX_UID_CLAIMS_DIR {self.directory} cannot be used: it must be a "
                                  f"directory, not a symlink ({exc.strerror})") from None
        try:
            st = os.fstat(dir_fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise ProviderFailure(
                    f"ORZ_SANDBOX_UID_CLAIMS_DIR {self.directory} must be owned by the server's user ({os.geteuid()}) "
                    "and writable by it alone (0700): fix its owner and mode")
            fd = os.open(self.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            try:
                deadline = time.monotonic() + self.LOCK_WAIT_S
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise ProviderFailure(
                                f"sandbox uids cannot be claimed: {self.directory / self.LOCK} stayed locked "
                                f"{self.LOCK_WAIT_S:g} s (another orz server holds it); try again") from None
                        time.sleep(0.05)
                yield dir_fd
            finally:
                os.close(fd)  # and with it the lock
        finally:
            os.close(dir_fd)

    def _claims(self, fd: int, session_dir: Path, *, recover: bool = True) -> dict[int, Claim]:
        """uid -> claim, of every claim in the range; stale ones (seen from the server of ``session_dir``)
        removed when ``recover``."""
        found: dict[int, Claim] = {}
        own_root = session_dir.parent
        own_root_id = _root_id(own_root) if recover else ""
        process_uids: set[int] = set()
        scanned = False

        def uid_runs(uid: int) -> bool:
            nonlocal scanned
            if not scanned:  # one look at /proc per pick, and only when a claim may be stale
                process_uids.update(_process_uids())
                scanned = True
            return uid in process_uids

        for name in os.listdir(fd):
            if not name.isdigit() or not self.base <= int(name) < self.base + self.count:
                continue
            claim = self._read(fd, name)
            if claim is None:  # unreadable (not a regular file, not a claim): the uid stays taken
                found[int(name)] = Claim(dir="", root="", server=None)
                continue
            if recover and self._stale(claim, int(name), own_root, own_root_id, uid_runs):
                # Routine cleanup (another run's leftovers), nothing to act on: server.log, not the terminal.
                log.info("sandbox uid %s: taking over the claim of %s, whose session is gone", name, claim.dir)
                self._unlink(fd, int(name))
                continue
            found[int(name)] = claim
        return found

    def _stale(self, claim: Claim, uid: int, own_root: Path, own_root_id: str,
               uid_runs: Callable[[int], bool]) -> bool:
        """Whether ``claim`` is provably dead, seen from this server (whose sessions directory is ``own_root``)."""
        server, me = claim.server, self.server
        if server is None:
            return False  # who made it is unknown: its session drops it (delete, start), nobody else
        same_pids = server.boot == me.boot and server.pidns == me.pidns
        if claim.root and claim.root == own_root_id:
            gone = not (own_root / Path(claim.dir).name).exists()  # this server's own session: it knows
        elif server.boot != me.boot:
            return not os.path.lexists(claim.dir)  # every process of that boot is gone
        elif same_pids and server.mnt == me.mnt:
            gone = not self._runs(server) and not os.path.lexists(claim.dir)
        else:
            return False  # another view: its server may run, or runners it left
        return gone and not (same_pids and uid_runs(uid))

    def _runs(self, server: Server) -> bool:
        if (server.pid, server.start) == (self.server.pid, self.server.start):
            return True
        started = process_start_time(server.pid)
        return started is not None and started == server.start

    def _read(self, fd: int, name: str) -> Claim | None:
        try:
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            return None
        with os.fdopen(file_fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            return Claim.parse(fh.read(65536).decode("utf-8", "replace"))

    def _unlink(self, fd: int, uid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(uid), dir_fd=fd)

    def _write(self, fd: int, uid: int, claim: Claim) -> None:
        """Write ``uid``'s claim: a new file, or (this session's) replaced in one rename."""
        temp = f".{uid}.new"
        self._unlink_name(fd, temp)
        file_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=fd)
        with os.fdopen(file_fd, "w", encoding="utf-8") as out:
            out.write(claim.to_json() + "\n")
        os.rename(temp, str(uid), src_dir_fd=fd, dst_dir_fd=fd)

    @staticmethod
    def _unlink_name(fd: int, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)


HOME_NOTE = "README.orz-sandbox"
HOME_NOTE_TEXT = """\
This Orzbob Cloud session runs in a sandbox (docs/security.md, docs/cli.md#troubleshooting):
- Connections to private, loopback, link-local or the server's own addresses fail at once with
  "Permission denied" (pip: "[Errno 13] Permission denied" from a package mirror on an intranet address).
  The public internet works. The server's operator can let hosts through: ORZ_SANDBOX_EGRESS_ALLOW.
- New user namespaces (unshare -U, rootless containers) and kernel keyrings (keyctl) are refused:
  "Operation not permitted". Nothing in the session can change either.
"""


def write_home_note(home: Path) -> None:
    """Put HOME_NOTE in a session's home unless something of that name is there already (the user's edit, or
    a link: never followed, never overwritten, since the home is the session's). A removed one comes back."""
    try:
        fd = os.open(home / HOME_NOTE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(HOME_NOTE_TEXT)


def etc_files(uid: int, gid: int, home: Path, safe_repos: Iterable[Path] = (),
              host_etc: Path = Path("/etc")) -> dict[str, str]:
    """passwd and group naming the session's user (ssh, git and shells ask), a resolver it can reach, and
    a git config trusting the admin-allowed file:// repository (owned by another uid) for the clone."""
    def read(name: str) -> str:
        try:
            text = (host_etc / name).read_text(encoding="utf-8")
        except OSError:
            return ""
        return text if text.endswith("\n") or not text else text + "\n"

    passwd = read("passwd")
    group = read("group")
    if not any(line.split(":")[2:3] == [str(uid)] for line in passwd.splitlines()):
        passwd += f"orz:x:{uid}:{gid}:orz session:{home}:/bin/bash\n"
    if not any(line.split(":")[2:3] == [str(gid)] for line in group.splitlines()):
        group += f"orz:x:{gid}:\n"
    # git checks the owner of a bare repository's directory, or of a work tree's .git.
    gitconfig = read("gitconfig") + "".join(
        f"[safe]\n\tdirectory = {path}\n\tdirectory = {path}/.git\n" for path in safe_repos)
    return {"passwd": passwd, "group": group, "resolv.conf": f"nameserver {SLIRP_DNS}\n",
            "gitconfig": gitconfig}


# The packages of this project the runner imports (the import contracts keep it to these). From a checkout
# only they are shown: the rest of it (.git, an operator's .env or local config) is none of a session's business.
RUNNER_PACKAGES = ("runner", "api", "gateway")


def python_roots(import_root: str) -> list[Path]:
    """What the runner's interpreter needs: its prefixes and, from the directory holding the runner
    package, the packages it imports."""
    root = Path(import_root).resolve()
    roots = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}
    roots |= {root / name for name in RUNNER_PACKAGES if (root / name).is_dir()}
    # A system Python lives under /usr already; bind each root once, outermost first.
    kept: list[Path] = []
    for root in sorted(roots, key=lambda p: len(p.parts)):
        if any(root == k or root.is_relative_to(k) for k in kept) or root.is_relative_to("/usr"):
            continue
        kept.append(root)
    return kept


def _parents(path: Path, made: set[Path], bound: list[Path]) -> list[str]:
    """--dir for each missing parent of ``path``, world-traversable (bwrap would copy /root's 0700)."""
    out = []
    for parent in reversed(path.parents):
        if parent == Path("/") or parent in made or any(parent.is_relative_to(b) for b in bound):
            continue
        made.add(parent)
        out += ["--perms", "0755", "--dir", str(parent)]
    return out


def bwrap_argv(tools: Tools, paths: SessionPaths, *, session_id: str, uid: int, gid: int, as_root: bool,
               extra_ro: list[Path], hidden: Iterable[Path], tmp_on_disk: bool = False) -> list[str]:
    """bwrap's options (the launcher adds --info-fd and the command from ``command_prefix``).

    With ``tmp_on_disk`` (the session has its own disk) /tmp, /var/tmp and /dev/shm are ``paths.tmp`` on that
    disk: as tmpfs (bwrap 0.8 cannot size one) they would take up to half the host's RAM each, past the disk's
    size. /dev/shm must be writable by the session: bwrap's --dev leaves it root's, and POSIX semaphores live
    there (Python's multiprocessing, ThreadPool included, failed with PermissionError).

    As root, bwrap makes the namespaces without a user namespace (one would map the session to host
    root) and the command starts through setpriv as the session's uid with no capabilities left.
    Otherwise a user namespace maps the server's own uid.
    """
    argv = [tools.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--hostname", session_id[:63], "--cap-drop", "ALL"]
    if as_root:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--disable-userns", "--uid", str(uid), "--gid", str(gid)]
    bound: list[Path] = []
    for name in TOP_LINKS:
        top = Path(name)
        if top.is_symlink():
            argv += ["--symlink", os.readlink(top), name]
        elif top.is_dir():
            argv += ["--ro-bind", name, name]
            bound.append(top)
    for name in SYSTEM_DIRS:
        if Path(name).is_dir():
            argv += ["--ro-bind", name, name]
            bound.append(Path(name))
    for name in ETC_FILES:
        argv += ["--ro-bind", str(paths.etc / name), f"/etc/{name}"]
    # The sandbox's own /tmp: a fresh tmpfs per start, not the host's.
    private_tmp = "/tmp"  # noqa: S108  # nosec B108  # a mount point inside the sandbox, not the host's
    if tmp_on_disk:
        argv += ["--proc", "/proc", "--dev", "/dev", "--bind", str(paths.tmp), private_tmp, "--tmpfs", "/run",
                 "--dir", "/var", "--bind", str(paths.tmp), "/var" + private_tmp, "--bind", str(paths.tmp), SHM]
    else:
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", private_tmp,
                 "--tmpfs", "/run", "--perms", "1777", "--dir", "/var" + private_tmp, "--perms", "1777", "--tmpfs", SHM]
    made: set[Path] = {Path(private_tmp), Path("/run")}
    for root in extra_ro:
        argv += [*_parents(root, made, bound), "--ro-bind", str(root), str(root)]
        bound.append(root)
    for path in hidden:
        # A data dir inside a bound tree (a checkout holding its own data dir, /opt/orzbob) shows up empty.
        if any(Path(path).is_relative_to(root) for root in bound) and Path(path).is_dir():
            argv += ["--tmpfs", str(path)]
    for path in paths.writable():
        argv += [*_parents(path, made, []), "--bind", str(path), str(path)]
    argv += ["--chdir", str(paths.workspace), "--setenv", "HOME", str(paths.home),
             "--setenv", "TMPDIR", private_tmp]
    return argv


# -- the system-call filter (bwrap --seccomp) ------------------------------------------------------------
# What the kernel shares between sessions in spite of their namespaces, refused with EPERM:
# - its keyrings (add_key, keyctl, request_key): a key in a uid's user keyring outlives every process of the
#   uid, so the next session given the uid (another org's) found what the last one left there;
# - new user namespaces (unshare or clone with CLONE_NEWUSER): no use to a session, and in one it has every
#   capability over a fresh namespace, the kernel's attack surface that container runtimes close too.
# clone3 answers ENOSYS (its flags are in memory a filter cannot read): the C library then uses clone.
# System calls of an ABI without a table below (x32, an unknown one) are refused the same way.
_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_SECCOMP_ALLOW, _SECCOMP_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_NEWUSER = 0x10000000
_X32_SYSCALL_BIT = 0x40000000
# AUDIT_ARCH_*: (refused outright, refused with CLONE_NEWUSER in their first argument, clone3)
SECCOMP_TABLES = {
    0xC000003E: ((248, 249, 250), (272, 56), 435),  # x86_64: add_key, request_key, keyctl; unshare, clone
    0x40000003: ((286, 287, 288), (310, 120), 435),  # i386 (int 0x80 on an x86_64 kernel)
    0xC00000B7: ((217, 218, 219), (97, 220), 435),  # aarch64
    0x40000028: ((309, 310, 311), (337, 120), 435),  # arm (compat on aarch64)
}


# platform.machine() of the CPUs whose system calls SECCOMP_TABLES knows, and their AUDIT_ARCH_*.
SECCOMP_MACHINES = {"x86_64": 0xC000003E, "amd64": 0xC000003E, "aarch64": 0xC00000B7, "arm64": 0xC00000B7,
                    **dict.fromkeys(("i386", "i486", "i586", "i686"), 0x40000003),
                    **dict.fromkeys(("armv6l", "armv7l", "armv8l"), 0x40000028)}


def check_architecture() -> None:
    """SandboxUnavailable on a CPU without a table in SECCOMP_TABLES (riscv64, ppc64le, s390x, loongarch64):
    the filter refuses every system call of an ABI it does not know, execve included, so no session could
    start there, and each would fail with "Function not implemented". Refused rather than run without the
    filter: without it sessions of different orgs share the kernel's keyrings and may make user namespaces,
    and a multi-tenant host must not lose that silently."""
    machine = platform.machine()
    if SECCOMP_MACHINES.get(machine) not in SECCOMP_TABLES:
        raise SandboxUnavailable(
            f"cannot start sessions: the session sandbox's system-call filter has no table for this CPU "
            f"architecture ({machine or 'unknown'}; it knows x86_64, aarch64, i386 and arm); a single "
            f"developer may set ORZ_SANDBOX=off instead")


def seccomp_program() -> bytes:
    """The classic BPF program bwrap's --seccomp loads (struct sock_filter[]), for every ABI in SECCOMP_TABLES."""
    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    nr, arch, arg0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low half, little endian)
    denied = op(_BPF_RET, _SECCOMP_ERRNO | _EPERM)
    program = [op(_BPF_LD_W_ABS, arch)]
    for audit_arch, (refused, no_newuser, clone3) in SECCOMP_TABLES.items():
        block = [op(_BPF_LD_W_ABS, nr)]
        if audit_arch == 0xC000003E:
            block += [op(_BPF_JGE, _X32_SYSCALL_BIT, 0, 1), op(_BPF_RET, _SECCOMP_ERRNO | _ENOSYS)]
        for number in refused:
            block += [op(_BPF_JEQ, number, 0, 1), denied]
        block += [op(_BPF_JEQ, clone3, 0, 1), op(_BPF_RET, _SECCOMP_ERRNO | _ENOSYS)]
        for number in no_newuser:
            block += [op(_BPF_LD_W_ABS, nr), op(_BPF_JEQ, number, 0, 3), op(_BPF_LD_W_ABS, arg0),
                      op(_BPF_JSET, _CLONE_NEWUSER, 0, 1), denied]
        block.append(op(_BPF_RET, _SECCOMP_ALLOW))
        program += [op(_BPF_JEQ, audit_arch, 0, len(block)), *block]
    program.append(op(_BPF_RET, _SECCOMP_ERRNO | _ENOSYS))
    return b"".join(program)


def command_prefix(uid: int, gid: int, as_root: bool) -> list[str]:
    """What runs the runner as the session's uid, with every capability gone for good (root only)."""
    if not as_root:
        return []
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, "--reuid", str(uid), "--regid", str(gid), "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--"]


def loopback_port(url: str) -> int | None:
    """The port of ``url`` when its host is this machine's loopback (it must be relayed in), else None."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            return None
    return parts.port or (443 if parts.scheme == "https" else 80)


def cgroup_limits(settings: Settings, resources: Mapping[str, str]) -> dict[str, int]:
    """pids, memory and CPU limits for the launcher to set (cgroup v1 controllers pids, memory, cpu)."""
    limits = {"pids.max": settings.sandbox_pids_max}
    memory = quantity_bytes(resources.get("memory"))
    if memory:
        limits["memory.limit_in_bytes"] = memory
    text = resources.get("cpu", "") or "0"
    try:
        cpu = float(text[:-1]) / 1000 if text.endswith("m") else float(text)  # "500m": Kubernetes millicores
    except ValueError:
        cpu = 0.0
    if cpu > 0:
        limits["cpu.cfs_period_us"] = _TIERS_CPU_PERIOD_US
        limits["cpu.cfs_quota_us"] = int(cpu * _TIERS_CPU_PERIOD_US)
    return limits


def _less_reserve(total: int, minimum: int) -> int:
    """``total`` less a reserve for the server and the host: an eighth, at least ``minimum``, at most half."""
    return total - min(max(minimum, total // 8), total // 2)


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _cgroup_file(controller: str, name: str) -> int | None:
    """A number in this process's own cgroup (v1) of ``controller``: its limit there ("max": None)."""
    own = sandbox_launch.own_cgroup_dir(controller)
    return _number(_read_proc(str(own / name))) if own is not None else None


def host_pids_limit() -> int:
    """How many processes (threads) this machine can run, as this server sees it."""
    found = [_number(_read_proc("/proc/sys/kernel/pid_max")), _number(_read_proc("/proc/sys/kernel/threads-max")),
             _cgroup_file("pids", "pids.max")]
    return min([n for n in found if n] or [32768])


def host_memory_bytes() -> int:
    """This machine's RAM, or the server's own memory cgroup's limit when that is lower."""
    ram = next((int(line.split()[1]) * 1024 for line in _read_proc("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), 0)
    found = [ram, _cgroup_file("memory", "memory.limit_in_bytes")]
    return min([n for n in found if n] or [0])


def cgroup_parent_limits(settings: Settings) -> dict[str, int]:
    """The limits of every session together (the cgroup parent of theirs): ORZ_SANDBOX_PIDS_TOTAL and
    ORZ_SANDBOX_MEMORY_TOTAL, or what the host can spare once the server and the host have a reserve."""
    limits = {"pids.max": settings.sandbox_pids_total or _less_reserve(host_pids_limit(), 4096)}
    memory = quantity_bytes(settings.sandbox_memory_total) or _less_reserve(host_memory_bytes(), 2 * 2**30)
    if memory > 0:
        limits["memory.limit_in_bytes"] = memory
    return limits


def relay_source(session_id: str) -> str:
    """The loopback address a session's relayed connections come from, its own in 127.128.0.0/9.

    From 127.0.0.1 they would be the host's own: the API counts sign-in attempts per client address, and
    one session's requests would use up the limit of everyone signing in on this machine (and of the others).
    """
    n = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:3], "big") >> 1  # 23 bits
    return str(ipaddress.IPv4Address((127 << 24) | (1 << 23) | n))


def launcher_plan(*, bwrap: list[str], command: list[str], tools: Tools, relay_ports: Iterable[int],
                  cgroup_name: str | None, limits: Mapping[str, int], paths: SessionPaths,
                  session_id: str, egress_allow: Iterable[str] = (), cgroup_parent: str | None = None,
                  cgroup_parent_limits: Mapping[str, int] | None = None,
                  relay_max_connections: int | None = None, api_port: int | None = None) -> dict[str, Any]:
    """The JSON the launcher reads from its argv (no secrets: those come in its environment). ``api_port``
    (one of ``relay_ports``) keeps connections for the runner's heartbeats (sandbox_launch.RUNNER_SOURCE)."""
    return {
        "bwrap": bwrap, "command": command, "slirp4netns": tools.slirp4netns,
        "relay_ports": sorted(set(relay_ports)), "relay_source": relay_source(session_id), "api_port": api_port,
        "relay_max_connections": relay_max_connections, "seccomp": seccomp_program().hex(),
        "egress_allow": list(egress_allow), "cgroup": cgroup_name, "limits": dict(limits),
        "cgroup_parent": cgroup_parent, "cgroup_parent_limits": dict(cgroup_parent_limits or {}),
        "socket": str(paths.socket), "network_ready_file": str(paths.network_ready),
        "fatal_file": str(paths.state / FATAL_NAME),
    }
