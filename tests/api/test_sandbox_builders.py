"""The sandbox's pure builders: bwrap's options, limits from the tier, uids, the files for its /etc."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from api import schemas
from api.instances.providers.base import ProviderFailure
from api.instances.providers.sandbox import (
    SessionPaths,
    Tools,
    UidClaims,
    bwrap_argv,
    cgroup_limits,
    command_prefix,
    etc_files,
    loopback_port,
)
from api.settings import Settings

TOOLS = Tools(bwrap="/usr/bin/bwrap", slirp4netns="/usr/bin/slirp4netns")


def binds(argv: list[str]) -> list[tuple[str, str, str]]:
    return [(argv[i], argv[i + 1], argv[i + 2]) for i in range(len(argv) - 2)
            if argv[i] in ("--bind", "--ro-bind")]


def test_only_the_sessions_own_parts_of_the_data_dir_are_bound(tmp_path: Path) -> None:
    data = tmp_path / "data"
    paths = SessionPaths(data / "sessions" / "s-1")
    argv = bwrap_argv(TOOLS, paths, session_id="s-1", uid=200001, gid=200001, as_root=True,
                      extra_ro=[Path("/opt/py")], hidden=[data])
    writable = [src for kind, src, dst in binds(argv) if kind == "--bind"]
    assert writable == [str(paths.workspace), str(paths.state), str(paths.home)]
    assert all(src == dst for _, src, dst in binds(argv) if not dst.startswith("/etc/"))
    assert not any(src == str(data) or src == str(data / "keys") for _, src, _ in binds(argv))
    for flag in ("--unshare-pid", "--unshare-net", "--die-with-parent", "--cap-drop"):
        assert flag in argv
    assert "--unshare-user" not in argv  # as root a user namespace would map the session to host root
    assert argv[argv.index("--tmpfs") + 1] == "/tmp"


def test_without_root_a_user_namespace_maps_the_servers_uid(tmp_path: Path) -> None:
    argv = bwrap_argv(TOOLS, SessionPaths(tmp_path / "s"), session_id="s", uid=1000, gid=1000, as_root=False,
                      extra_ro=[], hidden=[])
    assert {"--unshare-user", "--disable-userns"} <= set(argv) and "CAP_SETUID" not in argv
    assert command_prefix(1000, 1000, as_root=False) == []
    prefix = command_prefix(200001, 200001, as_root=True)
    assert "--reuid" in prefix and "--bounding-set=-all" in prefix and prefix[-1] == "--"


def test_a_data_dir_inside_a_bound_tree_is_covered(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "data").mkdir(parents=True)
    argv = bwrap_argv(TOOLS, SessionPaths(checkout / "data" / "sessions" / "s"), session_id="s", uid=1, gid=1,
                      as_root=True, extra_ro=[checkout], hidden=[checkout / "data"])
    assert argv.index(str(checkout / "data")) > argv.index(str(checkout))
    assert argv[argv.index(str(checkout / "data")) - 1] == "--tmpfs"


def test_a_data_dir_under_a_system_directory_is_covered_too() -> None:
    """/opt, /etc and /usr are shown read-only whole: a data dir an operator keeps there (/opt/orzbob) was
    shown with them, its database readable by every session unless its mode said otherwise."""
    try:
        opt = Path(tempfile.mkdtemp(prefix="orz-test-", dir="/opt"))
    except OSError:
        pytest.skip("cannot make a directory under /opt here")
    try:
        data = opt / "data"
        data.mkdir()
        argv = bwrap_argv(TOOLS, SessionPaths(data / "sessions" / "s"), session_id="s", uid=1, gid=1,
                          as_root=True, extra_ro=[], hidden=[data])
        assert str(data) in argv and argv[argv.index(str(data)) - 1] == "--tmpfs"
        assert argv.index(str(data)) > argv.index("/opt")  # over the system directory's bind, not under it
    finally:
        shutil.rmtree(opt)


def test_limits_follow_the_tier() -> None:
    small = schemas.TIER_RESOURCES["small"]
    limits = cgroup_limits(Settings(sandbox_pids_max=500), small)
    assert limits == {"pids.max": 500, "memory.limit_in_bytes": 4 * 2**30, "cpu.cfs_period_us": 100_000,
                      "cpu.cfs_quota_us": 2 * 100_000}
    assert cgroup_limits(Settings(), {"cpu": "500m"})["cpu.cfs_quota_us"] == 50_000
    assert cgroup_limits(Settings(), {"cpu": "500m?"}) == {"pids.max": 2048}  # unreadable: not guessed


def test_all_sessions_together_leave_the_host_a_reserve() -> None:
    from api.instances.providers import sandbox

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    derived = sandbox.cgroup_parent_limits(Settings())
    # an eighth of what the host can run (at least 4096, at most half) is left to the server and the host
    assert pid_max // 2 <= derived["pids.max"] <= pid_max - min(4096, pid_max // 2)
    assert 0 < derived["memory.limit_in_bytes"] < sandbox.host_memory_bytes()
    assert sandbox.cgroup_parent_limits(Settings(sandbox_pids_total=300, sandbox_memory_total="1Gi")) == {
        "pids.max": 300, "memory.limit_in_bytes": 2**30}
    with pytest.raises(ValueError, match="64Mi"):
        Settings(sandbox_memory_total="12")
    with pytest.raises(ValueError):
        Settings(sandbox_cgroup_parent="../escape")


def gone(claims: UidClaims) -> UidClaims:
    """``claims`` as a server that has exited since: its pid is another process's now (another start time)."""
    claims.server = dataclasses.replace(claims.server, start=-1)
    return claims


