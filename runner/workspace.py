"""The session's workspace: clone the repository at its branch, and run ``setup.init`` exactly once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import signal
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from api.schemas import INIT_LOG_START, RUNNER_OPERATOR_LOGGER
from runner.errors import CloneError, InitError
from runner.reaping import reaped

log = logging.getLogger(__name__)
# What users must not read (`orz cloud logs` leaves it out): git's own words for a host it could not reach.
operator_log = logging.getLogger(RUNNER_OPERATOR_LOGGER)

INIT_MARKER = ".orz-init-done"
SETUP_MARKER = "orz-setup-done"  # in .git (never a file of the checkout): setup finished, with no init to run
GIT_TOKEN_ENV = "GIT_TOKEN"  # noqa: S105  # nosec B105  # a variable name, not a secret
CLONE_TIMEOUT_S = 600.0


def git_env(base: Mapping[str, str], repo_url: str, token: str | None) -> dict[str, str]:
    """Environment for git: no prompts, and the token (if any) as an HTTP header for this host only.

    The header travels in GIT_CONFIG_* variables, so it is never written to .git/config, never on
    a command line, and never in git's own output.
    """
    env = dict(base)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.pop("GIT_ASKPASS", None)
    parts = urlsplit(repo_url)
    if token and parts.scheme in ("http", "https") and parts.hostname:
        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/"
        env["GIT_CONFIG_COUNT"] = "1"
        env["GIT_CONFIG_KEY_0"] = f"http.{origin}.extraHeader"
        env["GIT_CONFIG_VALUE_0"] = f"Authorization: Basic {basic}"
    return env


IDENTITY_CONFIG = "gitconfig"  # in the state dir: the session owner's git identity (write_identity)
_SYSTEM_GITCONFIG = Path("/etc/gitconfig")


async def write_identity(path: Path, name: str | None, email: str | None, env: Mapping[str, str]) -> bool:
    """Make the session's owner git's default author and committer, below every config the user controls.

    The file becomes git's *system* config (GIT_CONFIG_SYSTEM, which the caller sets): the lowest
    priority, so ``user.name``/``user.email`` in ~/.gitconfig (dotfiles, a setup.init's
    ``git config --global``) or in the repository's own config win over it. It includes the image's
    /etc/gitconfig, which it stands in for. False when there is no identity to write (git's defaults).
    """
    if not email:
        return False
    config = ["--file", str(path)]
    try:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        if await asyncio.to_thread(_SYSTEM_GITCONFIG.is_file):
            await _git(["config", *config, "include.path", str(_SYSTEM_GITCONFIG)], env, what="git config")
        await _git(["config", *config, "user.name", name or email.split("@", 1)[0]], env, what="git config")
        await _git(["config", *config, "user.email", email], env, what="git config")
    except (CloneError, OSError) as exc:  # commits then need an identity of the user's own, as before
        log.warning("could not set the session owner's git identity: %s", exc)
        return False
    return True


async def clone(repo_url: str, branch: str | None, dest: Path, *, env: Mapping[str, str],
                token: str | None = None, shallow: bool = True) -> bool:
    """Clone into ``dest`` unless it already holds a checkout; True when a clone happened."""
    if (dest / ".git").exists():
        log.info("workspace already cloned, keeping it")
        return False
    _mkdir(dest)
    args = ["clone", "--quiet", "--no-tags"]
    if shallow:
        args += ["--depth", "1"]
    if branch:
        args += ["--branch", branch, "--single-branch"]
    # "--" stops option parsing: a URL or path can never be read as a git option.
    args += ["--", repo_url, str(dest)]
    log.info("cloning %s (branch %s)", _safe_url(repo_url), branch or "default")
    await _git(args, git_env(env, repo_url, token), what=f"git clone of {_safe_url(repo_url)}", token=token)
    _exclude_marker(dest)
    return True


@dataclass(frozen=True)
class Refresh:
    """What refresh did: whether HEAD moved, and lines for the user (the init log)."""

    moved: bool = False
    notes: tuple[str, ...] = ()


STASH_IDENTITY = ("-c", "user.name=Orzbob Cloud", "-c", "user.email=orz@localhost")


async def refresh(repo_url: str, dest: Path, *, env: Mapping[str, str], token: str | None = None,
                  pull: bool = False) -> Refresh:
    """Bring a checkout to its branch's current head when its setup never finished (or ``pull``).

    A session that failed on its first start (a bad .orz/cloud.yaml, a failing init) keeps its clone;
    the user fixes the repository, pushes, starts it again, and expects the fix. No one's work is ever
    lost: uncommitted changes are stashed first (with untracked files too while setup never finished:
    they are most likely what the failed init left), untracked files are never overwritten (git reset
    --keep refuses), and a checkout with commits of its own is kept as it is. Each step is a line in the
    init log (``notes``).
    """
    if not (dest / ".git").exists() or (setup_done(dest) and not pull):
        return Refresh()
    genv = git_env(env, repo_url, token)
    notes: list[str] = []

    async def git(*args: str) -> str:
        return await _git(["-C", str(dest), *args], genv, what=f"git {args[0]}", token=token)

    try:
        upstream = await git("rev-parse", "--abbrev-ref", "@{upstream}")
        # Counted before the fetch: a shallow fetch of the new head does not connect it to older commits.
        local_commits = await git("rev-list", "--count", "--max-count=1", "@{upstream}..HEAD") != "0"
        await git("fetch", "--quiet", "--no-tags", "--depth", "1", "origin")
        before, head = await git("rev-parse", "HEAD"), await git("rev-parse", "@{upstream}")
    except CloneError as exc:
        return _not_updated(repo_url, exc, notes)
    if before == head:
        return Refresh(notes=(f"[orz] the workspace is at {upstream}'s head {head[:12]}",) if pull else ())
    if local_commits:
        return Refresh(notes=(
            f"[orz] not updating the workspace to {upstream}'s head {head[:12]}: it has commits of its own; "
            "kept as it is (merge them yourself, e.g. git pull --rebase)",))
    untracked = not setup_done(dest)
    stashed = False
    try:
        if await git("status", "--porcelain", f"--untracked-files={'all' if untracked else 'no'}"):
            label = f"orz: changes kept before updating to {upstream} {head[:12]}"
            also = ["--include-untracked"] if untracked else []
            await _git(["-C", str(dest), *STASH_IDENTITY, "stash", "push", *also, "--message", label],
                       genv, what="git stash", token=token)
            stashed = True
            what = "uncommitted changes and untracked files were" if untracked else "uncommitted changes were"
            notes.append(f"[orz] {what} stashed ('{label}'); get them back with: git stash pop")
        await git("reset", "--quiet", "--keep", "@{upstream}")
        after = await git("rev-parse", "HEAD")
    except CloneError as exc:
        if stashed:
            with contextlib.suppress(CloneError):
                await git("stash", "pop", "--quiet")
                notes.append("[orz] the stashed changes are back in place")
        return _not_updated(repo_url, exc, notes)
    notes.append(f"[orz] workspace updated to {upstream}'s head {after[:12]} (was {before[:12]})")
    for line in notes:
        log.info("%s", line.removeprefix("[orz] "))
    return Refresh(moved=after != before, notes=tuple(notes))


def _not_updated(repo_url: str, exc: CloneError, notes: list[str]) -> Refresh:
    # The checkout is still usable: go on with it rather than fail the start.
    log.warning("could not update the workspace from %s: %s", _safe_url(repo_url), exc)
    return Refresh(notes=(*notes, f"[orz] could not update the workspace from {_safe_url(repo_url)} ({exc}); "
                                  "going on with it as it is"))


async def _git(args: Sequence[str], env: Mapping[str, str], *, what: str, token: str | None = None) -> str:
    """Run git and return its stdout; CloneError naming ``what`` with git's last line when it fails."""
    proc = await asyncio.create_subprocess_exec(
        "git", *args, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await reaped(proc, asyncio.wait_for(proc.communicate(), CLONE_TIMEOUT_S))
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CloneError(f"{what} timed out") from None
    if proc.returncode != 0:
        reason = _redact(_git_reason(err.decode("utf-8", "replace")) or f"exit status {proc.returncode}", token)
        if _unreachable(reason):
            # The session's events show the user one sentence for every way of not reaching the host: git's
            # own (no such name, refused, timed out, a TLS name mismatch) told apart names and ports of the
            # operator's network. The runner's log keeps git's line for operators only: `orz cloud logs` (which
            # shows the session's owner the runner's warnings) leaves the operator logger's records out.
            operator_log.warning("%s failed: %s", what, reason)
            reason = UNREACHABLE
        raise CloneError(f"{what} failed: {reason}")
    return out.decode("utf-8", "replace").strip()


# True whichever way it failed, the URL's fault or the server's (its DNS or network down): it blames neither.
UNREACHABLE = ("could not reach the repository's host from the server (it must be a public git server that the "
               "server can resolve and reach)")
# git's (curl's, ssh's) words for failing before any git server answered: name look-up, connection, TLS.
_NETWORK_FAILURE = re.compile(
    r"resolve host|resolve hostname|look ?up|unable to connect|failed to connect|couldn't connect|connection "
    r"(refused|reset|timed out|closed)|timed out|no route to host|unreachable|\bssl\b|\btls\b|certificate|"
    r"gnutls|handshake|empty reply|recv failure|send failure|kex_exchange|host key verification|proxy",
    re.IGNORECASE)


def _unreachable(reason: str) -> bool:
    """Whether git's line says the host was not reached (quoted URLs left out: a path may say anything)."""
    return bool(_NETWORK_FAILURE.search(re.sub(r"'[^']*'", "''", reason)))


# What git prints after any failed fetch, whatever the cause: it says nothing about this failure.
_GIT_ADVICE = frozenset({"fatal: Could not read from remote repository.",
                         "Please make sure you have the correct access rights", "and the repository exists."})


def _git_reason(stderr: str) -> str | None:
    """The line of git's stderr that says what went wrong."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # git's "error:" line says what went wrong ("Untracked working tree file 'x' would be overwritten");
    # the "fatal:" line after it often only that it stopped.
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[0]
    # "does not appear to be a git repository", "Permission denied (publickey).": before the advice.
    telling = [line for line in lines if line not in _GIT_ADVICE] or lines
    return telling[-1] if telling else None


async def trust(dest: Path, env: Mapping[str, str]) -> None:
    """Let git work in a workspace whose top directory belongs to someone else.

    A Kubernetes volume's root belongs to root (the Pod's fsGroup only makes it writable), and git refuses
    such a repository ("detected dubious ownership"): the runner's refresh and the user's own `git status`
    would fail. The workspace is listed in the session user's global safe.directory once."""
    if (await asyncio.to_thread(os.stat, dest)).st_uid == os.geteuid():
        return
    try:
        listed = (await _git(["config", "--global", "--get-all", "safe.directory"], env, what="git config")).split()
    except CloneError:
        listed = []  # none listed yet (git exits 1)
    if str(dest) not in listed:
        await _git(["config", "--global", "--add", "safe.directory", str(dest)], env, what="git config")


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _exclude_marker(dest: Path) -> None:
    # Keep the init marker out of `git status` without touching the repo's own .gitignore.
    exclude = dest / ".git" / "info" / "exclude"
    with contextlib.suppress(OSError):
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a", encoding="utf-8") as fh:
            fh.write(f"\n/{INIT_MARKER}\n")


def _safe_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    return url


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------------------------------- init


@dataclass(frozen=True)
class InitResult:
    ran: bool
    exit_code: int | None = None


def init_done(workspace: Path) -> bool:
    return (workspace / INIT_MARKER).exists()


def setup_done(workspace: Path) -> bool:
    """The session's setup finished once on this workspace: its init succeeded, or it had none to run."""
    return init_done(workspace) or (workspace / ".git" / SETUP_MARKER).exists()


def mark_setup_done(workspace: Path) -> None:
    """Called once a start got past setup. Without it a workspace with no ``setup.init`` (most repositories)
    counted as never set up, and every start moved it to the branch's new head, stashing the agent's work."""
    if (workspace / ".git").is_dir() and not setup_done(workspace):
        (workspace / ".git" / SETUP_MARKER).write_text("ok\n", encoding="utf-8")


async def run_init(command: str, workspace: Path, log_path: Path, *, env: Mapping[str, str],
                   shell: str = "/bin/bash", timeout_s: float = 300.0) -> InitResult:
    """Run ``setup.init`` once per workspace; its output goes to ``log_path``.

    The marker is written only on success, so a failed or interrupted init runs again next start.
    """
    if init_done(workspace):
        return InitResult(ran=False)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"$ {command}\n".encode())
        out.flush()
        proc = await asyncio.create_subprocess_exec(
            shell, "-c", command, cwd=workspace, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        try:
            code = await reaped(proc, asyncio.wait_for(proc.wait(), timeout_s), group=True)
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            out.write(f"\n[orz] setup.init timed out after {timeout_s:.0f}s\n".encode())
            raise InitError(f"setup.init timed out after {timeout_s:.0f}s") from None
        finally:
            # Whatever init left in the background must not outlive it.
            _kill_group(proc.pid)
    if code != 0:
        raise InitError(f"setup.init failed with exit status {code}")
    (workspace / INIT_MARKER).write_text("ok\n", encoding="utf-8")
    return InitResult(ran=True, exit_code=code)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def tail(path: Path, limit: int = 65536) -> str:
    """The last ``limit`` characters of a text file; empty when it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit * 4))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return data[-limit:]


def mark_start(log_path: Path, now: datetime) -> int:
    """Begin this run's part of the init log with ``[orz] start N, <UTC time>``; returns N (the starts this
    log has seen, this one included), or 0 when the log is not a regular file this run may write (the
    session's own code can replace it with a link or a FIFO: that must not stop, nor hang, its next start)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(log_path, flags, 0o644)
    except OSError as exc:
        log.warning("the init log cannot be labelled with this start: %s", exc)
        return 0
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("the init log is not a regular file; this start is not labelled in it")
        return 0
    with os.fdopen(fd, "r+b") as out:
        prefix = INIT_LOG_START.encode()
        number = 1 + sum(1 for line in out if line.startswith(prefix))
        # After a run that stopped mid-line (a killed init), the header still starts a line of its own.
        size = out.seek(0, os.SEEK_END)
        ended = size == 0 or (out.seek(size - 1), out.read(1))[1] == b"\n"
        stamp = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        out.write(("" if ended else "\n").encode() + f"{INIT_LOG_START}{number}, {stamp}\n".encode())
    return number


def note(log_path: Path, lines: Sequence[str]) -> None:
    """Add the runner's own lines ("[orz] ...") to the init log, which `orz cloud logs` shows."""
    if not lines:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as out:
        out.writelines(line + "\n" for line in lines)
