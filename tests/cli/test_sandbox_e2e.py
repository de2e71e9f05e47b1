"""Issue 16 end to end: `orz server` with two orgs on one machine; each breach is tried from inside a session
over plain ssh and refused, and forwarding, sftp and scp still work inside the sandbox."""

from __future__ import annotations

import contextlib
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.fullstack import Platform, running_platform
from tests.support import free_port, orz_env, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(any(shutil.which(b) is None for b in ("ssh", "scp", "sftp", "tmux", "git", "bwrap")),
                       reason="needs ssh, scp, sftp, tmux, git and bwrap"),
]
SECRET_A = "a-secret-" + "".join(random.choices("klmnopqrst", k=12))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("sbx")) as running:
        yield running


class User:
    """One org's developer: their own HOME, `orz` login and ssh config."""

    def __init__(self, platform: Platform, env: dict[str, str]) -> None:
        self.platform = platform
        self.env = env
        self.home = Path(env["HOME"])

    def orz(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=90, check=False)

    def new(self, *args: str) -> str:
        created = self.orz("cloud", "new", "--program", "bash", "--no-attach", "--wait", *args)
        assert created.returncode == 0, created.stderr
        assert self.orz("cloud", "ssh-config", "--write").returncode == 0
        return created.stdout.split()[1]

    def ssh_args(self, sid: str, *options: str) -> list[str]:
        return ["ssh", "-F", str(self.home / ".ssh" / "config"), "-o", "BatchMode=yes", *options, f"{sid}.orz"]

    def ssh(self, sid: str, command: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ssh_args(sid, *options), command], env=self.env, capture_output=True,
                              text=True, timeout=90, check=False)


@pytest.fixture(scope="module")
def alice(platform: Platform) -> User:
    return User(platform, platform.env)