def session(root: Path, name: str) -> Path:
    path = root / "sessions" / name
    path.mkdir(parents=True)
    return path


def claimed(claims: Path) -> dict[int, str]:
    """uid -> the session directory its claim names."""
    return {int(p.name): json.loads(p.read_text())["dir"] for p in claims.iterdir() if p.name.isdigit()}


def test_uids_are_unique_host_wide_and_the_range_can_run_out(tmp_path: Path) -> None:
    """Two servers (their own data dirs, one claims directory): neither hands out a uid the other holds."""
    claims = tmp_path / "uid-claims"
    one, two = UidClaims(claims, 300000, 3), gone(UidClaims(claims, 300000, 3))
    a, b, c = session(tmp_path / "data-1", "a"), session(tmp_path / "data-2", "b"), session(tmp_path / "data-1", "c")
    assert one.claim(a) == 300000
    assert two.claim(b) == 300001  # the other server's session holds 300000
    assert one.claim(a, wanted=300000) == 300000  # a restart keeps the session's uid
    assert two.claim(b, wanted=300000) == 300001  # ... but never another's: this one keeps its own claim
    assert one.claim(c) == 300002
    with pytest.raises(ProviderFailure, match="ORZ_SANDBOX_UID_COUNT"):
        two.claim(tmp_path)
    # Deleting a session releases its uid; a server that is gone with its data dir (and no process of the
    # uid left) leaves claims the next pick recovers; a claim whose session is still there stays.
    one.release(c)
    shutil.rmtree(tmp_path / "data-2")
    d = session(tmp_path / "data-3", "d")
    assert UidClaims(claims, 300000, 3).claim(d) == 300001
    assert claimed(claims) == {300000: str(a.resolve()), 300001: str(d.resolve())}


def test_a_claim_is_kept_unless_it_is_dead_from_every_servers_view(tmp_path: Path) -> None:
    """A server that cannot see another server's session directory (systemd ProtectHome=/PrivateTmp=, a
    container sharing only the claims dir) took over the claim of a running session, giving a second
    user's session its uid."""
    claims = tmp_path / "uid-claims"
    me = UidClaims(claims, 300000, 10)
    hidden = UidClaims(claims, 300000, 10)
    hidden.server = dataclasses.replace(hidden.server, mnt="mnt:[1]")  # its own mount namespace
    running = session(tmp_path / "data-hidden", "a")
    assert hidden.claim(running) == 300000
    deleting = UidClaims(claims, 300000, 10)  # this view, alive: a delete between rmtree and release
    mid_delete = session(tmp_path / "data-live", "b")
    assert deleting.claim(mid_delete) == 300001
    shutil.rmtree(tmp_path / "data-hidden")  # not to be seen from here
    shutil.rmtree(tmp_path / "data-live")
    assert me.claim(session(tmp_path / "data-me", "x")) == 300002
    # Its server gone too, a session's runners may still run (they outlive their server by design).
    gone(hidden)
    hidden.claim(session(tmp_path / "data-hidden2", "c"))  # a claim recorded by the exited server
    shutil.rmtree(tmp_path / "data-hidden2")
    assert me.claim(session(tmp_path / "data-me", "y")) == 300004
    assert set(claimed(claims)) == {300000, 300001, 300002, 300003, 300004}


