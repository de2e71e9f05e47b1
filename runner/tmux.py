"""The tmux CLI behind one small class: one server per session on its own socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from runner.errors import TmuxError
from runner.reaping import reaped

log = logging.getLogger(__name__)

SESSION = "main"
# How long pane_state waits for tmux to reap a dead program and publish its exit status.
REAP_POLLS = 20
REAP_POLL_S = 0.05
KILL_WAIT_POLLS = 500  # kill_server waits up to 5 s (500 x 10 ms) for the server to have gone
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the final NUL
# tmux signals this channel when the program exits, so the runner reports the exit at once.
PANE_DIED = "orz-pane-died"
# ... and this one when the window changes size (a client attached or resized), for the recording.
RESIZED = "orz-resized"
# The pane's text kept across a stop (beside the socket, in the state dir a stop keeps): a woken session
# shows what it showed before the reaper stopped it, as a laptop's terminal does after sleep.
SCROLLBACK_FILE = "scrollback.txt"
# Shown first in a recreated pane, then the program takes its place (same pid: exec).
_RESTORE = 'cat -- "$0" 2>/dev/null; rm -f -- "$0"; exec "$@"'


def passing_shell() -> str:
    """A POSIX shell for our own wrappers around the program: bash where there is one.

    dash (Debian's /bin/sh) leaves every environment variable whose name is not a shell identifier out of
    what it passes on, so `discovery.type` of .orz/cloud.yaml's env would never reach a program started
    through it; bash passes them on as it got them."""
    return shutil.which("bash") or "/bin/sh"
_CONF = ("set-option -g remain-on-exit on\nset-option -g history-limit 50000\n"
         f'set-hook -g pane-died "wait-for -S {PANE_DIED}"\n'
         f'set-hook -g window-resized "wait-for -S {RESIZED}"\n')


@dataclass(frozen=True)
class PaneState:
    exists: bool
    dead: bool = False
    exit_code: int | None = None
    last_output_at: datetime | None = None
    clients: int = 0
    pane_pid: int | None = None


class Tmux:
    """tmux -S <socket> ..., with the session ``main`` running the program."""

    # The window's size until a client attaches (tmux then sizes it to the client).
    WIDTH, HEIGHT = 200, 50

    def __init__(self, socket: Path, binary: str = "tmux", kept_scrollback: Path | None = None) -> None:
        self.socket = socket
        self.binary = binary
        # A shell command the pane's output is piped into from the program's first byte (the recording):
        # given to tmux in the same call that starts the program, so nothing it prints is missed.
        self.pane_pipe: str | None = None
        self.kept_scrollback = kept_scrollback

    @property
    def saved_scrollback(self) -> Path:
        """Where the pane's text waits for the next start: ``kept_scrollback`` once its directory exists
        (on a volume a stop keeps, e.g. the workspace's .git on Kubernetes), else beside the socket."""
        if self.kept_scrollback is not None and self.kept_scrollback.parent.is_dir():
            return self.kept_scrollback
        return self.socket.with_name(SCROLLBACK_FILE)

    def _then_pipe(self) -> list[str]:
        """tmux command-sequence arguments that attach ``pane_pipe`` to the pane (none when unset)."""
        return [";", "pipe-pane", "-O", "-t", SESSION, self.pane_pipe] if self.pane_pipe else []

    async def pipe_pane(self) -> None:
        """(Re)attach ``pane_pipe`` to the running pane, replacing any earlier pipe."""
        if self.pane_pipe:
            await self.run("pipe-pane", "-O", "-t", SESSION, self.pane_pipe, check=False)

    async def pane_size(self) -> tuple[int, int] | None:
        """The pane's width and height in cells, or None when there is no pane."""
        out = await self.run("display-message", "-p", "-t", SESSION, "#{pane_width} #{pane_height}", check=False)
        width, _, height = out.strip().partition(" ")
        return (int(width), int(height)) if width.isdigit() and height.isdigit() else None

    def default_socket_dir(self) -> Path | None:
        """A TMUX_TMPDIR whose default socket is this server's, so that a plain ``tmux ls`` or
        ``tmux attach`` run in the session finds it; None when that path is too long for a socket."""
        tmpdir = self.socket.parent  # not a subdirectory: the socket path must stay short
        base = tmpdir / f"tmux-{os.getuid()}"  # tmux wants it the user's own, closed to others
        link = base / "default"
        if len(str(link.resolve(strict=False))) > MAX_SOCKET_PATH:
            return None
        base.mkdir(parents=True, mode=0o700, exist_ok=True)
        base.chmod(0o700)
        if not (link.is_symlink() and os.readlink(link) == str(self.socket)):
            link.unlink(missing_ok=True)
            link.symlink_to(self.socket)
        return tmpdir

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "-S", str(self.socket), *args]

    async def run(self, *args: str, env: Mapping[str, str] | None = None, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args), env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await reaped(proc, proc.communicate())
        if check and proc.returncode != 0:
            raise TmuxError(f"tmux {args[0]} failed: {err.decode('utf-8', 'replace').strip()}")
        return out.decode("utf-8", "replace")

    async def start(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                    width: int = WIDTH, height: int = HEIGHT) -> None:
        """Create the session running ``argv`` (kept on exit so its status can be read)."""
        # The server inherits ``env``: that is how secrets and cloud.yaml env reach the program
        # without touching a command line. remain-on-exit (set in the config the server starts
        # with, so even a program that exits at once keeps its pane) gives us the exit status.
        conf = self.socket.with_name("tmux.conf")
        conf.write_text(_CONF, encoding="utf-8")
        if self.saved_scrollback.is_file():
            argv = [passing_shell(), "-c", _RESTORE, str(self.saved_scrollback), *argv]
        await self.run(
            "-f", str(conf), "new-session", "-d", "-s", SESSION, "-x", str(width), "-y", str(height),
            "-c", str(cwd), "--", *argv, *self._then_pipe(), env=env,
        )

    async def ensure(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> str | None:
        """Recreate the program when it exited, or the session when it is gone; say which ("started",
        "restarted") or None when it was running."""
        state = await self.pane_state()
        if not state.exists:
            if self.socket.exists():
                log.info("tmux session gone, recreating it")
            await self.start(argv, cwd=cwd, env=env)
            return "started"
        if state.dead:
            log.info("program exited with %s, restarting it", state.exit_code)
            await self.run("respawn-pane", "-k", "-t", SESSION, "-c", str(cwd), "--", *argv, *self._then_pipe(),
                           env=env)
            return "restarted"
        return None

    async def pane_state(self) -> PaneState:
        state, signal = await self._read_pane()
        if state.dead and state.exit_code is None and signal is None:
            # The pane's program is gone but tmux has not reaped it yet. tmux 3.3 sometimes misses the
            # SIGCHLD of a program that exits right after it starts: the pane stays dead with no status
            # and the process a zombie until another child of the tmux server exits. A short background
            # job is such a child (tmux reaps every exited child when one signals), so start one and
            # read again until the status is there.
            await self.run("run-shell", "-b", "true", check=False)
            for _ in range(REAP_POLLS):
                await asyncio.sleep(REAP_POLL_S)
                state, signal = await self._read_pane()
                if not state.dead or state.exit_code is not None or signal is not None:
                    break
        return state

    async def _read_pane(self) -> tuple[PaneState, str | None]:
        """The pane's state and, for a program killed by a signal, the signal number."""
        if not self.socket.exists():
            return PaneState(exists=False), None
        fmt = ("#{pane_dead}\t#{pane_dead_status}\t#{window_activity}\t#{session_attached}\t#{pane_dead_signal}"
               "\t#{pane_pid}")
        proc = await asyncio.create_subprocess_exec(
            *self.argv("display-message", "-p", "-t", SESSION, fmt),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await reaped(proc, proc.communicate())
        if proc.returncode != 0:
            return PaneState(exists=False), None
        dead, status, activity, attached, signal, pid = ([*out.decode().strip("\n").split("\t"), *[""] * 6])[:6]
        return PaneState(
            exists=True,
            dead=dead == "1",
            exit_code=int(status) if dead == "1" and status.lstrip("-").isdigit() else None,
            # window_activity moves on every byte the pane writes, attached or not (1 s resolution).
            last_output_at=datetime.fromtimestamp(int(activity), UTC) if activity.isdigit() else None,
            clients=int(attached) if attached.isdigit() else 0,
            pane_pid=int(pid) if pid.isdigit() and dead != "1" else None,
        ), (signal if dead == "1" and signal.isdigit() else None)

    async def wait_pane_died(self) -> bool:
        """Block until the program exits (True; at once when it exited since the last call), or until
        the tmux server is gone (False)."""
        return await self.wait_for(PANE_DIED)

    async def wait_for(self, channel: str) -> bool:
        """Block until tmux signals ``channel`` (True; at once when it was signalled since the last wait),
        or until the tmux server is gone (False)."""
        if not self.socket.exists():
            return False
        proc = await asyncio.create_subprocess_exec(
            *self.argv("wait-for", channel), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        return await reaped(proc, proc.wait()) == 0

    async def capture(self) -> str:
        """The visible text of the program's pane."""
        return await self.run("capture-pane", "-p", "-t", SESSION)

    def attach_argv(self, readonly: bool) -> list[str]:
        return self.argv("attach-session", *(["-r"] if readonly else []), "-t", SESSION)

    async def save_scrollback(self) -> None:
        """Keep the pane's history and screen for the next start (see SCROLLBACK_FILE)."""
        text = await self.run("capture-pane", "-p", "-J", "-S", "-", "-E", "-", "-t", SESSION, check=False)
        if text.strip():
            self.saved_scrollback.write_text(text.rstrip("\n") + "\n", encoding="utf-8")

    async def kill_server(self) -> None:
        if self.socket.exists():
            with contextlib.suppress(OSError):
                await self.save_scrollback()
            await self.run("kill-server", check=False)
            # The client returns before the server has exited: a start now would reach the dying server
            # ("server exited unexpectedly"). Wait (briefly) until nothing answers on the socket.
            for _ in range(KILL_WAIT_POLLS):
                if not self._answers():
                    break
                await asyncio.sleep(0.01)

    def _answers(self) -> bool:
        """Whether a tmux server accepts connections on the socket."""
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True
