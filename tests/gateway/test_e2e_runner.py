"""End to end with the REAL runner (runner/main.py: git clone, tmux, its internal SSH endpoint) behind the
gateway, driven by real OpenSSH clients. Only the API is a stand-in (tests/gateway/standins.FakeApi).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import os
import pwd
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from gateway import splice
from runner import sshd
from tests.gateway.conftest import SESSION, Env, gateway_env, run
from tests.runner.conftest import (  # noqa: F401  (fixtures)
    GatewayKey,
    MakeRepo,
    StartRunner,
    fake_api,
    gateway_key,
    make_repo,
    short_tmp,
    start_runner,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

if not shutil.which("tmux") or not shutil.which("git"):
    pytest.skip("tmux and git are needed for the real runner", allow_module_level=True)

PROGRAM = "bash -c 'echo hi; while read line; do [ \"$line\" = ping ] && echo pong; done'"


@pytest.fixture(params=[True], ids=["runner-fast-path"])
async def e2e(request: pytest.FixtureRequest, tmp_path: Path, make_repo: MakeRepo,  # noqa: F811
              start_runner: StartRunner, gateway_key: GatewayKey) -> AsyncIterator[Env]:  # noqa: F811
    """The gateway in front of a real runner; ``request.param`` is the runner's fast path (runner_fast_path)."""
    handle = await start_runner(make_repo({"README": "x\n"}), program=PROGRAM, name=SESSION,
                                fast_path=request.param)
    await handle.ready()
    activity = handle.runner.activity
    route = {"host": "127.0.0.1", "port": activity.ssh_port, "host_key": activity.host_key}
    async with gateway_env(tmp_path, client_key=gateway_key.private, route=route) as built:
        built.runner.workspace = Path(handle.spec.workspace)
        yield built


async def test_tty_attach_shows_program_and_answers_ping(e2e: Env) -> None:
    argv = [*e2e.base_args(), "-tt", *e2e.cert_args(), f"{SESSION}@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout
    seen = b""
    try:
        while b"hi" not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 15)
        proc.stdin.write(b"ping\r")
        while b"pong" not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 15)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone (the failure, if any, is above)
            proc.kill()
        await proc.wait()


def runner_side(paths: list[splice.FastPath]) -> list[splice.FastPath]:
    """The runner endpoint's fast paths (the others are the gateway's)."""
    return [p for p in paths if type(p.conn).__module__ == "runner.sshd"]


async def read_until(stream: asyncio.StreamReader, seen: bytes, needle: bytes, start: int = 0) -> bytes:
    """`seen` and what `stream` sends until `needle` is in it past `start` (b"": anything past it)."""
    while needle not in seen[start:] or len(seen) <= start:
        chunk = await asyncio.wait_for(stream.read(65536), 15)
        assert chunk, f"closed before {needle[-40:]!r}; got {seen[-300:]!r}"
        seen += chunk
    return seen


