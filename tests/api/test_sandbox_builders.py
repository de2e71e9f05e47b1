"""The sandbox's pure builders: bwrap's options, limits from the tier, uids, the files for its /etc."""

from __future__ import annotations

import shutil
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


def test_limits_follow_the_tier() -> None:
    small = schemas.TIER_RESOURCES["small"]
    limits = cgroup_limits(Settings(sandbox_pids_max=500), small)
    assert limits == {"pids.max": 500, "memory.limit_in_bytes": 4 * 2**30, "cpu.cfs_period_us": 100_000,
                      "cpu.cfs_quota_us": 2 * 100_000}
    assert cgroup_limits(Settings(), {"cpu": "500m"})["cpu.cfs_quota_us"] == 50_000
    assert cgroup_limits(Settings(), {"cpu": "500m?"}) == {"pids.max": 2048}  # unreadable: not guessed


def test_uids_are_unique_host_wide_and_the_range_can_run_out(tmp_path: Path) -> None:
    """Two servers (their own data dirs, one claims directory): neither hands out a uid the other holds."""
    claims = tmp_path / "uid-claims"
    one, two = (UidClaims(claims, 300000, 3) for _ in range(2))
    a, b, c = (tmp_path / f"data-{n}" / "sessions" / sid for n, sid in (("1", "a"), ("2", "b"), ("1", "c")))
    for d in (a, b, c):
        d.mkdir(parents=True)
    assert one.claim(a) == 300000
    assert two.claim(b) == 300001  # the other server's session holds 300000
    assert one.claim(a, wanted=300000) == 300000  # a restart keeps the session's uid
    assert two.claim(b, wanted=300000) == 300001  # ... but never another's: this one keeps its own claim
    assert one.claim(c) == 300002
    with pytest.raises(ProviderFailure, match="ORZ_SANDBOX_UID_COUNT"):
        two.claim(tmp_path)
    # Deleting a session releases its uid; a server that died with its data dir leaves claims the next
    # pick recovers; a claim whose session is still there stays (its server may come back).
    one.release(c)
    shutil.rmtree(tmp_path / "data-2")
    d = tmp_path / "data-3" / "sessions" / "d"
    d.mkdir(parents=True)
    assert two.claim(d) == 300001
    assert sorted(int(p.name) for p in claims.iterdir() if p.name.isdigit()) == [300000, 300001]
    assert (claims / "300000").read_text().strip() == str(a.resolve())


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
