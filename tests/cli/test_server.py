"""`orz server`: the embedded default comes up, saves the CLI login, serves the API, stops on Ctrl-C."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import httpx

from tests.support import ROOT, free_port, orz_env, stop_process, wait_until


def start_server(tmp_path, api_port: int, ssh_port: int) -> subprocess.Popen[str]:
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake")
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
