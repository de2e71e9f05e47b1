"""`orz cloud` end to end: the real command (a subprocess) against a real API server (FakeProvider)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.cli.conftest import ROOT, LiveApi, Orz
from tests.conftest import Tenant
from tests.support import free_port


def assert_one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("orz: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]




def create(orz: Orz, *args: str, cwd: Path | None = None) -> str:
    done = orz("cloud", "new", "--no-attach", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("session "), done.stdout
    return first.split()[1]


def test_login_whoami_logout(orz: Orz, live_api: LiveApi, home: Path) -> None:
    tenant = live_api.tenant("acme")
    done = orz("cloud", "login", "--token", tenant.token, "--api-url", live_api.url)
    assert done.returncode == 0, done.stderr
    assert f"as {tenant.email}" in done.stdout
    assert tenant.token not in done.stdout + done.stderr
    token_file = home / ".config" / "orzbob" / "token.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # expires_at: the Go CLI, which reads the same file, refuses one without a future expiry.
    assert json.loads(token_file.read_text()) == {"api_url": live_api.url, "api_token": tenant.token,
                                                  "expires_at": "9999-12-31T23:59:59Z"}

    who = orz("cloud", "whoami")
    assert who.returncode == 0, who.stderr
    assert tenant.email in who.stdout and "org acme" in who.stdout
    assert "0 of 2 active sessions (free plan)" in who.stdout
    # when the reaper acts, before it does (the deployment's defaults here: 30 minutes, 7 days)
    limits = ("a session with no activity for 30 min is stopped (its workspace kept); "
              "a stopped one is deleted after 7 days")
    assert limits in who.stdout
    made = orz("cloud", "new", "--no-attach", cwd=home)  # (not in a clone: its origin would be a local path)
    assert made.returncode == 0 and limits in made.stderr, made
    assert json.loads(orz("cloud", "whoami", "--json").stdout)["user"]["email"] == tenant.email

    assert orz("cloud", "logout").returncode == 0
    assert not token_file.exists()
    assert_one_error_line(orz("cloud", "whoami"), "not logged in; run orz cloud login")


def test_login_without_an_identity_provider_says_where_a_token_comes_from(orz: Orz, live_api: LiveApi,
                                                                           home: Path) -> None:
    done = orz("cloud", "login", "--no-browser", "--api-url", live_api.url, input="")
    assert done.returncode != 0
    assert_one_error_line(done, "this server has no identity provider configured",
                          "orz cloud login --with-token", "orz admin create-token EMAIL")
    assert not (home / ".config" / "orzbob" / "token.json").exists()


def test_login_with_a_wrong_token_saves_nothing(orz: Orz, live_api: LiveApi, home: Path) -> None:
    done = orz("cloud", "login", "--token", "orz_not-a-real-token", "--api-url", live_api.url)
    assert_one_error_line(done, f"the API at {live_api.url} refused this token (")
    assert "orz_not-a-real-token" not in done.stderr and "run orz cloud login" not in done.stderr  # it just ran
    assert done.returncode == 4  # authentication
    assert not (home / ".config" / "orzbob" / "token.json").exists()
    assert_one_error_line(orz("cloud", "login", "--api-url", live_api.url), "--with-token")


def test_not_logged_in_and_unreachable_api(orz: Orz, home: Path) -> None:
    for args in (["list"], ["new", "--no-attach"], ["kill", "abc"], ["attach", "abc"], ["secrets", "list"]):
        assert_one_error_line(orz("cloud", *args), "not logged in")
    port = free_port()  # nothing listens there
    done = orz("cloud", "login", "--token", "orz_x", "--api-url", f"http://127.0.0.1:{port}")
    assert_one_error_line(done, "cannot reach the Orzbob Cloud API", str(port))
    config = home / ".config" / "orzbob"
    config.mkdir(parents=True)
    (config / "token.json").write_text(json.dumps({"api_url": f"http://127.0.0.1:{port}", "api_token": "orz_x"}))
    assert_one_error_line(orz("cloud", "list"), "cannot reach", f"127.0.0.1:{port}")
    assert_one_error_line(orz("cloud", "list", ORZBOB_API_URL=f"http://127.0.0.1:{free_port()}"), "cannot reach")


def test_new_defaults_to_this_repo_and_list_fits_80_columns(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                           tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "feature-x", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "remote", "add", "origin", str(origin)], check=True)

    sid = create(orz, "fix the bug", "--tier", "medium", cwd=work)
    spec = live_api.provider.specs[sid]
    assert (spec.repo_url, spec.branch, spec.tier, spec.task) == (origin.as_uri(), "feature-x", "medium",
                                                                  "fix the bug")
    other = create(orz, "--repo", "https://example.com/r.git", "--branch", "main", cwd=tmp_path)
    assert live_api.provider.specs[other].repo_url == "https://example.com/r.git"

    table = orz("cloud", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.rstrip("\n").splitlines()
    assert all(len(line) <= 80 and line == line.rstrip() for line in lines), lines
    assert lines[0].split() == ["ID", "STATUS", "AGENT", "TIER", "LAST", "ACTIVE"]
    assert any(line.startswith(sid) and "starting" in line and "medium" in line for line in lines)
    assert lines[-1] == "2 of 2 active sessions (free plan)"

    listing = json.loads(orz("cloud", "list", "--json").stdout)
    assert set(listing) == {"instances", "quota"}
    assert listing["quota"] == {"limit": 2, "active": 2, "plan": "free"}
    first = next(i for i in listing["instances"] if i["id"] == sid)
    for field in ("id", "status", "tier", "repo_url", "branch", "task", "ssh", "attach_url", "created_at",
                  "updated_at", "last_activity_at", "attached_clients", "secrets"):
        assert field in first
    assert first["created_at"].endswith("Z")


def test_quota_error_shows_limit_and_count(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                           tmp_path: Path) -> None:
    repo = ("--repo", "https://example.com/r.git")
    create(orz, *repo)
    create(orz, *repo)
    assert_one_error_line(orz("cloud", "new", "--no-attach", *repo),
                          "quota reached: 2 of 2 active sessions on the free plan")


def test_control_characters_are_one_readable_line(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    repo = ("--repo", "https://example.com/r.git")
    assert_one_error_line(orz("cloud", "new", "--no-attach", *repo, "--program", "vim\x1b[1m"),
                          "program: contains U+001B at position 3; it must be text whose only control characters "
                          "are tab, newline and carriage return")
    assert_one_error_line(orz("cloud", "new", "--no-attach", *repo, "fix\x07it"),
                          "task: contains U+0007 at position 3; it must be text whose only control characters "
                          "are tab, newline and carriage return")
    listed = orz("cloud", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["instances"] == []  # nothing was created


def test_stop_start_kill_and_no_such_session(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                             tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid)
    stopped = orz("cloud", "stop", sid)
    assert stopped.returncode == 0, stopped.stderr
    assert f"session {sid} stopped" in stopped.stdout
    started = orz("cloud", "start", sid)
    assert started.returncode == 0 and "starting" in started.stdout, started.stderr
    status = orz("cloud", "status", sid)
    assert status.returncode == 0 and "events:" in status.stdout and "stopped -> starting" in status.stdout
    logs = orz("cloud", "logs", sid)
    assert logs.returncode == 0, logs.stderr
    killed = orz("cloud", "kill", sid)
    assert killed.returncode == 0 and "killed" in killed.stdout, killed.stderr
    assert_one_error_line(orz("cloud", "kill", sid), f"no such session: {sid}")
    assert_one_error_line(orz("cloud", "status", "nope"), "no such session: nope")
    assert_one_error_line(orz("cloud", "stop", "Bad_ID"), "not a session id")


def test_a_mistyped_session_id_names_the_closest_session(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                         tmp_path: Path) -> None:
    """A typo is a next step away: the closest of your sessions, else where to look (exit 3 either way)."""
    none_yet = orz("cloud", "status", "myapp-7fq2kd")
    assert none_yet.returncode == 3
    assert_one_error_line(none_yet, "no such session: myapp-7fq2kd; you have no sessions; start one with: "
                                    "orz cloud new")
    sid = create(orz, cwd=tmp_path)
    typo = sid[:-1] + ("x" if sid[-1] != "x" else "y")
    for command in (("status", typo), ("attach", typo), ("kill", typo), ("logs", typo)):
        done = orz("cloud", *command)
        assert done.returncode == 3, done.stderr
        assert_one_error_line(done, f"no such session: {typo}; did you mean {sid}? (orz cloud list shows your "
                                    "sessions)")
    far = orz("cloud", "stop", "zzzzzzzzzzzz")
    assert far.returncode == 3
    assert_one_error_line(far, "no such session: zzzzzzzzzzzz; orz cloud list shows your sessions")


def test_new_waits_and_shows_progress(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    """`--wait` polls until running, printing state changes; the 'runner' heartbeats from a thread."""
    with live_api.runners_heartbeating():
        done = orz("cloud", "new", "--no-attach", "--wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "is running" in done.stdout
    assert "starting -> running" in done.stderr


def test_wait_gives_up_with_one_line(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    done = orz("cloud", "new", "--no-attach", "--wait", "--timeout", "1", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("orz: session ")
    assert "still starting after 1 s" in done.stderr


def test_secrets_never_print_values(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    value = "s3cr3t-VALUE-do-not-show"
    made = orz("cloud", "secrets", "create", "gh", "--data", f"GITHUB_TOKEN={value}", "--from-env", "EXTRA",
               EXTRA=value + "-2")
    assert made.returncode == 0, made.stderr
    assert "keys: EXTRA, GITHUB_TOKEN" in made.stdout
    listed = orz("cloud", "secrets", "list")
    as_json = orz("cloud", "secrets", "list", "--json")
    bad = orz("cloud", "secrets", "create", "gh", "--data", value)
    deleted = orz("cloud", "secrets", "delete", "gh")
    for done in (made, listed, as_json, bad, deleted):
        assert value not in done.stdout + done.stderr
    assert "gh" in listed.stdout and "GITHUB_TOKEN" in listed.stdout
    assert json.loads(as_json.stdout)["secrets"][0]["keys"] == ["EXTRA", "GITHUB_TOKEN"]
    assert_one_error_line(bad, "KEY=VALUE")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert "no secrets" in orz("cloud", "secrets", "list").stdout
    assert_one_error_line(orz("cloud", "secrets", "delete", "gh"), "no such secret")


def test_bad_input_the_cli_refuses_itself_exits_2_as_documented(orz: Orz, live_api: LiveApi,
                                                                 logged_in: Tenant) -> None:
    # docs/cli.md: 2 is usage or bad input; these gave 1, the code of "the API refused for another reason".
    from cli.errors import EXIT_USAGE

    for args in (("status", "Bad ID"), ("attach", "ftp://h/v1/instances/abc/attach"),
                 ("secrets", "create", "x", "--data", "NOEQUALS"), ("secrets", "create", "x", "--from-env", "NO_VAR_X"),
                 ("secrets", "create", "x"), ("secrets", "delete", "Bad Name")):
        done = orz("cloud", *args)
        assert_one_error_line(done)
        assert done.returncode == EXIT_USAGE, (args, done)
    assert "Refused (exit 6)" in orz("cloud", "kill", "--help").stdout  # it said exit 3, the not-found code


def test_output_into_a_pipe_its_reader_closed_ends_quietly(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                           tmp_path: Path) -> None:
    # `orz cloud status ID | head -1` printed "orz: [Errno 32] Broken pipe" after head's line.
    sid = create(orz, cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "status", sid], cwd=ROOT, env=orz.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before orz writes
    _, err = proc.communicate(timeout=30)
    assert err == b"" and proc.returncode == 1


def test_logs_follow_ends_when_the_session_is_killed(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                      tmp_path: Path) -> None:
    # docs/cli.md: -f prints until the session is killed; it ended with "orz: no such session" and exit 3.
    sid = create(orz, cwd=tmp_path)
    live_api.provider.logs[sid] = "init-said-this\n"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "logs", "-f", sid], cwd=ROOT,
                            env=orz.env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "init-said-this" in proc.stdout.readline()  # it is following
        assert orz("cloud", "kill", "--force", sid).returncode == 0
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err.strip() == f"(session {sid} was killed)"


def test_logs_follow_prints_each_line_once_when_the_init_log_grows_after_the_runner_log(
        orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    # The local provider's log is "== init log ==" then "== runner log ==" (read_log): a line added to the
    # init log made the follower (also behind new --wait) print the whole log, warning block and all, again.
    sid = create(orz, cwd=tmp_path)
    warning = "2026-12-06 12:00:00,000 WARNING runner.main: unknown key 'foo' in .orz/cloud.yaml"
    live_api.provider.logs[sid] = ("== init log ==\n[orz] warning: unknown key 'foo'\n\n"
                                   f"== runner log ==\n{warning}\n")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "logs", "-f", sid], cwd=ROOT,
                            env=orz.env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != warning:  # the whole log once; then it is following
            pass
        live_api.provider.logs[sid] = ("== init log ==\n[orz] warning: unknown key 'foo'\n$ make\nbuilt\n\n"
                                       f"== runner log ==\n{warning}\n")
        assert proc.stdout.readline().strip() == "== init log =="
        assert proc.stdout.readline().strip() == "$ make"
        assert proc.stdout.readline().strip() == "built"
        assert orz("cloud", "kill", "--force", sid).returncode == 0
        rest, _ = proc.communicate(timeout=20)  # to the end: nothing was printed a second time
    finally:
        proc.kill()
    assert rest == ""


def test_logs_follow_prints_each_init_log_line_once_across_restarts(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                                     tmp_path: Path) -> None:
    # Each start begins its part of init.log with "[orz] start N, <time>", and after a restart orz server shows
    # the earlier starts' lines under "== init log, earlier starts ==": -f printed them all a second time there.
    from api.instances.providers.local import INIT_LOG, LocalProvider
    from api.settings import Settings
    from runner.workspace import mark_start

    sid = create(orz, cwd=tmp_path)
    server = LocalProvider(Settings(data_dir=tmp_path / "data", sandbox="off"))  # shows logs as orz server does
    init_log = server.session_dir("sess-a") / INIT_LOG

    def start(n: int, *lines: str) -> str:
        """The runner's start n: its header and what it printed; the API then shows what orz server shows."""
        mark_start(init_log, datetime(2026, 12, 6, 12, n, tzinfo=UTC))
        with init_log.open("a") as f:
            f.writelines(f"{line}\n" for line in lines)
        live_api.provider.logs[sid] = asyncio.run(server.read_log("sess-a", None))  # type: ignore[arg-type]
        return f"[orz] start {n}, 2026-12-06 12:{n:02d}:00 UTC"

    first = start(1, "$ make", "built")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "logs", "-f", sid], cwd=ROOT,
                            env=orz.env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert [proc.stdout.readline().rstrip("\n") for _ in range(4)] == ["== init log ==", first, "$ make", "built"]
        second = start(2, "[orz] the workspace is kept")
        assert "== init log, earlier starts ==" in live_api.provider.logs[sid]
        assert proc.stdout.readline().rstrip("\n") == second  # following on: start 1's lines are not printed again
        assert proc.stdout.readline().rstrip("\n") == "[orz] the workspace is kept"
        third = start(3)
        assert proc.stdout.readline().rstrip("\n") == third
        assert orz("cloud", "kill", "--force", sid).returncode == 0
        rest, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert rest == ""


