"""The local provider's sandbox with real bwrap, slirp4netns and runners: what one session can reach.

Each session runs a probe as its `setup.init` (a shell script from its repository, so exactly what a
user's code could run) and writes what it saw into its workspace; the test reads that from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from api.instances.providers import sandbox
from api.instances.providers.local import LocalProvider, process_start_time
from api.instances.providers.sandbox import SandboxUnavailable
from api.settings import Settings
from tests.api.lifecycle_support import local_provider
from tests.api.test_local_provider import compute_spec, ready
from tests.runner import conftest as runner_fixtures
from tests.runner.fake_api import FakeApi
from tests.support import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("bwrap", "slirp4netns", "tmux", "git")),
                       reason="needs bwrap, slirp4netns, tmux and git (hack/setup.sh installs them)"),
]

short_tmp = runner_fixtures.short_tmp
make_repo = runner_fixtures.make_repo
gateway_key = runner_fixtures.gateway_key
fake_api = runner_fixtures.fake_api

SECRET_A = "value-of-a-" + "".join(random.choices("abcdefghij", k=12))  # nosec B311


@pytest.fixture
def host_ports() -> Iterator[tuple[int, int]]:
    """Two TCP listeners on the host's loopback: the first is allowed into sessions, the second is not."""
    servers = [subprocess.Popen(["python3", "-c", PY_LISTENER], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        ports = tuple(int(s.stdout.readline()) for s in servers)  # type: ignore[union-attr]
        yield ports  # type: ignore[misc]
    finally:
        for s in servers:
            s.kill()
            s.wait()
            s.stdout.close()  # type: ignore[union-attr]


PY_LISTENER = """
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello-from-host\\n"); c.close()
"""


@pytest.fixture
async def provider(short_tmp: Path, host_ports: tuple[int, int]) -> AsyncIterator[LocalProvider]:
    data = short_tmp / "data"
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "ssh_ca").write_text("PRIVATE-CA-KEY\n")
    (data / "orz.db").write_text("DATABASE\n")
    async with local_provider(Settings(data_dir=data, repo_file_dirs=str(short_tmp), log_level="DEBUG",
                                       sandbox_allow_host_ports=str(host_ports[0]))) as p:
        yield p


def probe(data: Path, other: str, ports: tuple[int, ...], sleep_s: int) -> str:
    """The shell script a session runs: each line is one fact the test checks."""
    checks = "\n".join(
        f'[ -r "{path}" ] && echo "readable {path}" || echo "hidden {path}"'
        for path in (data / "keys" / "ssh_ca", data / "orz.db", data / "sessions" / other / "workspace" / "README",
                     ROOT / "pyproject.toml", ROOT / ".git" / "HEAD"))
    conns = "\n".join(
        f'(exec 3<>/dev/tcp/127.0.0.1/{port} && head -1 <&3) >/dev/null 2>&1 '
        f'&& echo "port {port} open" || echo "port {port} closed"' for port in ports)
    return f"""set -u
echo "uid $(id -u)"
echo "procs $(ls -d /proc/[0-9]* | wc -l)"
echo "environ-hits $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {SECRET_A})"
echo "tmp $(ls -A /tmp | tr '\\n' ' ')"
echo "sessions $(ls -A {data / 'sessions'} | tr '\\n' ' ')"
touch /tmp/marker-$ORZ_SESSION_ID-{SECRET_A}
{checks}
{conns}
# Detached so that they outlive init (the runner ends init's process group when it is done).
setsid nohup sleep {sleep_s} >/dev/null 2>&1 </dev/null &
setsid sleep {sleep_s + 1} >/dev/null 2>&1 </dev/null &
( ( setsid sleep {sleep_s + 2} >/dev/null 2>&1 </dev/null & ) & )
for i in $(seq 250); do  # until all three have left init's process group (they run sleep by then)
  [ "$(grep -lx sleep /proc/[0-9]*/comm 2>/dev/null | wc -l)" -ge 3 ] && break; sleep 0.02
done
echo done
"""


def config(script: str) -> dict[str, str]:
    return {".orz/cloud.yaml": 'version: "1.0"\nsetup:\n  init: bash .orz/probe.sh > probe.txt 2>&1\n',
            ".orz/probe.sh": script, "README": "private to this session\n"}


def leftovers(sleep_s: int) -> list[str]:
    """Host processes still running any of the probe's sleeps."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and process_start_time(int(pid)) is not None:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(f"sleep {sleep_s + i}" in cmd for i in range(3)):
                found.append(f"{pid}: {cmd}")
    return found


async def all_three_running(sleep_s: int) -> bool:
    for _ in range(100):  # the probe's background shells may still be on their way to exec sleep
        if len(leftovers(sleep_s)) == 3:
            return True
        await asyncio.sleep(0.05)
    return False


async def no_leftovers(sleep_s: int) -> list[str]:
    for _ in range(40):  # the kernel ends a namespace's processes asynchronously
        if not (left := leftovers(sleep_s)):
            return []
        await asyncio.sleep(0.05)
    return left


async def started(provider: LocalProvider, fake_api: FakeApi, sid: str) -> None:
    """Wait for the ready heartbeat; on a timeout, show the runner's log."""
    try:
        await ready(fake_api, sid)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await provider.read_log(sid, {})}") from None


