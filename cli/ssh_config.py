"""OpenSSH configuration and command lines for reaching sessions through the gateway.

How `ssh <id>.orz` works with no flags (OpenSSH reads its config top to bottom, running `Match exec`
commands as it meets them):

    Host *.orz                      key, known_hosts, IdentitiesOnly (shared by every session)
    Match host *.orz exec "orz cloud _refresh-cert %n"
        Include hosts/*.conf        per-session blocks: HostName, Port, User <id>, CertificateFile

`_refresh-cert` fetches a certificate when the session's one has < 60 s left (or is missing or
expired) and (re)writes `hosts/<id>.conf` before ssh evaluates the Include glob, so even a session
created after `ssh-config` ran works on the first try. It also pins the gateway's host key the API names
in ~/.config/orzbob/known_hosts (cli/known_hosts.py); `StrictHostKeyChecking accept-new` then only
applies to a server that publishes none.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import cli
from cli.config import config_dir
from cli.errors import CliError
from cli.keys import key_pair, write_private_file

HOST_SUFFIX = ".orz"
# What the API may name as the gateway's SSH host: a DNS name or an IP address. It is written into
# ssh_config (HostName) and onto ssh's command line: a newline from a lying API (compromised, or an
# impostor the user logged in to) would add a config line such as ProxyCommand, a leading '-' an option.
_SSH_HOST_RE = re.compile(r"[A-Za-z0-9:_][A-Za-z0-9._:-]{0,252}")
BEGIN_MARK = "# >>> orzbob cloud >>>"
END_MARK = "# <<< orzbob cloud <<<"


def known_hosts_path() -> Path:
    return config_dir() / "known_hosts"


def orz_ssh_config_path() -> Path:
    return config_dir() / "ssh_config"


def hosts_dir() -> Path:
    return config_dir() / "hosts"


def user_ssh_config_path() -> Path:
    return Path.home() / ".ssh" / "config"


def session_from_host(host: str) -> str:
    """`abc.orz` -> `abc` (the id is validated by the caller)."""
    return host[: -len(HOST_SUFFIX)] if host.endswith(HOST_SUFFIX) else host


def config_path_arg(path: Path | str) -> str:
    """A path as an ssh_config argument: `%` escaped (ssh expands tokens) and quoted if it has spaces."""
    text = str(path).replace("%", "%%")
    if '"' in text:
        raise ValueError(f"cannot use a path containing '\"' in ssh options: {text}")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def orz_command() -> list[str]:
    """How `ssh` can run this same `orz` again (for `Match exec`), without relying on PATH or cwd."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "orz" and argv0.exists():
        return [str(argv0.resolve())]
    root = Path(cli.__file__).resolve().parent.parent
    # `env PYTHONPATH=...` so a source checkout (not pip-installed) is found from any directory.
    return ["env", f"PYTHONPATH={root}", sys.executable, "-m", "cli"]


def refresh_exec_line(command: list[str]) -> str:
    """The `Match exec` line; ssh hands its argument to the user's shell, so every word is quoted."""
    words = " ".join(shlex.quote(w) for w in [*command, "cloud", "_refresh-cert"])
    if '"' in words:
        raise ValueError("the orz command path contains '\"', which ssh_config cannot quote")
    return f'Match host *{HOST_SUFFIX} exec "{words.replace("%", "%%")} %n"'


def proxy_command_line(command: list[str]) -> str:
    """`ProxyCommand` through the gateway's WebSocket door; %n is the name typed (<id>.orz)."""
    words = " ".join(shlex.quote(w) for w in [*command, "cloud", "proxy"])
    return f"    ProxyCommand {words.replace('%', '%%')} %n"


def render_main_config(command: list[str] | None = None, *, websocket: bool = False) -> str:
    keys = key_pair()
    command = command or orz_command()
    proxy = [proxy_command_line(command)] if websocket else []
    return "\n".join([
        "# Written by `orz cloud ssh-config`; regenerate it rather than editing it.",
        f"# `ssh <session-id>{HOST_SUFFIX}` reaches a session through the Orzbob Cloud gateway.",
        f"Host *{HOST_SUFFIX}",
        f"    IdentityFile {config_path_arg(keys.private)}",
        "    IdentitiesOnly yes",
        "    PasswordAuthentication no",
        "    KbdInteractiveAuthentication no",
        f"    UserKnownHostsFile {config_path_arg(known_hosts_path())}",
        "    StrictHostKeyChecking accept-new",
        "    ServerAliveInterval 30",
        *proxy,
        refresh_exec_line(command),
        f"    Include {config_path_arg(hosts_dir())}/*.conf",
        "",
    ])


