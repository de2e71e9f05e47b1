"""`orz server`: the embedded default comes up, saves the CLI login, serves the API, stops on Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.support import ROOT, free_port, orz_env, stop_process, wait_until


def start_server(tmp_path, api_port: int, ssh_port: int, **extra_env: str) -> subprocess.Popen[str]:
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake", **extra_env)
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "server", "--api-port", str(api_port), "--ssh-port", str(ssh_port),
         "--web-port", "0", "--data-dir", str(tmp_path / "data")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def test_first_start_bootstraps_login_and_prints_next_steps(tmp_path):
    api_port, ssh_port = free_port(), free_port()
    proc = start_server(tmp_path, api_port, ssh_port)
    try:
        wait_until(lambda: _healthy(api_port) or proc.poll() is not None, timeout=60, what="orz server")
        assert proc.poll() is None, stop_process(proc)
        token_file = tmp_path / "home" / ".config" / "orzbob" / "token.json"
        wait_until(token_file.exists, timeout=10, what="token file")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        login = json.loads(token_file.read_text())
        assert login["api_url"] == f"http://127.0.0.1:{api_port}"
        me = httpx.get(f"{login['api_url']}/v1/me", headers={"Authorization": f"Bearer {login['api_token']}"})
        assert me.status_code == 200 and me.json()["user"]["email"] == "admin@localhost"
        created = httpx.post(f"{login['api_url']}/v1/instances", json={},
                             headers={"Authorization": f"Bearer {login['api_token']}"})
        assert created.status_code == 201
    finally:
        out, err = stop_process(proc)
    assert proc.returncode == 0, err
    assert "orz cloud new" in out and "orz cloud list" in out and "orz cloud attach" in out
    assert login["api_token"] not in out + err  # the token goes to the file, never to the terminal or logs
    # The terminal: the banner, then one human line per event; the JSON lines are in the log file.
    log_file = tmp_path / "data" / "logs" / "server.log"
    assert f"  Logs {log_file}" in out
    assert "export PATH" not in out  # orz is on this PATH already
    assert not [line for line in err.splitlines() if line.startswith("{")], err
    assert re.search(r"^\d\d:\d\d:\d\d  session [a-z0-9-]+: pending -> starting$", err, re.M), err
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(e.get("event") == "access" and e.get("route") == "/v1/instances" for e in logged)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert login["api_token"] not in log_file.read_text()

    # A second start keeps the same login, and the session stopped by Ctrl-C is resumed.
    proc = start_server(tmp_path, api_port, ssh_port)
    try:
        wait_until(lambda: _healthy(api_port) or proc.poll() is not None, timeout=60, what="second start")
        assert json.loads(token_file.read_text())["api_token"] == login["api_token"]
        def statuses() -> list[str]:
            listed = httpx.get(f"{login['api_url']}/v1/instances",
                               headers={"Authorization": f"Bearer {login['api_token']}"}).json()
            return [i["status"] for i in listed["instances"]]

        wait_until(lambda: statuses() == ["starting"], timeout=20, what="the stopped session to resume")
    finally:
        out, err = stop_process(proc)
    assert "Resumed 1 session" in out


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_port_in_use_is_named_with_its_flag_and_variable(tmp_path):
    ssh_port = free_port()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        api_port = taken.getsockname()[1]
        proc = start_server(tmp_path, api_port, ssh_port)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip() == (f"orz: port {api_port} (API) on 127.0.0.1 is already in use; choose another with "
                           f"--api-port PORT or ORZ_API_PORT=PORT (e.g. make dev ARGS='--api-port {api_port + 1}')")
    assert not (tmp_path / "data" / "orz.db").exists()  # refused before anything was made


def test_the_port_suggested_for_one_in_use_is_free_and_not_another_of_the_servers(tmp_path):
    """`make dev ARGS='--api-port 18731 --ssh-port 18732'` with 18731 taken said "e.g. make dev ARGS='--api-port
    18732'": the server's own SSH port, so following the advice failed again."""
    with contextlib.ExitStack() as held:
        for _ in range(50):
            held.close()
            api_port = free_port()
            taken = [held.enter_context(socket.socket()) for _ in range(2)]
            try:
                for offset, sock in enumerate(taken):  # the API port and the next one are in use
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", api_port + offset))
                    sock.listen()
            except OSError:
                continue
            break
        ssh_port = api_port + 2  # free, but this server's own
        proc = start_server(tmp_path, api_port, ssh_port)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    suggested = re.search(r"e\.g\. make dev ARGS='--api-port (\d+)'", err)
    assert suggested, err
    port = int(suggested.group(1))
    assert port > ssh_port, err
    with socket.socket() as sock:  # free
        sock.bind(("127.0.0.1", port))


def test_a_bad_setting_is_named_by_its_variable_not_reported_as_an_internal_error(tmp_path):
    """ORZ_API_TRUSTED_PROXIES=bogus printed "orz: internal error: ValidationError: 1 validation error for
    Settings api_trusted_proxies ..." (a pydantic dump that echoes values): the operator's typo, not a bug."""
    proc = start_server(tmp_path, free_port(), free_port(), ORZ_API_TRUSTED_PROXIES="10.0.0.0/8,bogus",
                        ORZ_SIGNIN_NEW_USERS="maybe", ORZ_OIDC_CLIENT_SECRET="s3cret-value")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.startswith("orz: invalid configuration: "), err
    assert "ORZ_API_TRUSTED_PROXIES: not an IP address or CIDR: 'bogus'" in err
    assert "ORZ_SIGNIN_NEW_USERS: Input should be 'create', 'pending' or 'refuse'" in err
    assert "internal error" not in err and "pydantic" not in err and "s3cret-value" not in err
    assert not (tmp_path / "data" / "orz.db").exists()