async def test_two_sessions_see_nothing_of_each_other_or_the_server(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key, short_tmp: Path,
        host_ports: tuple[int, int]) -> None:
    data = short_tmp / "data"
    sleep_a, sleep_b = (random.randrange(40000, 50000) * 3 for _ in range(2))  # nosec B311
    ports = (*host_ports, 5432)
    spec_a = compute_spec("sbx-a", fake_api, gateway_key, make_repo(config(probe(data, "sbx-b", ports, sleep_a))),
                          secrets={"A_SECRET": SECRET_A})
    state_a = await provider.create(spec_a)
    await started(provider, fake_api, "sbx-a")
    spec_b = compute_spec("sbx-b", fake_api, gateway_key, make_repo(config(probe(data, "sbx-a", ports, sleep_b))))
    state_b = await provider.create(spec_b)
    await started(provider, fake_api, "sbx-b")
    seen_a = (provider.session_dir("sbx-a") / "workspace" / "probe.txt").read_text().splitlines()
    seen_b = (provider.session_dir("sbx-b") / "workspace" / "probe.txt").read_text().splitlines()
    assert seen_b[-1] == "done", seen_b

    uid_a, uid_b = (int(s[0].split()[1]) for s in (seen_a, seen_b))
    assert 0 not in (uid_a, uid_b) and uid_a != uid_b
    assert int(seen_b[1].split()[1]) < 20  # its own processes only, not the host's
    assert "environ-hits 0" in seen_b  # A's secret is not visible from B
    assert "environ-hits 0" not in seen_a  # ... though A's own processes have it (the probe works)
    assert "marker-" not in seen_b[3]  # a private /tmp: A's marker is not there
    assert seen_b[4].split() == ["sessions", "sbx-b"]  # the data dir shows only its own session
    assert not list(Path("/tmp").glob(f"marker-sbx-*-{SECRET_A}"))  # nor on the host
    for path in (data / "keys" / "ssh_ca", data / "orz.db", data / "sessions" / "sbx-a" / "workspace" / "README"):
        assert f"hidden {path}" in seen_b
    # of the checkout the server runs from, only the packages the runner imports
    assert f"hidden {ROOT / 'pyproject.toml'}" in seen_b and f"hidden {ROOT / '.git' / 'HEAD'}" in seen_b
    allowed, denied = host_ports
    assert f"port {allowed} open" in seen_b  # ORZ_SANDBOX_ALLOW_HOST_PORTS
    assert f"port {denied} closed" in seen_b and "port 5432 closed" in seen_b

    # cgroup v1: the session's pids limit is set on its own group
    launcher_groups = Path(f"/proc/{state_b['pid']}/cgroup").read_text()
    assert "orz-sbx-b" in launcher_groups
    pids_dir = next(line.split(":")[2] for line in launcher_groups.splitlines() if ":pids:" in line)
    assert Path(f"/sys/fs/cgroup/pids{pids_dir}/pids.max").read_text().strip() == str(
        provider.settings.sandbox_pids_max)

    # stop ends every process the session started, however it was detached
    assert await all_three_running(sleep_b), leftovers(sleep_b)  # running before the stop
    await provider.stop("sbx-b", state_b)
    assert await no_leftovers(sleep_b) == []
    # kill (delete) too
    assert await all_three_running(sleep_a), leftovers(sleep_a)
    await provider.delete("sbx-a", state_a)
    assert await no_leftovers(sleep_a) == []


