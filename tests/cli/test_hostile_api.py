"""The CLI against an API that lies (compromised, or an impostor the user was sent to log in to): what it
answers must not become commands on the user's machine."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Orz
from tests.signin.standins import ThreadedJsonServer

SID = "myapp-abc123"


class HostileApi(ThreadedJsonServer):
    """Answers an attach with an SSH host that carries an ssh_config line of its own."""

    def __init__(self, ssh_host: str, grant_id: str = SID, host_keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.ssh_host = ssh_host
        self.grant_id = grant_id
        self.host_keys = list(host_keys)

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "POST" and path == f"/v1/instances/{SID}/attach":
            soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
            return 200, {"id": self.grant_id, "status": "running", "user": "usr_x",
                         "certificate": "ssh-ed25519-cert-v01@openssh.com AAAA not-a-real-cert",
                         "certificate_expires_at": soon, "token": "x", "token_expires_at": soon,
                         "ssh": f"ssh {SID}@gw", "ssh_host": self.ssh_host, "ssh_port": 22,
                         "attach_url": "http://gw/x", "readonly": False, "host_keys": self.host_keys}
        return 404, {"type": "about:blank", "title": "Not found", "status": 404, "detail": "no such route"}


def login(orz: Orz, url: str) -> None:
    path = orz.home / ".config" / "orzbob" / "token.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"api_url": url, "api_token": "orz_" + "a" * 43,
                                "expires_at": "9999-12-31T23:59:59Z"}))


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_an_ssh_host_with_an_ssh_config_line_runs_nothing(orz: Orz, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with HostileApi(f"gw.invalid\n    ProxyCommand touch {marker}").serving() as api:
        login(orz, api.url)
        assert orz("cloud", "ssh-config", "--write").returncode == 0
        # What `ssh <id>.orz` does: its Match exec fetches the certificate, then it reads hosts/*.conf.
        subprocess.run(["ssh", "-F", str(orz.home / ".ssh" / "config"), "-o", "BatchMode=yes",
                        "-o", "ConnectTimeout=3", f"{SID}.orz", "true"],
                       env=orz.env(), capture_output=True, text=True, timeout=30, check=False)
        refreshed = orz("cloud", "_refresh-cert", f"{SID}.orz")
    assert not marker.exists(), "the API's ssh_host ran a command on the user's machine"
    assert refreshed.returncode != 0
    assert "not a host name" in refreshed.stderr, refreshed.stderr
    for conf in (orz.home / ".config" / "orzbob" / "hosts").glob("*.conf"):
        assert "ProxyCommand" not in conf.read_text()


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Uta2V5LWZvci10ZXN0cy0wMDAw"


def test_a_grant_for_another_session_or_an_option_as_host_is_refused(orz: Orz) -> None:
    # A trailing newline too: `$` in a pattern lets one through, and with a host key it reached known_hosts.
    for host, grant_id, keys in (("-oProxyCommand=touch /tmp/x", SID, ()), ("gw.example", "-oProxyCommand=x", ()),
                                 ("gw.example\n", SID, (KEY,))):
        with HostileApi(host, grant_id, keys).serving() as api:
            login(orz, api.url)
            done = orz("cloud", "cert", SID)
        assert done.returncode != 0, done.stdout
        assert "orz: the API" in done.stderr, done.stderr
        assert not (orz.home / ".config" / "orzbob" / "known_hosts").exists()


class HostileSignIn(ThreadedJsonServer):
    """Starts a device sign-in whose verification URL is no web page; every poll is then refused."""

    def __init__(self, verification_uri: str) -> None:
        super().__init__()
        self.verification_uri = verification_uri

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if path == "/v1/auth/device":
            return 200, {"device_code": "orzd_" + "x" * 40, "user_code": "ABCD-EFGH", "expires_in": 30,
                         "verification_uri": self.verification_uri, "interval": 1, "provider": "oidc"}
        return 400, {"type": "about:blank", "title": "Denied", "status": 400, "detail": "the person said no",
                     "code": "access_denied"}


@pytest.mark.parametrize("uri", ["--renderer-cmd-prefix=touch /tmp/orz-owned", "file:///etc/passwd"])
def test_login_opens_only_web_pages_the_api_names(orz: Orz, tmp_path: Path, uri: str) -> None:
    # The browser gets the URL as an argument: one starting with '-' is an option (Chromium's
    # --renderer-cmd-prefix runs a command), a file:// URL opens whatever xdg-open does with a file.
    opened = tmp_path / "opened"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$@" > {opened}\n')
    browser.chmod(0o755)
    with HostileSignIn(uri).serving() as api:
        done = orz("cloud", "login", "--api-url", api.url, BROWSER=str(browser), DISPLAY="")
    assert done.returncode != 0
    assert not opened.exists(), f"the browser was started with {opened.read_text()!r}"
    assert "To sign in, open" in done.stderr  # the person still reads where to go