def is_ssh_host(host: str) -> bool:
    """Whether host is a host name or address (nothing ssh_config or known_hosts would read as more)."""
    return bool(_SSH_HOST_RE.fullmatch(host))


def checked_endpoint(host: str, port: int) -> tuple[str, int]:
    """The API's SSH host and port, refused (CliError) unless a host name or address and a port."""
    if not _SSH_HOST_RE.fullmatch(host) or not 0 < port < 65536:
        raise CliError(f"the API named an SSH host that is not a host name and port ({host[:80]!r}, {port}); "
                       "is the API URL the right one (orz cloud login --api-url)?")
    return host, port


def render_host_block(session_id: str, host: str, port: int, cert: Path) -> str:
    host, port = checked_endpoint(host, port)
    return "\n".join([
        f"Host {session_id}{HOST_SUFFIX}",
        f"    HostName {host}",
        f"    Port {port}",
        f"    User {session_id}",
        f"    CertificateFile {config_path_arg(cert)}",
        "",
    ])


def write_host_file(session_id: str, host: str, port: int, cert: Path) -> Path:
    path = hosts_dir() / f"{session_id}.conf"
    text = render_host_block(session_id, host, port, cert)
    if not path.exists() or path.read_text() != text:
        write_private_file(path, text.encode())
    return path


def forget_host(session_id: str) -> None:
    (hosts_dir() / f"{session_id}.conf").unlink(missing_ok=True)


def write_main_config(command: list[str] | None = None, *, websocket: bool = False) -> Path:
    path = orz_ssh_config_path()
    write_private_file(path, render_main_config(command, websocket=websocket).encode())
    hosts_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def include_block(target: Path) -> str:
    return f"{BEGIN_MARK}\nInclude {config_path_arg(target)}\n{END_MARK}\n"


def with_include(current: str, target: Path) -> str | None:
    """~/.ssh/config's text with the Include of target at the top; None when it is there already.

    At the top because an Include placed after a `Host` line would only apply inside that block.
    """
    if BEGIN_MARK in current:
        return None
    return include_block(target) + ("\n" + current if current else "")


def without_include(current: str) -> str | None:
    """~/.ssh/config's text without our block (and the blank line with_include put after it); None if absent."""
    start = current.find(BEGIN_MARK)
    if start < 0:
        return None
    end = current.find(END_MARK, start)
    end = len(current) if end < 0 else end + len(END_MARK)
    rest = current[end:]
    rest = rest[1:] if rest.startswith("\n") else rest
    if start == 0 and rest.startswith("\n"):
        rest = rest[1:]
    return current[:start] + rest


def read_user_config(user_config: Path) -> str:
    try:
        return user_config.read_text()
    except FileNotFoundError:
        return ""


def install_include(user_config: Path, target: Path) -> bool:
    """Add an Include of target at the top of ~/.ssh/config once; True if the file changed."""
    new = with_include(read_user_config(user_config), target)
    if new is None:
        return False
    user_config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace_file(user_config, new)
    return True


def remove_include(user_config: Path) -> bool:
    """Take our Include block out of ~/.ssh/config; True if the file changed (the rest is kept as it was)."""
    new = without_include(read_user_config(user_config))
    if new is None:
        return False
    _replace_file(user_config, new)
    return True


def generated_files() -> list[Path]:
    """What `ssh-config --write` and `_refresh-cert` wrote under ~/.config/orzbob, for --remove."""
    hosts = sorted(hosts_dir().glob("*.conf")) if hosts_dir().is_dir() else []
    main = orz_ssh_config_path()
    return [*([main] if main.exists() else []), *hosts]


def _replace_file(path: Path, text: str) -> None:
    mode = _existing_mode(path)
    tmp = path.with_name(f".{path.name}.orz.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _existing_mode(path: Path) -> int:
    """Keep an existing file's permissions; a new ~/.ssh/config gets 0600 (ssh refuses lax ones)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o600


def attach_argv(session_id: str, host: str, port: int, key: Path, cert: Path, known_hosts: Path,
                *, ssh: str = "ssh") -> list[str]:
    """The `ssh` command line for an interactive attach with a certificate (no shell involved)."""
    host, port = checked_endpoint(host, port)
    return [
        ssh,
        "-i", str(key).replace("%", "%%"),
        "-o", f"CertificateFile={config_path_arg(cert)}",
        "-o", "IdentitiesOnly=yes",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", f"UserKnownHostsFile={config_path_arg(known_hosts)}",
        "-o", "StrictHostKeyChecking=accept-new",
        "-p", str(port),
        "-t", f"{session_id}@{host}",
    ]