def test_the_banner_says_how_to_put_orz_on_the_path(tmp_path):
    proc = start_server(tmp_path, free_port(), free_port(), PATH="/usr/bin:/bin")
    banner: list[str] = []
    reader = threading.Thread(target=lambda: banner.extend(_until_banner_end(proc)), daemon=True)
    reader.start()
    reader.join(60)
    stop_process(proc)
    out = "".join(banner)
    assert f'  export PATH="{Path(sys.executable).parent}:$PATH"   # once per terminal' in out, out
    steps = out.split("Next, in another terminal:")[1].splitlines()
    assert steps[1].startswith("  export PATH=") and steps[2].startswith("  orz cloud new")


def _until_banner_end(proc: subprocess.Popen[str]) -> list[str]:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    return lines


def test_the_terminal_gets_events_and_problems_not_chatter():
    import logging

    from cli.server_log import EVENTS, TerminalFilter

    def record(name: str, level: int, **extra: object) -> logging.LogRecord:
        rec = logging.LogRecord(name, level, __file__, 1, "m", None, None)
        rec.__dict__.update(extra)
        return rec

    shown = TerminalFilter().filter
    assert not shown(record("api.app", logging.INFO, event="access"))
    assert not shown(record("api.app", logging.ERROR, event="access"))  # the error itself is logged apart
    assert not shown(record("sanic.root", logging.INFO))
    assert not shown(record("alembic.runtime.migration", logging.INFO))
    assert shown(record(EVENTS.name, logging.INFO))
    assert shown(record("gateway.server", logging.INFO, event="attached"))
    assert shown(record("api.instances.service", logging.INFO, event="program"))
    assert shown(record("api.jobs.scheduler", logging.WARNING))


def test_on_a_terminal_the_server_gives_no_advice_of_its_web_framework(tmp_path):
    """`make dev` in a terminal printed "warning: Sanic is running in PRODUCTION mode. Consider using '--debug'
    or '--dev' while actively developing your application." (its colour codes shown as U+FFFD): flags no
    orz command has, about a library the user never chose."""
    controller, terminal = pty.openpty()
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "server", "--api-port", str(free_port()), "--ssh-port", str(free_port()),
         "--web-port", "0", "--data-dir", str(tmp_path / "data")],
        env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=ROOT)
    os.close(terminal)
    shown = b""
    try:
        with contextlib.suppress(OSError):  # EIO once the server is gone
            while b"Press Ctrl-C" not in shown and proc.poll() is None:
                ready, _, _ = select.select([controller], [], [], 60)
                assert ready, shown
                shown += os.read(controller, 4096)
    finally:
        stop_process(proc)
        os.close(controller)
    text = shown.decode(errors="replace")
    assert "Orzbob Cloud is running" in text, text
    assert "Sanic" not in text and "PRODUCTION" not in text and "--dev" not in text, text