def test_a_dead_servers_claim_with_its_session_gone_is_taken_over(tmp_path: Path) -> None:
    claims = tmp_path / "uid-claims"
    earlier_boot = UidClaims(claims, 300000, 10)
    earlier_boot.server = dataclasses.replace(earlier_boot.server, boot="an-earlier-boot", mnt="mnt:[1]")
    assert earlier_boot.claim(session(tmp_path / "data-old", "a")) == 300000
    assert earlier_boot.claim(session(tmp_path / "data-kept", "b")) == 300001
    here = gone(UidClaims(claims, 300000, 10))  # this mount and pid namespace, exited
    assert here.claim(session(tmp_path / "data-here", "c")) == 300002
    shutil.rmtree(tmp_path / "data-old")
    shutil.rmtree(tmp_path / "data-here")
    me = UidClaims(claims, 300000, 10)
    assert me.claim(session(tmp_path / "data-me", "x")) == 300000  # every process of that boot is gone
    assert me.claim(session(tmp_path / "data-me", "y")) == 300002  # its server and any process of the uid
    # ... while a session of an earlier boot that is still there is its server's to start again.
    assert me.claim(session(tmp_path / "data-me", "z")) == 300003


def test_a_claim_whose_uid_still_runs_a_process_is_kept(tmp_path: Path) -> None:
    """Runners outlive their server by design: its server gone and its directory too, a uid that still
    runs a process (here this test's own) is not free."""
    uid = os.getuid()
    claims = tmp_path / "uid-claims"
    gone(UidClaims(claims, uid, 1)).claim(session(tmp_path / "data-gone", "a"))
    shutil.rmtree(tmp_path / "data-gone")
    with pytest.raises(ProviderFailure, match="ORZ_SANDBOX_UID_COUNT"):
        UidClaims(claims, uid, 1).claim(session(tmp_path / "data-me", "x"))


def test_a_restarted_server_claims_its_sessions_again_first(tmp_path: Path) -> None:
    """A server that restarts (here also with its data dir moved) keeps its sessions' uids, its own
    deleted sessions' claims are freed, and a session from before the claims gets its own uid back."""
    claims = tmp_path / "uid-claims"
    before = gone(UidClaims(claims, 300000, 10))
    a, b = session(tmp_path / "data", "a"), session(tmp_path / "data", "b")
    assert (before.claim(a), before.claim(b)) == (300000, 300001)
    (tmp_path / "data").rename(tmp_path / "data-moved")
    a, b = tmp_path / "data-moved" / "sessions" / "a", tmp_path / "data-moved" / "sessions" / "b"
    shutil.rmtree(b)  # deleted, its claim not released (the server died in between)
    old = session(tmp_path / "data-moved", "old")  # from before the claims: its uid only in its own state
    after = UidClaims(claims, 300000, 10)
    assert after.adopt({a: 300000, old: 300005}) == []
    assert claimed(claims) == {300000: str(a.resolve()), 300005: str(old.resolve())}
    other = UidClaims(claims, 300000, 10)
    assert other.claim(session(tmp_path / "data-other", "x")) == 300001
    assert after.claim(a) == 300000
    assert other.adopt({session(tmp_path / "data-other", "y"): 300000}) == [tmp_path / "data-other" / "sessions" / "y"]


def test_claims_from_before_servers_were_recorded_stay_until_their_session_drops_them(tmp_path: Path) -> None:
    """A claim file that names only a session directory (written before this change) says nothing about
    its server: it is kept even when its directory is not to be seen, and its own session takes it back."""
    claims = tmp_path / "uid-claims"
    claims.mkdir(mode=0o700)
    a = session(tmp_path / "data", "a")
    (claims / "300000").write_text(f"{a.resolve()}\n")
    (claims / "300001").write_text(f"{tmp_path / 'elsewhere' / 'sessions' / 'b'}\n")
    me = UidClaims(claims, 300000, 10)
    assert me.claim(session(tmp_path / "data-me", "x")) == 300002
    assert me.claim(a, wanted=300000) == 300000
    assert json.loads((claims / "300000").read_text())["server"]["pid"] == os.getpid()