def test_a_sign_in_that_cannot_be_renewed_asks_to_log_in_again(orz: Orz, live_api: LiveApi, home: Path) -> None:
    """The saved sign-in expired and its refresh token is no good (revoked, used, expired): one line that
    says what to do, the auth exit code, and logout still clears the file."""
    from cli.errors import EXIT_AUTH

    tenant = live_api.tenant("acme")
    token_file = home / ".config" / "orzbob" / "token.json"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(json.dumps({"api_url": live_api.url, "api_token": tenant.token,
                                      "expires_at": "2020-01-01T00:00:00Z", "source": "oidc:Test",
                                      "refresh_token": "orzrt_" + "x" * 43}))
    who = orz("cloud", "whoami")
    assert who.returncode == EXIT_AUTH
    assert_one_error_line(who, "your sign-in has expired and could not be renewed", "run orz cloud login")
    assert who.stderr.count("orz cloud login") == 1, who.stderr  # the next step, said once
    logout = orz("cloud", "logout")
    assert logout.returncode == 0 and "warning" not in logout.stderr and not token_file.exists()
    # The API token in the file was still good on the server: logout revoked it all the same.
    refused = httpx.get(f"{live_api.url}/v1/me", headers={"Authorization": f"Bearer {tenant.token}"})
    assert refused.status_code == 401


