"""nanoidp (PyPI), a real OpenID Connect provider, run as a process on a free loopback port for the tests:
discovery, JWKS, the device authorization grant and its /device page, where `approve` signs the person in
with their password, as they would in the browser."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import free_port, stop_process, wait_for_http

CLIENT_ID = "orz-cloud"
CLIENT_SECRET = "orz-cloud-secret"  # a throwaway client of a throwaway provider

USERS = """config_version: 1
users:
  ada:
    password: "ada-password"
    email: "ada@example.com"
    roles: ["USER"]
    tenant: "default"
"""

SETTINGS = """config_version: 1
server:
  host: "127.0.0.1"
  port: {port}
oauth:
  issuer: "http://127.0.0.1:{port}"
  audience: "orz-cloud-api"
  token_expiry_minutes: 5
  clients:
    - client_id: "{client_id}"
      client_secret: "{client_secret}"
      description: "Orzbob Cloud"
"""


@dataclass
class NanoIdp:
    url: str
    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, tmp: Path) -> NanoIdp:
        port = free_port()
        config = tmp / "nanoidp"
        (config / "keys").mkdir(parents=True)
        (config / "users.yaml").write_text(USERS)
        (config / "settings.yaml").write_text(SETTINGS.format(port=port, client_id=CLIENT_ID,
                                                              client_secret=CLIENT_SECRET))
        proc = subprocess.Popen([sys.executable, "-m", "nanoidp", "--config", str(config), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        wait_for_http(proc, f"{url}/.well-known/openid-configuration", what="nanoidp to answer", interval=0.2,
                      exited=lambda: f"nanoidp exited: {proc.communicate()[0][-2000:]}")
        return cls(url=url, proc=proc)

    def approve(self, user_code: str, username: str = "ada", password: str = "ada-password") -> None:
        """The person opens the verification page, signs in and authorizes the device."""
        resp = httpx.post(f"{self.url}/device", data={"user_code": user_code, "username": username,
                                                      "password": password, "action": "authorize"}, timeout=10)
        assert resp.status_code == 200 and "authorized" in resp.text.lower(), resp.text[:500]

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        time.sleep(0)
