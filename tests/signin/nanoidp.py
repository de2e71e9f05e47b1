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


# nanoidp reads its clock for token times through datetime.now in nanoidp.services.crypto.
SKEWED_CLOCK = """
import datetime, runpy, sys
class Skewed(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.now(tz) + datetime.timedelta(seconds={offset})
import nanoidp.services.crypto
nanoidp.services.crypto.datetime = Skewed
sys.argv = ["nanoidp", *sys.argv[1:]]
runpy.run_module("nanoidp", run_name="__main__")
"""


@dataclass
class NanoIdp:
    url: str
    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, tmp: Path, *, clock_offset_s: int = 0) -> NanoIdp:
        """``clock_offset_s``: the provider's clock runs this far ahead (negative: behind) of the machine's,
        as on a host whose clock drifted; it shows in the iat/nbf/exp of the tokens it signs."""
        port = free_port()
        config = tmp / "nanoidp"
        (config / "keys").mkdir(parents=True)
        (config / "users.yaml").write_text(USERS)
        (config / "settings.yaml").write_text(SETTINGS.format(port=port, client_id=CLIENT_ID,
                                                              client_secret=CLIENT_SECRET))
        args = ["--config", str(config), "--port", str(port)]
        command = [sys.executable, "-m", "nanoidp", *args]
        if clock_offset_s:
            command = [sys.executable, "-c", SKEWED_CLOCK.format(offset=clock_offset_s), *args]
        proc = subprocess.Popen(command,
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