async def test_a_session_owns_only_its_directories(
        provider: LocalProvider, fake_api: FakeApi, gateway_key, short_tmp: Path) -> None:
    state = await provider.create(compute_spec("sbx-c", fake_api, gateway_key, None))
    await ready(fake_api, "sbx-c")
    base = provider.session_dir("sbx-c")
    assert base.stat().st_mode & 0o077 == 0  # the session dir is the server's; only its parts are the session's
    uid = state["uid"]
    for part in ("workspace", "state", "home"):
        assert (base / part).stat().st_uid == uid
    assert (base / "state" / "ssh.sock").is_socket()
    assert (base / "state" / "ssh.sock").stat().st_mode & 0o077 == 0
    # a restart keeps the uid, so files written before stay the session's
    stopped = await provider.stop("sbx-c", state)
    again = await provider.start(compute_spec("sbx-c", fake_api, gateway_key, None), stopped)
    assert again["uid"] == uid


@pytest.mark.skipif(os.geteuid() != 0, reason="per-session uids need root")
async def test_two_servers_on_one_machine_give_their_sessions_different_uids(
        fake_api: FakeApi, gateway_key, short_tmp: Path) -> None:
    """Two `orz server`s with their own data dirs each gave their first session the range's first uid: one
    user's session could signal the other's processes and write its files."""
    claims = short_tmp / "uid-claims"
    states = {}
    async with contextlib.AsyncExitStack() as stack:
        providers = [await stack.enter_async_context(local_provider(Settings(
            data_dir=short_tmp / f"data-{n}", sandbox_uid_base=260000, sandbox_uid_count=50,
            sandbox_uid_claims_dir=claims))) for n in (1, 2)]
        for n, provider in enumerate(providers):
            states[n] = await provider.create(compute_spec(f"sbx-u{n}", fake_api, gateway_key, None))
            await ready(fake_api, f"sbx-u{n}")
        uids = [states[n]["uid"] for n in range(2)]
        assert uids[0] != uids[1]
        for n, provider in enumerate(providers):
            assert (provider.session_dir(f"sbx-u{n}") / "workspace").stat().st_uid == uids[n]
            await provider.delete(f"sbx-u{n}", states[n])
    assert not [p for p in claims.iterdir() if p.name.isdigit()]  # a deleted session's uid is free again


@pytest.mark.skipif(os.geteuid() != 0, reason="per-session uids need root")
async def test_a_session_keeps_its_uid_without_a_claim_and_across_a_server_restart(
        fake_api: FakeApi, gateway_key, short_tmp: Path) -> None:
    """A session from before the claims (its uid only in its own state) was given the range's lowest free
    uid at its next start, and its files handed over to it; and a restarted server did not claim its
    sessions' uids again, so another server could take them."""
    claims = short_tmp / "uid-claims"
    settings = Settings(data_dir=short_tmp / "data", sandbox_uid_base=261000, sandbox_uid_count=50,
                        sandbox_uid_claims_dir=claims)
    async with local_provider(settings) as provider:
        state = await provider.create(compute_spec("sbx-k", fake_api, gateway_key, None))
        await ready(fake_api, "sbx-k")
        stopped = await provider.stop("sbx-k", state)
        base = provider.session_dir("sbx-k")
        # As the upgrade found it: its own uid, 261007, and no claim.
        (claims / str(state["uid"])).unlink()
        saved = json.loads((base / "provider.json").read_text())
        (base / "provider.json").write_text(json.dumps({**saved, "uid": 261007}))
        for top in ("workspace", "state", "home"):
            for path in [base / top, *(base / top).rglob("*")]:
                os.chown(path, 261007, 261007, follow_symlinks=False)
        again = await provider.start(compute_spec("sbx-k", fake_api, gateway_key, None),
                                     {**stopped, "uid": 261007})
        await ready(fake_api, "sbx-k")
        assert again["uid"] == 261007
        assert (base / "workspace").stat().st_uid == 261007
        assert json.loads((claims / "261007").read_text())["dir"] == str(base.resolve())
        stopped = await provider.stop("sbx-k", again)
    (claims / "261007").unlink()  # lost (a server that crashed mid-way, a claims dir wiped)
    async with local_provider(settings) as provider:  # the restart claims it again before anything else
        assert json.loads((claims / "261007").read_text())["dir"] == str(base.resolve())
        await provider.delete("sbx-k", stopped)
    assert not [p for p in claims.iterdir() if p.name.isdigit()]