def test_claiming_waits_for_another_servers_lock_only_so_long(tmp_path: Path) -> None:
    """A server holding the claims lock stalled every other server's API (the claim blocked its event loop)."""
    claims = UidClaims(tmp_path / "uid-claims", 300000, 10)
    claims.LOCK_WAIT_S = 0.2
    claims.claim(session(tmp_path / "data", "a"))
    fd = os.open(tmp_path / "uid-claims" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another server, busy
        with pytest.raises(ProviderFailure, match="stayed locked"):
            claims.claim(session(tmp_path / "data", "b"))
    finally:
        os.close(fd)


def test_a_claims_directory_others_control_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ProviderFailure, match="not a symlink"):
        UidClaims(tmp_path / "link", 300000, 10).claim(session(tmp_path / "data", "a"))
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(ProviderFailure, match="ORZ_SANDBOX_UID_CLAIMS_DIR"):
        UidClaims(loose, 300000, 10).claim(tmp_path / "data" / "sessions" / "a")
    safe = tmp_path / "safe"
    (safe / "300000").parent.mkdir(mode=0o700)
    (safe / "300000").symlink_to(tmp_path / "data" / "sessions" / "a")  # not a claim: the uid stays taken
    assert UidClaims(safe, 300000, 10).claim(tmp_path / "data" / "sessions" / "a") == 300001
    assert not list(target.iterdir())


def test_etc_names_the_session_user_and_a_reachable_resolver(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "group").write_text("root:x:0:\n")
    files = etc_files(200001, 200001, Path("/home/s"), [Path("/srv/repos/app")], host_etc=tmp_path)
    assert "orz:x:200001:200001:orz session:/home/s:/bin/bash" in files["passwd"].splitlines()
    assert "orz:x:200001:" in files["group"].splitlines()
    assert files["resolv.conf"] == "nameserver 10.0.2.3\n"
    assert "directory = /srv/repos/app/.git" in files["gitconfig"]


@pytest.mark.parametrize(("url", "port"), [
    ("http://127.0.0.1:8080", 8080), ("http://localhost:9000/x", 9000), ("http://[::1]:81", 81),
    ("https://127.0.0.2", 443), ("http://api.example.com:8080", None), ("http://10.0.0.1:8080", None),
])
def test_the_api_port_is_relayed_only_when_it_is_on_loopback(url: str, port: int | None) -> None:
    assert loopback_port(url) == port


def test_a_disk_size_that_is_no_size_stops_the_server_at_start() -> None:
    from pydantic import ValidationError
    for bad in ("lots", "10GB", "1Mi"):
        with pytest.raises(ValidationError, match="32Mi or more"):
            Settings(sandbox_disk_size=bad)
    assert Settings(sandbox_disk_size="10Gi").sandbox_disk_size == "10Gi"


def test_the_home_note_says_what_the_sandbox_refuses_and_never_writes_through_a_link(tmp_path: Path) -> None:
    from api.instances.providers.sandbox import HOME_NOTE, write_home_note

    write_home_note(tmp_path)
    text = (tmp_path / HOME_NOTE).read_text()
    assert "ORZ_SANDBOX_EGRESS_ALLOW" in text and "Permission denied" in text and "Operation not permitted" in text
    (tmp_path / HOME_NOTE).write_text("mine\n")
    write_home_note(tmp_path)
    assert (tmp_path / HOME_NOTE).read_text() == "mine\n"  # the user's edit stays
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / HOME_NOTE).unlink()
    (tmp_path / HOME_NOTE).symlink_to(elsewhere)
    write_home_note(tmp_path)
    assert not elsewhere.exists()


def test_taking_over_a_dead_claim_is_routine_for_the_log_file_not_the_terminal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`orz server` printed "warning: sandbox uid ...: taking over the claim of <another run's dir>" on the
    operator's terminal at every start: cleanup nobody has to act on belongs in server.log only."""
    from cli.server_log import TerminalFilter

    claims = tmp_path / "uid-claims"
    old = gone(UidClaims(claims, 300000, 10))
    old.claim(session(tmp_path / "data-old", "a"))
    shutil.rmtree(tmp_path / "data-old")
    caplog.set_level(logging.INFO, logger="api.instances.providers.sandbox")
    assert UidClaims(claims, 300000, 10).claim(session(tmp_path / "data-me", "x")) == 300000
    took = [r for r in caplog.records if "taking over the claim" in r.getMessage()]
    assert len(took) == 1 and took[0].levelno == logging.INFO  # in the log file at the default level
    assert not TerminalFilter().filter(took[0])
