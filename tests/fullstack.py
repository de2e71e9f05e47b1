"""A whole platform for end-to-end tests: `orz server` (API, gateway, scheduler, local runners) as a
real process with its own HOME, data dir and free ports."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pexpect
import pytest

from tests.support import ROOT, free_port, kill_processes_under, orz_env, stop_process, wait_for_http, wait_until

# Marks for tests that drive the whole platform with the real clients.
FULLSTACK_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(any(shutil.which(b) is None for b in ("ssh", "tmux", "git")),
                       reason="needs ssh, tmux and git"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("gateway.server", "runner.main")),
                       reason="needs the gateway and runner packages"),
]


@dataclass
class Platform:
    home: Path
    data: Path
    env: dict[str, str]
    terminal: TextIO  # everything the terminals showed, for reading after a failure
    api_port: int
    ssh_port: int
    web_port: int
    log: Path  # the server's log file (JSON lines; the terminal's share is in `screen`)
    screen: Path  # what `orz server` printed: the banner and one line per event

    def orz(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=self.env, cwd=cwd or ROOT,
                              capture_output=True, text=True, timeout=60, check=False)

    def bash_session(self) -> tuple[str, str]:
        """A running session whose program is bash, and the ssh config `ssh <id>.orz` reads (written)."""
        created = self.orz("cloud", "new", "--program", "bash", "--no-attach", "--wait", cwd=self.home)
        assert created.returncode == 0, created.stderr
        written = self.orz("cloud", "ssh-config", "--write")
        assert written.returncode == 0, written.stderr
        return created.stdout.split()[1], str(self.home / ".ssh" / "config")

    def spawn(self, command: str, *args: str, cwd: Path | None = None) -> pexpect.spawn:
        child = pexpect.spawn(command, list(args), env=self.env, cwd=str(cwd or ROOT), encoding="utf-8",
                              timeout=20, dimensions=(24, 80))
        child.logfile_read = self.terminal
        return child


@contextlib.contextmanager
def running_platform(base: Path, **settings: str) -> Iterator[Platform]:
    """Start `orz server` under ``base``; ``settings`` are extra ORZ_* environment variables."""
    home, data = base / "home", base / "data"
    home.mkdir()
    api_port, ssh_port, web_port = free_port(), free_port(), free_port()
    env = orz_env(home, ORZ_PROVIDER="local", ORZ_LOG_JSON="true", TERM="xterm", **settings)
    with (base / "server.out").open("w") as server_log, (base / "terminal.log").open("w") as terminal:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "server", "--api-port", str(api_port), "--ssh-port", str(ssh_port),
             "--web-port", str(web_port), "--data-dir", str(data)],
            env=env, cwd=ROOT, stdout=server_log, stderr=server_log,
        )
        try:
            wait_for_http(server, *(f"http://127.0.0.1:{port}/healthz" for port in (api_port, web_port)),
                          what="orz server", exited=lambda: f"orz server exited; see {base / 'server.out'}")
            wait_until((home / ".config" / "orzbob" / "token.json").exists, timeout=10, what="the CLI login")
            yield Platform(home=home, data=data, env=env, terminal=terminal, api_port=api_port,
                           ssh_port=ssh_port, web_port=web_port, log=data / "logs" / "server.log",
                           screen=base / "server.out")
        finally:
            # A loaded machine may take a while to stop every session; past the time out the server is
            # killed, and what it had started must not outlive the test.
            stop_process(server, timeout=60)
            if server.returncode == -signal.SIGKILL and kill_processes_under(base):
                print(f"orz server under {base} did not stop within 60 s; its sessions were killed", file=sys.stderr)


@contextlib.contextmanager
def gateway_process(platform: Platform, ssh_port: int, web_port: int, name: str = "gateway2",
                    **settings: str) -> Iterator[subprocess.Popen[bytes]]:
    """Another gateway replica in front of the platform's API: `orz gateway` as its own process, with the
    same keys and service token; ``settings`` are extra ORZ_* environment variables. Listening when
    yielded (/healthz: its /readyz waits for the CA, which the API makes on the first attach); on exit
    SIGTERM, and SIGKILL if it has not ended 30 s later."""
    keys = platform.data / "keys"
    env = {**platform.env, "ORZ_DATA_DIR": str(platform.data),
           "ORZ_PUBLIC_API_URL": f"http://127.0.0.1:{platform.api_port}",
           "ORZ_SERVICE_TOKEN": (keys / "service_token").read_text().strip(),
           "ORZ_GATEWAY_CLIENT_KEY_FILE": str(keys / "gateway_client_ed25519"), **settings}
    log_path = platform.log.parent / f"{name}.log"
    with log_path.open("a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--ssh-port", str(ssh_port),
                                 "--web-port", str(web_port)], env=env, cwd=ROOT, stdout=log, stderr=log)
        try:
            wait_for_http(proc, f"http://127.0.0.1:{web_port}/healthz", what=f"the gateway {name}", timeout=30,
                          exited=lambda: f"orz gateway exited; see {log_path}")
            yield proc
        finally:
            stop_process(proc, signal.SIGTERM)


DETACH = "\x02d"  # tmux prefix Ctrl-b, then d


def wait_for_tmux(child: pexpect.spawn) -> None:
    """Type only once tmux has drawn its status line: keys sent during the handshake may be lost."""
    child.expect(r"\[main\]")
    time.sleep(0.3)


def type_and_see(child: pexpect.spawn, word: str) -> None:
    # Split the word in the command so the echo of what we type cannot match, only the output.
    child.sendline(f"echo {word[:2]}''{word[2:]}")
    child.expect(word)


def detach(child: pexpect.spawn) -> None:
    child.send(DETACH)
    child.expect(r"detached")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