def test_cert_ttl_no_server_could_grant_is_a_usage_error(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                         tmp_path: Path) -> None:
    """`--ttl 5s` or `--ttl 25h` is a bad value (exit 2, the range named), not an internal error."""
    sid = create(orz, cwd=tmp_path)
    for ttl in ("5s", "0", "25h"):
        done = orz("cloud", "cert", sid, "--ttl", ttl)
        assert done.returncode == 2, done.stderr
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "from 10 s to 24 h" in done.stderr, done.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                          tmp_path: Path) -> None:
    """`orz cloud list | head -1`: output to a closed pipe is no error message (`ls | head` prints none)."""
    sid = create(orz, cwd=tmp_path)
    for args in (("list", "--json"), ("status", sid)):
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody will read: the first write fails with EPIPE
        try:
            done = subprocess.run([sys.executable, "-m", "cli", "cloud", *args], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, env=orz.env(), timeout=30, check=False)
        finally:
            os.close(write_end)
        assert done.stderr == "", done.stderr


def test_new_with_a_local_path_that_does_not_exist_names_the_path(orz: Orz, live_api: LiveApi,
                                                                  logged_in: Tenant, tmp_path: Path) -> None:
    """A typo in `--repo ../app` says the directory is missing, not that an https:// URL is wanted."""
    missing = tmp_path / "no-such-repo"
    for repo in (str(missing), "./no-such-repo", "~/no-such-repo"):
        done = orz("cloud", "new", "--no-attach", "--repo", repo, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert_one_error_line(done, f"--repo {repo}: no such directory")
    assert json.loads(orz("cloud", "list", "--json").stdout)["instances"] == []


def test_an_api_url_that_is_not_one_is_a_usage_error(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    """A URL without http:// (or with the API's /v1 on it) is a typo to fix, not a server to wait 10 s for
    ("cannot reach ...; trying again") nor "no such endpoint"."""
    hostport = live_api.url.removeprefix("http://")
    login = orz("cloud", "login", "--token", logged_in.token, "--api-url", hostport)
    assert_one_error_line(login, f"--api-url {hostport} is not an http:// or https:// URL")
    assert login.returncode == 2
    listed = orz("cloud", "list", ORZBOB_API_URL=hostport)
    assert_one_error_line(listed, f"ORZBOB_API_URL {hostport} is not an http:// or https:// URL")
    assert listed.returncode == 2
    with_v1 = orz("cloud", "login", "--token", logged_in.token, "--api-url", f"{live_api.url}/v1")
    assert_one_error_line(with_v1, f"--api-url {live_api.url}/v1", f"without /v1 (e.g. {live_api.url})")
    assert with_v1.returncode == 2
    assert orz("cloud", "list").returncode == 0  # the saved login is untouched


def test_a_secret_that_exists_gets_new_data_with_replace(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    """Rotating a token: `create` of an existing name points at --replace (the CLI has no PUT), which works."""
    assert orz("cloud", "secrets", "create", "gh", "--data", "GITHUB_TOKEN=old-value").returncode == 0
    again = orz("cloud", "secrets", "create", "gh", "--data", "GITHUB_TOKEN=new-value")
    assert_one_error_line(again, "a user secret named gh already exists", "--replace")
    assert "PUT" not in again.stderr and "new-value" not in again.stderr
    replaced = orz("cloud", "secrets", "create", "gh", "--replace", "--data", "GH_TOKEN=new-value")
    assert replaced.returncode == 0, replaced.stderr
    assert "secret gh replaced (user scope; keys: GH_TOKEN)" in replaced.stdout
    assert "new-value" not in replaced.stdout + replaced.stderr
    listed = json.loads(orz("cloud", "secrets", "list", "--json").stdout)["secrets"]
    assert [(s["name"], s["keys"]) for s in listed] == [("gh", ["GH_TOKEN"])]
    assert_one_error_line(orz("cloud", "secrets", "create", "nope", "--replace", "--data", "A=b"),
                          "no such secret: nope")


def test_new_leaves_a_token_in_this_checkouts_origin_behind(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                           tmp_path: Path) -> None:
    """A checkout cloned with a token in its URL (CI does this): the session clones the URL without it (the
    server refuses credentials in repo_url: they would be stored and shown), and nothing prints the token."""
    token = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "remote", "add", "origin",
                    f"https://x-access-token:{token}@example.com/acme/app.git"], check=True)
    done = orz("cloud", "new", "--no-attach", cwd=work)
    assert done.returncode == 0, done.stderr
    sid = done.stdout.split()[1]
    assert live_api.provider.specs[sid].repo_url == "https://example.com/acme/app.git"
    assert "carries a user name or token" in done.stderr and "GIT_TOKEN" in done.stderr
    assert token not in done.stdout + done.stderr
    # Given explicitly, it is refused before anything is sent, without repeating it.
    given = orz("cloud", "new", "--no-attach", "--repo", f"https://{token}@example.com/acme/app.git", cwd=tmp_path)
    assert given.returncode == 2 and "must not carry a user name or password" in given.stderr
    assert token not in given.stdout + given.stderr


def test_typed_input_quoted_back_is_escaped_and_clipped(orz: Orz, home: Path) -> None:
    """A session id pasted with an escape sequence, or a whole log line, comes back as one short line whose
    control characters are escaped, never sent to the terminal."""
    pasted = "abc\x1b[2J\x1b[31mred\x07" + "x" * 5000
    for args in (("cloud", "kill", pasted), ("cloud", "attach", pasted), ("cloud", "status", pasted)):
        done = orz(*args)
        assert done.returncode == 2, done.stderr  # bad input
        assert_one_error_line(done, r"not a session id: 'abc\x1b[2J\x1b[31mred\x07xxx", "... (5016 characters)")
        assert "\x1b" not in done.stderr and "\x07" not in done.stderr
        assert len(done.stderr) < 200, done.stderr
    url = "https://h/" + "\x1b]0;owned\x07" + "y" * 3000 + "/nope?token=secret-attach-token"
    done = orz("cloud", "attach", url)
    assert_one_error_line(done, r"not an attach URL: https://h/\x1b]0;owned\x07yyy", "(3025 characters)")
    assert "\x1b" not in done.stderr and "secret-attach-token" not in done.stderr and len(done.stderr) < 250


def test_a_bad_secret_name_or_key_says_what_is_allowed(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    """Not pydantic's rule name ("string pattern mismatch"): what a name, a key and a value may be."""
    name = orz("cloud", "secrets", "create", "My/Token", "--data", "GITHUB_TOKEN=s3cr3t-value")
    assert name.returncode == 2
    assert_one_error_line(name, "invalid secret name: a name is lowercase letters, digits, '-' and '_'")
    key = orz("cloud", "secrets", "create", "gh", "--data", "1TOKEN=s3cr3t-value")
    assert key.returncode == 2
    assert_one_error_line(key, "invalid secret data 1TOKEN: a key is a variable name: letters, digits and '_', "
                               "not starting with a digit")
    value = orz("cloud", "secrets", "create", "gh", "--data", "TOKEN=s3cr3t\x07value")
    assert value.returncode == 2
    assert_one_error_line(value, "invalid secret data TOKEN: a value is at most 65536 characters, without control")
    assert all("s3cr3t" not in done.stderr for done in (name, key, value))
    assert orz("cloud", "secrets", "list", "--json").stdout.count('"name"') == 0  # nothing was made