@contextlib.asynccontextmanager
async def typing_user(e2e: Env) -> AsyncIterator[tuple[asyncio.subprocess.Process, bytes]]:
    """OpenSSH attached with a tty (no escape key), once the program's greeting is on screen: the process
    and what it showed so far. Killed and reaped after."""
    argv = [*e2e.base_args(), "-tt", "-e", "none", *e2e.cert_args(), f"{SESSION}@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout
    try:
        yield proc, await read_until(proc.stdout, b"", b"hi")
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone (the failure, if any, is above)
            proc.kill()
        await proc.wait()


async def test_keys_and_echoes_take_the_runners_fast_path(e2e: Env, fast_paths: list[splice.FastPath],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner endpoint opens keys and seals echoes itself (gateway.splice) while a pty is attached: what
    # the user types and sees is the same as through asyncssh, and each key really went that way. Counted
    # in bytes on asyncssh's side, not in packets: two quick keys may travel as one packet.
    typing = False
    via_asyncssh: list[bytes] = []  # keys asyncssh's channel delivered while typing
    declined: list[int] = []  # echoes the runner's fast path left to asyncssh while typing
    slow_keys, send_data = sshd._PtyBridge._data_received, splice.FastPath.send_data

    def spy_keys(self: sshd._PtyBridge, data: bytes, datatype: asyncssh.DataType) -> None:
        if typing:
            via_asyncssh.append(data)
        slow_keys(self, data, datatype)

    def spy_echoes(self: splice.FastPath, chan: object, data: bytes) -> bool:
        sent = send_data(self, chan, data)
        if typing and not sent and type(self.conn).__module__ == "runner.sshd":
            declined.append(len(data))
        return sent

    monkeypatch.setattr(sshd._PtyBridge, "_data_received", spy_keys)
    monkeypatch.setattr(splice.FastPath, "send_data", spy_echoes)
    async with typing_user(e2e) as (proc, seen):
        runner = runner_side(fast_paths)
        assert runner, "the runner's endpoint made no fast path"
        # As the gateway's own guard (test_splice.py): name what a newer asyncssh dropped, if anything.
        missing = sorted({m for p in runner
                          for m in splice.missing_state(p.conn, *(leg.src for leg in p.legs.values()))})
        assert not missing, f"asyncssh {asyncssh.__version__} lacks what the runner's fast path needs: {missing}"
        assert any(p.legs for p in runner), "the attached pty is not on the runner's fast path"
        before = sum(p.relayed_packets for p in runner), sum(p.sent for p in runner)
        typing = True
        await type_and_see(proc, seen, TYPED)
        typing = False
        assert via_asyncssh == [] and declined == []  # every key, and every echo, on the fast path
        assert sum(p.relayed_packets for p in runner) > before[0] and sum(p.sent for p in runner) > before[1]


TYPED = b"alpha\rbravo\rping\r"


async def type_and_see(proc: asyncio.subprocess.Process, seen: bytes, typed: bytes) -> bytes:
    """Type one key at a time, as a user does (each echo drawn before the next key), then see the pong."""
    assert proc.stdin and proc.stdout
    mark = len(seen)
    for key in typed:
        mark = len(seen)
        proc.stdin.write(bytes((key,)))
        seen = await read_until(proc.stdout, seen, b"" if key == ord("\r") else bytes((key,)), mark)
    return await read_until(proc.stdout, seen, b"pong", mark)


@pytest.mark.parametrize("e2e", [False], indirect=True, ids=["runner-fast-path-off"])
async def test_with_the_runners_fast_path_off_keys_and_echoes_go_through_asyncssh(
        e2e: Env, fast_paths: list[splice.FastPath]) -> None:
    # runner_fast_path=false, the kill switch should a newer asyncssh break the runner's fast path: the
    # same keys and echoes, and the runner's endpoint made no fast path, so each went through asyncssh's
    # channel. The gateway's own fast path is its setting (gateway_fast_path) and stays on.
    async with typing_user(e2e) as (proc, seen):
        await type_and_see(proc, seen, TYPED)
        assert fast_paths, "the gateway made no fast path: the spy saw nothing"
        assert runner_side(fast_paths) == [], "the runner's endpoint made a fast path though it is off"


async def test_a_pty_carries_megabytes_exactly_both_ways_on_the_runners_fast_path(
        e2e: Env, fast_paths: list[splice.FastPath]) -> None:
    # More than the channel windows (2 MiB) each way: the runner's fast path keeps the window accounting
    # (its WINDOW_ADJUSTs, the gateway's) right, and steps aside and back when asyncssh holds data.
    sent = base64.b64encode(os.urandom(3 * 1024 * 1024 // 4 * 3))
    script = f"stty raw -echo; printf 'go\\n'; head -c {len(sent)} > got.txt; printf 'done\\n'; cat got.txt"
    argv = [*e2e.base_args(), "-tt", "-e", "none", *e2e.cert_args(), f"{SESSION}@127.0.0.1", script]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout
    try:
        seen = await read_until(proc.stdout, b"", b"go\n")
        proc.stdin.write(sent)
        seen = await read_until(proc.stdout, b"", b"done\n")
        back = seen[seen.index(b"done\n") + 5:]
        while len(back) < len(sent):
            chunk = await asyncio.wait_for(proc.stdout.read(1 << 20), 30)
            assert chunk, f"{len(back)} of {len(sent)} bytes came back"
            back += chunk
        assert back[:len(sent)] == sent
        assert (e2e.runner.workspace / "got.txt").read_bytes() == sent
        runner = runner_side(fast_paths)
        assert sum(p.relayed_packets for p in runner) > 0 and sum(p.sent for p in runner) > 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone (the failure, if any, is above)
            proc.kill()
        await proc.wait()


async def test_exec_status_and_stderr_through_real_runner(e2e: Env) -> None:
    result = await e2e.ssh(*e2e.cert_args(), "--", "sh -c 'echo out; echo err >&2; exit 3'")
    assert result.returncode == 3, result
    assert result.stdout == b"out\n" and b"err\n" in result.stderr


async def test_sftp_through_real_runner(e2e: Env) -> None:
    data = os.urandom(100_000)
    (e2e.tmp / "up.bin").write_bytes(data)
    batch = e2e.tmp / "batch"
    batch.write_text(f"put {e2e.tmp / 'up.bin'} up.bin\nget up.bin {e2e.tmp / 'back.bin'}\n")
    opts = [a for a in e2e.base_args()[1:] if a not in ("-p", str(e2e.port))] + e2e.cert_args()
    result = await run("sftp", "-P", str(e2e.port), "-b", str(batch), *opts, target=f"{SESSION}@127.0.0.1")
    assert result.returncode == 0, result
    assert (e2e.tmp / "back.bin").read_bytes() == data
    assert (e2e.runner.workspace / "up.bin").read_bytes() == data


async def test_sftp_symlink_through_real_runner_makes_the_link_the_client_named(e2e: Env) -> None:
    # OpenSSH's sftp sends SYMLINK's two paths in its own (reversed) order; asyncssh's server reads them so
    # only when its client's version says OpenSSH, and the runner's client is the gateway.
    (e2e.runner.workspace / "target.txt").write_text("x")
    batch = e2e.tmp / "batch"
    batch.write_text("symlink target.txt link.txt\n")
    opts = [a for a in e2e.base_args()[1:] if a not in ("-p", str(e2e.port))] + e2e.cert_args()
    result = await run("sftp", "-P", str(e2e.port), "-b", str(batch), *opts, target=f"{SESSION}@127.0.0.1")
    assert result.returncode == 0, result
    assert os.readlink(e2e.runner.workspace / "link.txt") == "target.txt"
    assert (e2e.runner.workspace / "target.txt").read_text() == "x"


async def test_sftp_ls_l_of_a_file_names_owner_and_group_as_sftp_server_does(e2e: Env) -> None:
    """OpenSSH's sftp renders `ls -l FILE` from the attributes (numbers only) and asks the server for the
    names (users-groups-by-id@openssh.com); an id with no name stays a number, as with sftp-server."""
    (e2e.runner.workspace / "mine.txt").write_text("hello")
    orphan = e2e.runner.workspace / "orphan.txt"
    orphan.write_text("x")
    unnamed = 4_000_321  # no passwd or group entry
    if os.geteuid() == 0:
        os.chown(orphan, unnamed, unnamed)
    batch = e2e.tmp / "batch"
    batch.write_text("ls -l mine.txt\nls -l orphan.txt\nls -l\n")
    opts = [a for a in e2e.base_args()[1:] if a not in ("-p", str(e2e.port))] + e2e.cert_args()
    result = await run("sftp", "-P", str(e2e.port), "-b", str(batch), *opts, target=f"{SESSION}@127.0.0.1")
    assert result.returncode == 0, result
    lines = [line.split() for line in result.stdout.decode().splitlines() if not line.startswith("sftp>")]
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    mine = next(fields for fields in lines if fields[-1] == "mine.txt")
    assert mine[0] == "-rw-r--r--" and mine[2:5] == [user, group, "5"], result.stdout
    if os.geteuid() == 0:
        assert next(fields for fields in lines if fields[-1] == "orphan.txt")[2:4] == [str(unnamed)] * 2
    listed = [fields for fields in lines if fields[-1] == "mine.txt"]
    assert len(listed) == 2 and listed[0] == listed[1], result.stdout  # the same line alone and in the listing


async def test_agent_forwarding_only_when_asked(e2e: Env) -> None:
    sock = e2e.tmp / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(sock),
                                                 stdout=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        key = e2e.user_key("agentkey")
        added = await run("ssh-add", str(key), env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        assert added.returncode == 0, added
        fingerprint = (await run("ssh-keygen", "-lf", str(key))).stdout.split()[1]
        # IdentityAgent=none would hide the agent from ssh itself (and cancel -A): point it at ours.
        argv = [*e2e.base_args(identity_agent=str(sock)), "-A", *e2e.cert_args(), f"{SESSION}@127.0.0.1",
                "ssh-add -l"]
        forwarded = await run(*argv)
        assert forwarded.returncode == 0, forwarded
        assert fingerprint in forwarded.stdout
        plain = await e2e.ssh(*e2e.cert_args(), "--", "ssh-add -l")
        assert plain.returncode != 0 and fingerprint not in plain.stdout
        # Without -A the session has no agent socket at all (not one whose use fails with
        # "communication with agent failed"); the runner builds one environment for commands and the pty.
        unset = await e2e.ssh(*e2e.cert_args(), "--", 'echo "agent=${SSH_AUTH_SOCK-unset}"')
        assert unset.stdout == b"agent=unset\n", unset
        with_a = await run(*[*e2e.base_args(identity_agent=str(sock)), "-A", *e2e.cert_args(),
                             f"{SESSION}@127.0.0.1", 'echo "agent=${SSH_AUTH_SOCK-unset}"'])
        assert with_a.stdout.startswith(b"agent=/"), with_a
    finally:
        agent.kill()
        await agent.wait()
