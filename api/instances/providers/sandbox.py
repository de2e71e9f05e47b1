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
import fcntl
import hashlib
import ipaddress
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from api.instances.providers.base import ProviderFailure
from api.settings import Settings, quantity_bytes

# The directories of the host a session sees read-only (when they exist); nothing under /home, /root, /var.
SYSTEM_DIRS = ("/usr", "/etc", "/opt")
TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
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
    """The sandbox's programs, or SandboxUnavailable naming the Debian package to install."""
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


class UidClaims:
    """Which sandbox uid belongs to which session, for every ``orz server`` on this machine.

    A uid owns files (a session's workspace, state and home) and processes, so two servers that both hand
    out the lowest free uid of the same range give two users' sessions one uid: each could signal the
    other's processes and read its files. Each server's own sessions are not enough to know what is free.

    ``directory`` (ORZ_SANDBOX_UID_CLAIMS_DIR, root's, 0700) holds one file per uid in use, named by the uid
    and naming the session directory that holds it. Servers pick under one ``flock`` of ``.lock`` there, and
    create a claim with O_EXCL. A claim whose session directory is gone (a session deleted by a server that
    crashed before releasing it, a data dir removed with its server) is stale: the next pick takes it over.
    A claim whose directory is there is kept, whether its server runs or not: a stopped server's sessions
    start again with their uid.
    """

    LOCK = ".lock"

    def __init__(self, directory: Path, base: int, count: int) -> None:
        self.directory, self.base, self.count = directory, base, count

    def claim(self, session_dir: Path, wanted: int | None = None, taken: Iterable[int] = ()) -> int:
        """The uid of the session at ``session_dir``: ``wanted`` (the one it had) when nobody else holds it,
        else the lowest free one of the range; claimed before it is returned."""
        owner = str(session_dir.resolve())
        used = set(taken)
        with self._locked():
            claims = self._claims()
            held = sorted(uid for uid, by in claims.items() if by == owner and uid not in used)
            if wanted is not None and wanted not in used and claims.get(wanted, owner) == owner:
                chosen = wanted
            elif held:
                chosen = held[0]  # claimed for this session already (a start that failed, tried again)
            else:
                chosen = next((uid for uid in range(self.base, self.base + self.count)
                               if uid not in used and uid not in claims), None)
            if chosen is not None:
                for uid in held:
                    if uid != chosen:  # one uid a session: the one it no longer uses is free again
                        (self.directory / str(uid)).unlink(missing_ok=True)
                if chosen not in claims:
                    self._write(chosen, owner)
                return chosen
        raise ProviderFailure(f"no free sandbox uid left in the range of {self.count} "
                              "(ORZ_SANDBOX_UID_BASE / ORZ_SANDBOX_UID_COUNT)")

    def release(self, session_dir: Path, uid: int | None = None) -> None:
        """Give up the session's claim (its uid, or every claim naming its directory)."""
        owner = str(session_dir.resolve())
        with self._locked():
            for held, by in self._claims(recover=False).items():
                if by == owner and uid in (None, held):
                    (self.directory / str(held)).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / self.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and with it the lock

    def _claims(self, *, recover: bool = True) -> dict[int, str]:
        """uid -> session directory, of every claim in the range; stale ones removed when ``recover``."""
        found: dict[int, str] = {}
        for entry in self.directory.iterdir():
            if not entry.name.isdigit() or not self.base <= int(entry.name) < self.base + self.count:
                continue
            try:
                owner = entry.read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if recover and not (owner and Path(owner).is_dir()):
                entry.unlink(missing_ok=True)
                continue
            found[int(entry.name)] = owner
        return found

    def _write(self, uid: int, owner: str) -> None:
        fd = os.open(self.directory / str(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(owner + "\n")


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

    With ``tmp_on_disk`` (the session has its own disk) /tmp and /var/tmp are ``paths.tmp`` on that disk:
    as tmpfs (bwrap 0.8 cannot size one) they would take up to half the host's RAM each, past the disk's size.

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
                 "--dir", "/var", "--bind", str(paths.tmp), "/var" + private_tmp]
    else:
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", private_tmp,
                 "--tmpfs", "/run", "--perms", "1777", "--dir", "/var" + private_tmp]
    made: set[Path] = {Path(private_tmp), Path("/run")}
    for root in extra_ro:
        argv += [*_parents(root, made, bound), "--ro-bind", str(root), str(root)]
        bound.append(root)
    for path in hidden:
        # A data dir inside a bound tree (a checkout holding its own data dir) shows up empty.
        if any(Path(path).is_relative_to(root) for root in extra_ro) and Path(path).is_dir():
            argv += ["--tmpfs", str(path)]
    for path in paths.writable():
        argv += [*_parents(path, made, []), "--bind", str(path), str(path)]
    argv += ["--chdir", str(paths.workspace), "--setenv", "HOME", str(paths.home),
             "--setenv", "TMPDIR", private_tmp]
    return argv


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


def relay_source(session_id: str) -> str:
    """The loopback address a session's relayed connections come from, its own in 127.128.0.0/9.

    From 127.0.0.1 they would be the host's own: the API counts sign-in attempts per client address, and
    one session's requests would use up the limit of everyone signing in on this machine (and of the others).
    """
    n = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:3], "big") >> 1  # 23 bits
    return str(ipaddress.IPv4Address((127 << 24) | (1 << 23) | n))


def launcher_plan(*, bwrap: list[str], command: list[str], tools: Tools, relay_ports: Iterable[int],
                  cgroup_name: str | None, limits: Mapping[str, int], paths: SessionPaths,
                  session_id: str, egress_allow: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON the launcher reads from its argv (no secrets: those come in its environment)."""
    return {
        "bwrap": bwrap, "command": command, "slirp4netns": tools.slirp4netns,
        "relay_ports": sorted(set(relay_ports)), "relay_source": relay_source(session_id),
        "egress_allow": list(egress_allow), "cgroup": cgroup_name, "limits": dict(limits),
        "socket": str(paths.socket), "network_ready_file": str(paths.network_ready),
        "fatal_file": str(paths.state / FATAL_NAME),
    }