async def test_without_bwrap_sessions_do_not_start(
        short_tmp: Path, fake_api: FakeApi, gateway_key, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = short_tmp / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    provider = LocalProvider(Settings(data_dir=short_tmp / "data"))
    with pytest.raises(SandboxUnavailable) as refused:
        await provider.create(compute_spec("sbx-d", fake_api, gateway_key, None))
    assert "bubblewrap" in refused.value.reason and "ORZ_SANDBOX=off" in refused.value.reason
    assert (await provider.list()) == {}  # nothing made


async def test_a_sandbox_without_network_fails_the_session_with_the_reason(
        short_tmp: Path, fake_api: FakeApi, gateway_key, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = sandbox.Tools(bwrap=shutil.which("bwrap") or "bwrap", slirp4netns=shutil.which("false") or "false")
    monkeypatch.setattr(sandbox, "find_tools", lambda: broken)
    provider = LocalProvider(Settings(data_dir=short_tmp / "data"))
    state = await provider.create(compute_spec("sbx-e", fake_api, gateway_key, None))
    for _ in range(200):
        status = await provider.status("sbx-e", state)
        if status.phase != "running":
            break
        await asyncio.sleep(0.05)
    assert status.phase == "failed" and status.message and "slirp4netns" in status.message
    assert fake_api.bodies("sbx-e") == []  # the runner never got to talk to the API
    await provider.delete("sbx-e", state)


def detached(script: str) -> dict[str, str]:
    """A repository whose setup.init leaves ``script`` running in the session, detached, once init is done:
    what any code a session runs can do with the files of its state dir (the test drives it by files)."""
    return config(f"cat > /tmp/evil.sh <<'EOF'\n{script}\nEOF\n"
                  "setsid bash /tmp/evil.sh </dev/null >evil.log 2>&1 &\n")


async def step(workspace: Path, go: str, done: str) -> None:
    """Tell the session's script to go on (a file it waits for) and wait for the file it makes when done."""
    (workspace / go).touch()
    for _ in range(200):
        if (workspace / done).exists():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the session's script did not get to {done}: {(workspace / 'evil.log').read_text()}")


RUNNER_PID = "$(pgrep -f 'P -m runner$')"


async def test_the_server_reads_no_file_a_session_points_elsewhere(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key, short_tmp: Path) -> None:
    """init.log and fatal_error are the session's files, read by the server (root): a symlink to a key, or a
    FIFO that never answers, must not turn `orz cloud logs` or the failure reason into a way to read it."""
    key = short_tmp / "data" / "keys" / "ssh_ca"
    state_dir = provider.session_dir("sbx-f") / "state"
    script = f"""cd {provider.session_dir('sbx-f') / 'workspace'}
until [ -e go1 ]; do sleep 0.05; done
ln -sfn {key} {state_dir}/init.log
ln -sfn {key} {state_dir}/fatal_error
touch linked
until [ -e go2 ]; do sleep 0.05; done
rm {state_dir}/init.log && mkfifo {state_dir}/init.log
touch fifo
until [ -e go3 ]; do sleep 0.05; done
kill -KILL {RUNNER_PID}"""
    state = await provider.create(compute_spec("sbx-f", fake_api, gateway_key, make_repo(detached(script))))
    await started(provider, fake_api, "sbx-f")
    workspace = provider.session_dir("sbx-f") / "workspace"

    await step(workspace, "go1", "linked")
    assert (state_dir / "init.log").is_symlink()
    shown = await provider.read_log("sbx-f", state)
    assert "PRIVATE-CA-KEY" not in shown

    await step(workspace, "go2", "fifo")
    shown = await asyncio.wait_for(provider.read_log("sbx-f", state), 5)  # a FIFO is no log: no hang either
    assert "PRIVATE-CA-KEY" not in shown

    (workspace / "go3").touch()  # the runner is killed: the provider reports the session's failure
    for _ in range(200):
        status = await provider.status("sbx-f", state)
        if status.phase != "running":
            break
        await asyncio.sleep(0.05)
    assert status.phase != "running"
    assert "PRIVATE-CA-KEY" not in (status.message or "")
    await provider.delete("sbx-f", state)


LISTENER = """
import socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)
open("listening", "w").close()
n = 0
while True:
    c, _ = s.accept(); n += 1; c.settimeout(1); data = b""
    try:
        while chunk := c.recv(65536):
            data += chunk
    except OSError:
        pass
    open(f"heard-{n}", "wb").write(data)
"""


async def test_a_session_that_forges_its_release_is_still_stopped_and_learns_nothing(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key, short_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The state dir's fatal_error and released files tell stop() the runner let go of everything; a session
    can write them itself, freeze its runner and listen where the server ran tmux to end a leftover server."""
    from api.instances.providers import local

    monkeypatch.setattr(local, "STOP_GRACE_S", 2.0)
    canary = "server-env-" + "".join(random.choices("abcdefghij", k=12))  # nosec B311
    monkeypatch.setenv("ORZ_TEST_CANARY", canary)  # in the server's environment, as a configured secret would be
    sleep_s = random.randrange(50000, 60000) * 3  # nosec B311
    state_dir = provider.session_dir("sbx-g") / "state"
    workspace = provider.session_dir("sbx-g") / "workspace"
    script = f"""cd {workspace}
until [ -e go ]; do sleep 0.05; done
cat > listener.py <<'PY'
{LISTENER}
PY
rm -f {state_dir}/tmux.sock
setsid python3 listener.py {state_dir}/tmux.sock </dev/null >/dev/null 2>&1 &
until [ -e listening ]; do sleep 0.05; done
echo forged > {state_dir}/fatal_error
echo forged > {state_dir}/released
kill -STOP {RUNNER_PID}
setsid sleep {sleep_s} </dev/null >/dev/null 2>&1 &
touch forged"""
    state = await provider.create(compute_spec("sbx-g", fake_api, gateway_key, make_repo(detached(script))))
    await started(provider, fake_api, "sbx-g")
    await step(workspace, "go", "forged")
    for _ in range(100):
        if leftovers(sleep_s - 1):
            break
        await asyncio.sleep(0.05)

    await asyncio.wait_for(provider.stop("sbx-g", state), 10)
    await asyncio.sleep(0.5)  # what a connecting client sent has reached the listener's files by now
    heard = b"".join(path.read_bytes() for path in workspace.glob("heard-*"))
    assert canary.encode() not in heard  # the server never spoke to the session's socket with its environment

    for _ in range(200):  # the frozen runner's grace, then the kill that ends the namespace
        if not leftovers(sleep_s - 1):
            break
        await asyncio.sleep(0.05)
    assert leftovers(sleep_s - 1) == []
    await provider.delete("sbx-g", state)


def egress_probe(targets: list[str]) -> str:
    """A session's script: for each ``host/port``, what a TCP connection to it read or the error it met."""
    lines = "\n".join(
        f'echo "{target} $(timeout 5 bash -c \'exec 3<>/dev/tcp/{target} && head -1 <&3\' 2>&1 | tail -1)"'
        for target in targets)
    return f"{lines}\necho done\n"


@pytest.fixture
def host_address_listener() -> Iterator[tuple[str, int]]:
    """A TCP listener on this host's own non-loopback address (what a service bound to 0.0.0.0 offers)."""
    from api.instances.providers.sandbox_launch import host_addresses
    address = next((a for a in host_addresses() if not a.startswith("127.")), None)
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = subprocess.Popen(["python3", "-c", PY_LISTENER.replace("127.0.0.1", address)],
                              stdout=subprocess.PIPE, text=True)
    try:
        yield address, int(server.stdout.readline())  # type: ignore[union-attr]
    finally:
        server.kill()
        server.wait()
        server.stdout.close()  # type: ignore[union-attr]


async def test_a_session_reaches_no_private_address_unless_allowed(
        short_tmp: Path, make_repo, fake_api: FakeApi, gateway_key, host_address_listener: tuple[str, int]) -> None:
    """slirp4netns connects from the host: without the namespace's routes a session reaches the host's own
    services on its other addresses (past any cloud firewall), the LAN and the cloud metadata service."""
    address, port = host_address_listener
    targets = [f"{address}/{port}", "169.254.169.254/80", "10.20.30.40/22"]
    repo = make_repo(config(egress_probe(targets)))

    async def seen(sid: str, allow: str) -> dict[str, str]:
        settings = Settings(data_dir=short_tmp / f"data-{sid}", repo_file_dirs=str(short_tmp),
                            sandbox_egress_allow=allow)
        async with local_provider(settings) as provider:
            await provider.create(compute_spec(sid, fake_api, gateway_key, repo))
            await started(provider, fake_api, sid)
            lines = (provider.session_dir(sid) / "workspace" / "probe.txt").read_text().splitlines()
        assert lines[-1] == "done", lines
        return dict(line.split(" ", 1) for line in lines[:-1])

    refused = await seen("sbx-eg1", "")
    for target in targets:  # refused at once by the namespace's routes, not left to time out
        assert refused[target].endswith("Permission denied"), refused
    allowed = await seen("sbx-eg2", f"{address}/32")  # ORZ_SANDBOX_EGRESS_ALLOW
    assert allowed[f"{address}/{port}"] == "hello-from-host", allowed
    assert allowed["169.254.169.254/80"].endswith("Permission denied"), allowed


def test_the_denied_networks_leave_holes_for_what_is_allowed() -> None:
    from api.instances.providers.sandbox_launch import denied_networks
    denied = [ipaddress.IPv4Network(net) for net in denied_networks(["192.168.7.0/24"], ["203.0.113.9", "8.8.4.4"])]
    def refused(address: str) -> bool:
        return any(ipaddress.IPv4Address(address) in net for net in denied)
    assert refused("169.254.169.254") and refused("192.168.8.1") and refused("10.0.3.1")
    assert refused("8.8.4.4")  # the host's own public address: its services, past the cloud firewall
    assert not refused("192.168.7.20")  # allowed
    assert not refused("10.0.2.3") and not refused("10.0.2.2")  # slirp4netns's DNS and gateway
    assert not refused("1.1.1.1") and not refused("127.0.0.1")  # the internet; the namespace's own loopback


def _mounts_under(path: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(path))]


@pytest.fixture
def unmounts_left(short_tmp: Path) -> Iterator[None]:
    """Whatever the test ends with, no session disk of it stays mounted on the host."""
    yield
    for mount in reversed(_mounts_under(short_tmp)):
        subprocess.run(["umount", "-l", mount], check=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.ext4") is None, reason="needs root and mkfs.ext4")
async def test_a_session_that_fills_its_disk_fills_only_its_own(
        short_tmp: Path, make_repo, fake_api: FakeApi, gateway_key, unmounts_left: None) -> None:
    """ORZ_SANDBOX_DISK_SIZE: a session writing without end gets ENOSPC at its own size; the data dir's
    filesystem takes only what it wrote; the disk outlives a stop and a reboot; delete removes it."""
    data = short_tmp / "data"
    settings = Settings(data_dir=data, repo_file_dirs=str(short_tmp), sandbox_disk_size="64Mi")
    fill = ("dd if=/dev/zero of=big bs=1M count=200 2>&1 | grep -o 'No space left on device' | head -1\n"
            "df -k --output=size . | tail -1\nrm big\n"
            # /tmp, /var/tmp and /dev/shm count too: as tmpfs they would hold half the host's RAM each
            "for d in /tmp /var/tmp /dev/shm; do dd if=/dev/zero of=$d/big bs=1M count=200 2>&1 | "
            "grep -o 'No space left on device' | head -1 | sed \"s#^#$d #\"; rm -f $d/big; done\necho done\n")
    repo = make_repo(config(fill))
    async with local_provider(settings) as provider:
        state = await provider.create(compute_spec("sbx-disk", fake_api, gateway_key, repo))
        await started(provider, fake_api, "sbx-disk")
        base = provider.session_dir("sbx-disk")
        lines = (base / "workspace" / "probe.txt").read_text().splitlines()
        assert lines[0] == "No space left on device", lines
        assert int(lines[1]) < 64 * 1024, lines  # the session saw its own 64 MiB filesystem
        assert lines[2:5] == ["/tmp No space left on device", "/var/tmp No space left on device",
                              "/dev/shm No space left on device"], lines
        image = data / "session-disks" / "sbx-disk.img"
        assert image.stat().st_blocks * 512 <= 64 * 2**20 < 200 * 2**20  # the host kept the rest
        assert os.path.ismount(base)

        stopped = await provider.stop("sbx-disk", state)
        subprocess.run(["umount", str(base)], check=True)  # what a reboot does to it
        assert not (base / "workspace" / "probe.txt").exists()
    async with local_provider(settings) as provider:  # the server's next start mounts it again
        assert (base / "workspace" / "probe.txt").read_text().splitlines() == lines
        await provider.delete("sbx-disk", stopped)
        assert not os.path.ismount(base) and not base.exists() and not image.exists()
    assert _mounts_under(short_tmp) == []


KERNEL_PROBE = r"""set -u
# The kernel's keyrings are not namespaced: a key in the uid's user keyring outlives the session and is there
# for the next session (another org's) given the uid. A user namespace is kernel attack surface to no end.
python3 - <<'PY'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
r = libc.syscall(nr[0], b"user", b"orz-probe", b"left-for-the-next-uid", 21, -4)  # add_key to @u
print("add_key", "denied" if r < 0 else "allowed")
r = libc.syscall(nr[1], 0, -4, 0)  # keyctl(KEYCTL_GET_KEYRING_ID, @u)
print("keyctl", "denied" if r < 0 else "allowed")
libc.syscall(nr[1], 7, -4)  # KEYCTL_CLEAR: where it was allowed, leave nothing behind
print("unshare", "denied" if libc.unshare(0x10000000) < 0 else "allowed")  # CLONE_NEWUSER
PY
unshare -Ur true 2>/dev/null && echo "userns allowed" || echo "userns denied"
python3 -c 'import threading; t = threading.Thread(target=print, args=("threads work",)); t.start(); t.join()'
# multiprocessing's locks are POSIX semaphores in /dev/shm: ThreadPool failed with PermissionError there
python3 -c 'from multiprocessing.pool import ThreadPool; print("thread pools work", sum(ThreadPool(2).map(abs, [3])))'
echo done
"""


async def test_a_session_leaves_nothing_in_the_kernel_for_the_next_owner_of_its_uid(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key) -> None:
    state = await provider.create(compute_spec("sbx-k", fake_api, gateway_key, make_repo(config(KERNEL_PROBE))))
    await started(provider, fake_api, "sbx-k")
    seen = (provider.session_dir("sbx-k") / "workspace" / "probe.txt").read_text().splitlines()
    assert seen == ["add_key denied", "keyctl denied", "unshare denied", "userns denied",
                    "threads work", "thread pools work 3", "done"], seen
    # slirp4netns parses every packet the session sends, as root in the host's network namespace (where
    # the host's loopback services are): it runs under its own system-call filter too.
    launcher = state["pid"]
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    slirp = [pid for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "slirp4netns"]
    assert len(slirp) == 1, children
    status = dict(line.split(":", 1) for line in Path(f"/proc/{slirp[0]}/status").read_text().splitlines())
    assert status["Seccomp"].strip() == "2", status["Seccomp"]


FORK_HOLD = """import errno, os, signal, time
def wait(name):
    while not os.path.exists(name):
        time.sleep(0.02)
wait("go")
children, error = [], "none"
try:
    while True:  # bounded by the session's pids.max (and the sessions' total): forks until refused
        pid = os.fork()
        if pid == 0:
            signal.pause()
            os._exit(0)
        children.append(pid)
except OSError as exc:
    error = errno.errorcode.get(exc.errno, str(exc.errno))
with open("forked.tmp", "w") as out:
    out.write(f"{len(children)} {error}\\n")
os.rename("forked.tmp", "forked")
wait("release")
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
open("released", "w").close()
"""


def session_cgroup(launcher: int, controller: str) -> Path:
    """The launcher's (and so the session's) cgroup of ``controller`` (v1)."""
    line = next(line for line in Path(f"/proc/{launcher}/cgroup").read_text().splitlines()
                if controller in line.split(":")[1].split(","))
    return Path(f"/sys/fs/cgroup/{controller}{line.split(':', 2)[2]}")


def pids_current(group: Path) -> int:
    return int((group / "pids.current").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root")
@pytest.mark.skipif(not Path("/sys/fs/cgroup/pids").is_dir(), reason="needs the cgroup v1 pids controller")
async def test_sessions_forking_without_end_leave_the_server_processes(
        make_repo, fake_api: FakeApi, gateway_key, short_tmp: Path) -> None:
    """Each session had its own pids.max and nothing bounded them together: sixteen sessions forking
    without end took every pid of the host (kernel.pid_max 32768), and the server could start nothing.
    All sessions are now in one parent whose total is below the host's (ORZ_SANDBOX_PIDS_TOTAL); memory too."""
    parent = f"orz-t{os.getpid()}-total"
    settings = Settings(data_dir=short_tmp / "data", sandbox_pids_max=200, sandbox_pids_total=300,
                        sandbox_memory_total="1Gi", sandbox_cgroup_parent=parent)
    repo = make_repo({**detached("exec python3 .orz/fork_hold.py"), ".orz/fork_hold.py": FORK_HOLD})
    async with local_provider(settings) as provider:
        states = {}
        for sid in ("sbx-fa", "sbx-fb"):
            states[sid] = await provider.create(compute_spec(sid, fake_api, gateway_key, repo))
            await started(provider, fake_api, sid)
        groups = {sid: session_cgroup(state["pid"], "pids") for sid, state in states.items()}
        workspace = {sid: provider.session_dir(sid) / "workspace" for sid in states}
        for sid, group in groups.items():  # never fork without a limit in place
            assert group.name == f"orz-{sid}" and (group / "pids.max").read_text().strip() == "200"
        try:
            # A forks until refused: its own limit (200) stops it.
            await step(workspace["sbx-fa"], "go", "forked")
            forked_a, error_a = (workspace["sbx-fa"] / "forked").read_text().split()
            assert error_a == "EAGAIN" and int(forked_a) > 100
            # B still starts processes, until all sessions together have the total (300): the parent's
            # limit, not its own (200), stops it.
            await step(workspace["sbx-fb"], "go", "forked")
            forked_b, error_b = (workspace["sbx-fb"] / "forked").read_text().split()
            assert error_b == "EAGAIN" and int(forked_b) > 0
            assert pids_current(groups["sbx-fb"]) < 200, "only the session's own limit stopped it"
            assert pids_current(groups["sbx-fa"]) + pids_current(groups["sbx-fb"]) <= 300
            # ... while the server, outside the parent, still starts a process.
            assert subprocess.run(["true"], check=False).returncode == 0
        finally:
            for sid in states:
                with contextlib.suppress(AssertionError):
                    await step(workspace[sid], "release", "released")

        # One parent per controller, in the server's own cgroup: the server is not in it.
        assert groups["sbx-fa"].parent == groups["sbx-fb"].parent and groups["sbx-fa"].parent.name == parent
        assert (groups["sbx-fa"].parent / "pids.max").read_text().strip() == "300"
        memory = session_cgroup(states["sbx-fa"]["pid"], "memory")
        assert memory.parent.name == parent
        assert int((memory.parent / "memory.limit_in_bytes").read_text()) == 2**30
        assert f"/{parent}" not in Path("/proc/self/cgroup").read_text()
        for sid, state in states.items():
            await provider.delete(sid, state)
        assert not groups["sbx-fa"].exists() and not memory.exists()
    assert not groups["sbx-fa"].parent.exists() and not memory.parent.exists()  # removed once empty


async def test_a_session_holding_all_its_relayed_connections_still_heartbeats(
        short_tmp: Path, make_repo, fake_api: FakeApi, gateway_key) -> None:
    """Programs of the session take every relayed connection it may hold, again as soon as one ends (a
    connection pool): the runner's heartbeats still reach the API, through the relay's connections kept for
    the runner (the API answers that heartbeats come every 7 s, longer than the runner's client keeps an
    idle connection: most need a new one). Before, the session never got past its first heartbeats."""
    fake_api.interval_s = 7
    port = urlsplit(fake_api.url).port
    hold = f"while :; do (exec 3<>/dev/tcp/127.0.0.1/{port} && cat <&3) >/dev/null 2>&1; sleep 0.05; done"
    script = f"""for i in 1 2 3 4; do setsid bash -c '{hold}' </dev/null >/dev/null 2>&1 & done
sleep 1
echo done
"""
    repo = make_repo(config(script))
    settings = Settings(data_dir=short_tmp / "data", repo_file_dirs=str(short_tmp), sandbox_relay_max_connections=2)
    async with local_provider(settings) as provider:
        await provider.create(compute_spec("sbx-hold", fake_api, gateway_key, repo))
        await started(provider, fake_api, "sbx-hold")
        two_more = len(fake_api.bodies("sbx-hold")) + 2  # 7 s apart: each on a connection of its own
        await fake_api.wait_for(lambda _body: len(fake_api.bodies("sbx-hold")) >= two_more, 40, "sbx-hold")