@pytest.fixture(scope="module")
def bob(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> User:
    """A user of a second org, made with `orz admin` against the server's database."""
    db = ["--database-url", f"sqlite+aiosqlite:///{platform.data / 'orz.db'}"]
    for args in (("create-org", "beta"), ("create-user", "bob@beta.example", "--org", "beta")):
        done = platform.orz("admin", *args, *db)
        assert done.returncode == 0, done.stderr
    made = platform.orz("admin", "create-token", "bob@beta.example", *db)
    token = re.search(r"orz_\S+", made.stdout)
    assert token, made.stdout + made.stderr
    home = tmp_path_factory.mktemp("bob")
    env = orz_env(home, TERM="xterm")
    user = User(platform, env)
    login = user.orz("cloud", "login", "--token", token.group(0), "--api-url",
                     f"http://127.0.0.1:{platform.api_port}")
    assert login.returncode == 0, login.stderr
    return user


def host_processes(pattern: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if pattern in line and " Z" not in line and "ps -eo" not in line]


def test_a_second_org_cannot_reach_the_first_or_the_server(platform: Platform, alice: User, bob: User) -> None:
    assert alice.orz("cloud", "secrets", "create", "asecret", "--data", f"A_SECRET={SECRET_A}").returncode == 0
    sid_a = alice.new("--secrets", "asecret")
    wrote = alice.ssh(sid_a, "echo private-to-a > private.txt && printenv A_SECRET")
    assert wrote.returncode == 0 and wrote.stdout.strip() == SECRET_A, wrote.stderr  # secrets work inside
    sid_b = bob.new()

    data = platform.data
    targets = [data / "keys" / "ssh_ca", data / "keys" / "jwt_es256.pem", data / "keys" / "secrets.key",
               data / "orz.db", data / "sessions" / sid_a / "workspace" / "private.txt"]
    assert all(path.exists() for path in targets)  # they exist on the host...
    script = "; ".join(f"cat {path} >/dev/null 2>&1 && echo READ {path}" for path in targets)
    script += (f"; echo hits $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {SECRET_A})"
               "; echo procs $(ls -d /proc/[0-9]* | wc -l); echo uid $(id -u)")
    probed = bob.ssh(sid_b, script)
    assert probed.returncode == 0, probed.stderr
    assert "READ" not in probed.stdout, probed.stdout  # ...but not from B's session
    facts = dict(line.split(" ", 1) for line in probed.stdout.splitlines())
    assert facts["hits"] == "0" and int(facts["procs"]) < 20 and facts["uid"] != "0"
    uid_a = alice.ssh(sid_a, "id -u").stdout.strip()
    assert uid_a not in ("0", facts["uid"])

    # A clone of A's workspace by path is refused by the API, with a readable reason.
    cloned = bob.orz("cloud", "new", "--repo", f"file://{data}/sessions/{sid_a}/workspace", "--no-attach")
    assert cloned.returncode != 0 and "ORZ_REPO_FILE_DIRS" in cloned.stderr, cloned.stderr
    assert alice.orz("cloud", "kill", sid_a).returncode == 0


def test_stop_and_kill_end_every_process_of_the_session(bob: User) -> None:
    sid = bob.new()
    for action in ("stop", "kill"):
        n = random.randrange(100000, 200000) * 10  # n, n + 1 and n + 2 share the prefix n // 10
        started = bob.ssh(sid, f"nohup sleep {n} >/dev/null 2>&1 & setsid sleep {n + 1} >/dev/null 2>&1 </dev/null &"
                               f" ( ( sleep {n + 2} >/dev/null 2>&1 </dev/null & ) & ); echo started")
        assert started.stdout.strip() == "started", started.stderr
        wait_until(lambda n=n: len(host_processes(f"sleep {n // 10}")) >= 3, timeout=10, what="the detached sleeps")
        done = bob.orz("cloud", action, sid)
        assert done.returncode == 0, done.stderr
        wait_until(lambda n=n: not host_processes(f"sleep {n // 10}"), timeout=15,
                   what=f"no process left after {action}")
        if action == "stop":
            woke = bob.ssh(sid, "echo awake")  # wake on connect, inside the sandbox
            assert woke.stdout.strip() == "awake", woke.stderr


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello-from-the-laptop")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def laptop_http() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_forwarding_sftp_and_scp_work_inside_the_sandbox(bob: User, tmp_path: Path) -> None:
    sid = bob.new()
    # scp up, sftp down
    local = tmp_path / "up.txt"
    local.write_text("through scp\n")
    up = subprocess.run(["scp", "-F", str(bob.home / ".ssh" / "config"), "-o", "BatchMode=yes", str(local),
                         f"{sid}.orz:copied.txt"], env=bob.env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    batch = tmp_path / "batch"
    batch.write_text(f"get copied.txt {tmp_path / 'down.txt'}\n")
    down = subprocess.run(["sftp", "-F", str(bob.home / ".ssh" / "config"), "-o", "BatchMode=yes", "-b",
                           str(batch), f"{sid}.orz"], env=bob.env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "down.txt").read_text() == "through scp\n"

    # -L: a server on the session's own loopback, reached from the laptop
    port = random.randrange(20000, 30000)
    served = bob.ssh(sid, f"setsid python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 </dev/null & "
                          f"for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; "
                          "sleep 0.1; done; echo up")
    assert served.stdout.strip() == "up", served.stderr
    local_port = free_port()
    tunnel = subprocess.Popen([*bob.ssh_args(sid, "-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                             f"{local_port}:127.0.0.1:{port}")], env=bob.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listing() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return "copied.txt" in httpx.get(f"http://127.0.0.1:{local_port}/", timeout=2).text
            return False
        wait_until(listing, timeout=30, what="the -L forward")
    finally:
        tunnel.terminate()
        tunnel.wait(10)

    # -R: the laptop's server, reached from inside the session's loopback
    with laptop_http() as laptop_port:
        remote_port = random.randrange(30000, 40000)
        fetched = bob.ssh(sid, f"curl -s http://127.0.0.1:{remote_port}/", "-o", "ExitOnForwardFailure=yes",
                          "-R", f"{remote_port}:127.0.0.1:{laptop_port}")
    assert fetched.stdout == "hello-from-the-laptop", fetched.stderr

    # the session cannot reach the host's other loopback services (the laptop server is on this host too)
    with laptop_http() as host_port:
        direct = bob.ssh(sid, f"curl -s -m 3 http://127.0.0.1:{host_port}/ || echo unreachable")
    assert direct.stdout.strip() == "unreachable"
    assert bob.orz("cloud", "kill", sid).returncode == 0


def test_orz_cloud_logs_shows_only_what_the_session_wrote_and_obeys_none_of_it(platform: Platform, bob: User) -> None:
    """The init log is a file of the session's: the server reads it as root and the CLI prints it on the
    user's terminal. A link in its place reads as no log, and a terminal's commands in it are shown, not sent."""
    sid = bob.new()
    key = platform.data / "keys" / "ssh_ca"
    state = platform.data / "sessions" / sid / "state"
    linked = bob.ssh(sid, f"ln -sfn {key} {state}/init.log && echo linked")
    assert linked.stdout.strip() == "linked", linked.stderr
    shown = bob.orz("cloud", "logs", sid)
    assert "PRIVATE KEY" not in shown.stdout + shown.stderr
    assert key.read_text() not in shown.stdout

    # OSC 52 sets the clipboard of the terminal that prints it, OSC 0 its title; CSI 2J clears the screen
    wrote = bob.ssh(sid, f"rm {state}/init.log; printf 'pip ok\\033]52;c;cm0gLXJmIH4=\\007\\033]0;t\\007"
                         f"\\033[2J\\033[32mgreen\\033[0m\\n' > {state}/init.log && echo wrote")
    assert wrote.stdout.strip() == "wrote", wrote.stderr
    shown = bob.orz("cloud", "logs", sid)
    assert shown.returncode == 0, shown.stderr
    assert "pip ok" in shown.stdout and "green" in shown.stdout
    assert "\x1b]" not in shown.stdout and "\x07" not in shown.stdout and "\x1b[2J" not in shown.stdout
    assert "^[]52;c;cm0gLXJmIH4=^G" in shown.stdout  # shown, readable, for what it is
    assert bob.orz("cloud", "kill", sid, "--force").returncode == 0


def test_a_session_spends_only_its_own_sign_in_attempts(platform: Platform, bob: User) -> None:
    """The API counts sign-in attempts per client address; a session reaches the API through the launcher's
    relay, which must not make it the host's 127.0.0.1 (it would lock everyone on this machine out)."""
    sid = bob.new()
    url = f"http://127.0.0.1:{platform.api_port}/v1/auth/exchange"
    spent = bob.ssh(sid, "for i in $(seq 30); do curl -s -o /dev/null -w '%{http_code} ' -XPOST "
                         f"-H 'content-type: application/json' -d '{{\"github_token\": \"x\"}}' {url}; done")
    assert spent.stdout.split()[-1] == "429", spent.stdout + spent.stderr  # the limit holds for the session
    from_host = httpx.post(url, json={"github_token": "x"}, timeout=10)
    assert from_host.status_code != 429, from_host.text
    assert bob.orz("cloud", "kill", sid, "--force").returncode == 0


def test_orz_cloud_replay_draws_the_pane_but_sends_nothing_else_to_the_terminal(platform: Platform, bob: User) -> None:
    """The recording is the pane's bytes before tmux filtered them: a program in the session may print what
    would set the user's clipboard (OSC 52) or make the terminal type an answer into the shell (CSI 6n)."""
    sid = bob.new()
    state = platform.data / "sessions" / sid / "state"
    line = r"printf '\033]52;c;cm0gLXJmIH4=\007\033[6n\033[32mgreen-mark\033[0m\n'"
    typed = bob.ssh(sid, f"tmux -S {state}/tmux.sock send-keys -t main {shlex.quote(line)} Enter && echo typed")
    assert typed.stdout.strip() == "typed", typed.stderr

    def recorded() -> bool:
        saved = bob.orz("cloud", "replay", sid, "-o", "-")
        return saved.stdout.count("green-mark") >= 2  # the command line's echo, then its output
    wait_until(recorded, timeout=60, interval=1, what="the printf in the recording")
    played = bob.orz("cloud", "replay", sid, "--speed", "1000", "--idle-limit", "0.01")
    assert played.returncode == 0, played.stderr
    assert "\x1b[32mgreen-mark\x1b[0m" in played.stdout  # drawing is kept
    assert "\x1b]52" not in played.stdout and "\x1b[6n" not in played.stdout
    assert bob.orz("cloud", "kill", sid, "--force").returncode == 0


def test_the_gateway_connects_to_the_sessions_socket_and_never_where_a_link_points(bob: User) -> None:
    """The runner's socket is in the session's own state dir: a symlink the session puts in its place
    (to another session's socket, or any the server can reach) is not followed by the gateway (root)."""
    sid = bob.new()
    elsewhere = Path(tempfile.mkdtemp(prefix="orz-link-")) / "elsewhere.sock"  # short: a socket path has 108 bytes
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(elsewhere))
    listener.listen(4)
    listener.settimeout(0.5)
    try:
        state = bob.platform.data / "sessions" / sid / "state"
        linked = bob.ssh(sid, f"mv {state}/ssh.sock {state}/ssh.sock.real && ln -s {elsewhere} {state}/ssh.sock "
                              "&& echo linked")
        assert linked.stdout.strip() == "linked", linked.stderr
        refused = subprocess.run([*bob.ssh_args(sid, "-o", "ConnectTimeout=20"), "true"], env=bob.env,
                                 capture_output=True, text=True, timeout=90, check=False)
        assert refused.returncode != 0
        with contextlib.suppress(TimeoutError):
            accepted, _ = listener.accept()
            accepted.close()
            raise AssertionError("the gateway connected where the session's link pointed")
    finally:
        listener.close()
        shutil.rmtree(elsewhere.parent, ignore_errors=True)
    assert bob.orz("cloud", "kill", sid, "--force").returncode == 0


FORGED_FATAL = r"""
import json, os, sys, urllib.request
env = dict(line.split("=", 1) for line in open("/proc/2/environ").read().split("\0") if "=" in line)
api = json.loads(env["ORZ_RUNNER_SPEC"])["api_url"]
body = json.dumps({"fatal_error": "boom \x1b]0;TITLE\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07"}).encode()
req = urllib.request.Request(f"{api}/internal/v1/instances/{os.environ['ORZ_SESSION_ID']}/heartbeat", data=body,
                             headers={"Authorization": "Bearer " + env["ORZ_RUNNER_TOKEN"],
                                      "content-type": "application/json"})
print(urllib.request.urlopen(req).status)
"""


def test_a_failure_reason_the_session_wrote_reaches_no_terminal_as_commands(platform: Platform, bob: User) -> None:
    """A session holds its own runner token (docs/security.md) and so writes its failure's reason: the
    operator's `orz server` terminal and the user's `orz cloud status` show it without obeying it."""
    sid = bob.new()
    # The API fails the session on that heartbeat and the gateway ends the connection, often before the
    # script's "200" gets back through it: the session's failure is what shows the heartbeat was taken.
    sent = bob.ssh(sid, f"python3 -c {shlex.quote(FORGED_FATAL)}")
    wait_until(lambda: f"session {sid}: running -> failed" in platform.screen.read_text(), timeout=20,
               what=f"the failure on the server's terminal (the script said {sent.stdout + sent.stderr!r})")
    screen = platform.screen.read_text()
    assert "boom" in screen and "TITLE" in screen  # shown...
    assert "\x1b" not in screen and "\x07" not in screen  # ...without a single escape
    status = bob.orz("cloud", "status", sid)
    assert "boom" in status.stdout and "\x1b" not in status.stdout
    assert bob.orz("cloud", "kill", sid, "--force").returncode == 0
