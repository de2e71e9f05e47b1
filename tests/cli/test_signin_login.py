"""`orz cloud login` with no token: the device grant through our API to nanoidp, a real OIDC provider;
the token file, whoami, silent refresh and logout, as a user sees them."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from api import admin
from api.db.models import ApiToken, RefreshToken
from api.settings import Settings
from cli.errors import exit_code_for
from tests.cli.conftest import ROOT, LiveApi, Orz
from tests.signin.conftest import signin_settings
from tests.signin.nanoidp import CLIENT_ID, CLIENT_SECRET, NanoIdp


@pytest.fixture
def nanoidp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NanoIdp]:
    idp = NanoIdp.start(tmp_path, clock_offset_s=getattr(request, "param", 0))  # indirect: a skewed clock
    try:
        yield idp
    finally:
        idp.stop()


@pytest.fixture
def settings(settings: Settings, nanoidp: NanoIdp) -> Settings:  # the live API's settings
    return signin_settings(settings, oidc_issuer=nanoidp.url, oidc_client_id=CLIENT_ID,
                           oidc_client_secret=CLIENT_SECRET, oidc_name="nanoidp")


def device_login(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp, *extra: str,
                 **env: str) -> subprocess.CompletedProcess[str]:
    """Run `orz cloud login`, read the code it shows, approve it at the provider, wait for it to finish."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "login", "--api-url", live_api.url, *extra],
                            cwd=ROOT, env=orz.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    match = re.search(r"open (\S+) and enter the code: (\S+)", first)
    assert match, first
    assert match.group(1) == f"{nanoidp.url}/device"
    nanoidp.approve(match.group(2))
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, first + err)


def test_device_login_whoami_refresh_logout(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp, home: Path) -> None:
    live_api.call(admin.create_org(live_api.app.ctx.state.sessions, "default"))
    # No display and no BROWSER: nothing is opened, the URL and code are printed.
    done = device_login(orz, live_api, nanoidp, DISPLAY="", BROWSER="")
    assert done.returncode == 0, done.stderr
    assert "logged in to" in done.stdout and "as ada@example.com via oidc:nanoidp" in done.stdout
    token_file = home / ".config" / "orzbob" / "token.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    saved = json.loads(token_file.read_text())
    assert saved["api_token"].startswith("orz_") and saved["refresh_token"].startswith("orzrt_")
    assert saved["source"] == "oidc:nanoidp"
    expires = datetime.fromisoformat(saved["expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=55) < expires - datetime.now(UTC) < timedelta(minutes=61)
    for secret in (saved["api_token"], saved["refresh_token"]):
        assert secret not in done.stdout + done.stderr

    who = orz("cloud", "whoami")
    assert who.returncode == 0 and "via sign-in with oidc:nanoidp" in who.stdout, who.stderr

    # An expired token is refreshed without asking: the command works and the file holds new tokens.
    saved["expires_at"] = "2020-01-01T00:00:00Z"
    token_file.write_text(json.dumps(saved))
    who = orz("cloud", "whoami")
    assert who.returncode == 0 and "ada@example.com" in who.stdout, who.stderr
    renewed = json.loads(token_file.read_text())
    assert renewed["api_token"] != saved["api_token"] and renewed["refresh_token"] != saved["refresh_token"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    # Logout revokes on the server: the token no longer works anywhere.
    assert orz("cloud", "logout").returncode == 0 and not token_file.exists()
    token_file.write_text(json.dumps({"api_url": live_api.url, "api_token": renewed["api_token"]}))
    assert "refused your token" in orz("cloud", "whoami").stderr


def test_device_login_waits_for_approval_then_an_admin_approves(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp,
                                                                 home: Path) -> None:
    sessions = live_api.app.ctx.state.sessions
    live_api.call(admin.create_org(sessions, "default"))
    object.__setattr__(live_api.app.ctx.state.signin.settings, "signin_new_users", "pending")
    done = device_login(orz, live_api, nanoidp, DISPLAY="")
    assert done.returncode == exit_code_for(403) and "waiting for an admin's approval" in done.stderr
    # Nothing was saved, so a bare `orz cloud login` would go to the default server: it names the command.
    assert f"then: orz cloud login --api-url {live_api.url}" in done.stderr
    assert not (home / ".config" / "orzbob" / "token.json").exists()
    approve = orz("admin", "approve", "ada@example.com", ORZ_DATABASE_URL=live_api.app.ctx.state.settings.database_url)
    assert approve.returncode == 0, approve.stderr
    # Where a browser can be opened (BROWSER names one), login opens the verification page in it.
    opened = home / "opened-url"
    browser = home / "fake-browser"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    browser.chmod(0o755)
    again = device_login(orz, live_api, nanoidp, DISPLAY="", BROWSER=str(browser))
    assert again.returncode == 0, again.stderr
    assert opened.read_text().strip().startswith(f"{nanoidp.url}/device?user_code=")


@pytest.mark.parametrize("nanoidp", [600], indirect=True, ids=["provider-10-min-ahead"])
def test_a_sign_in_refused_for_the_providers_clock_says_so(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp,
                                                          home: Path) -> None:
    """The person approved, the API refused the provider's id_token: login says the sign-in was refused and
    why, not "the API refused your token; run orz cloud login" (which they just did, and which fails again)."""
    live_api.call(admin.create_org(live_api.app.ctx.state.sessions, "default"))
    done = device_login(orz, live_api, nanoidp, DISPLAY="")
    assert done.returncode == exit_code_for(401)
    assert "the sign-in was not accepted" in done.stderr and "clock is ahead" in done.stderr, done.stderr
    assert "refused your token" not in done.stderr and "run orz cloud login" not in done.stderr
    assert not (home / ".config" / "orzbob" / "token.json").exists()


def test_with_token_reads_standard_input(orz: Orz, live_api: LiveApi, home: Path) -> None:
    tenant = live_api.tenant("acme")
    done = orz("cloud", "login", "--with-token", "--api-url", live_api.url, input=tenant.token + "\n")
    assert done.returncode == 0 and f"as {tenant.email}" in done.stdout, done.stderr
    assert "via" not in done.stdout
    assert "via an API token" in orz("cloud", "whoami").stdout


async def _expire_api_tokens(live_api: LiveApi) -> None:
    async with live_api.app.ctx.state.sessions() as db:
        await db.execute(update(ApiToken).values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
        await db.commit()
    live_api.app.ctx.state.principals._entries.clear()  # the API trusts a verified token for up to 5 s


async def _live_refresh_tokens(sessions: Any) -> list[RefreshToken]:
    async with sessions() as db:
        return list(await db.scalars(select(RefreshToken).where(RefreshToken.used_at.is_(None),
                                                                RefreshToken.revoked_at.is_(None))))


def test_logout_after_the_token_expired_still_ends_the_sign_in(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp,
                                                               home: Path) -> None:
    """An expired API token cannot revoke itself, but its refresh token lives 30 days: logout renews it
    first, so nothing of the sign-in stays usable on the server (a copied token file included)."""
    sessions = live_api.app.ctx.state.sessions
    live_api.call(admin.create_org(sessions, "default"))
    assert device_login(orz, live_api, nanoidp, DISPLAY="", BROWSER="").returncode == 0
    token_file = home / ".config" / "orzbob" / "token.json"
    copied = json.loads(token_file.read_text())
    live_api.call(_expire_api_tokens(live_api))
    token_file.write_text(json.dumps({**copied, "expires_at": "2020-01-01T00:00:00Z"}))
    assert len(live_api.call(_live_refresh_tokens(sessions))) == 1
    out = orz("cloud", "logout")
    assert out.returncode == 0 and "logged out" in out.stdout and "warning" not in out.stderr, out.stderr
    assert live_api.call(_live_refresh_tokens(sessions)) == []
    refused = httpx.post(f"{live_api.url}/v1/auth/token", json={"grant_type": "refresh_token",
                                                                "refresh_token": copied["refresh_token"]})
    assert refused.status_code == 400


def test_login_beyond_the_sign_in_limit_says_when_to_try_again(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp,
                                                               home: Path) -> None:
    live_api.call(admin.create_org(live_api.app.ctx.state.sessions, "default"))
    object.__setattr__(live_api.app.ctx.state.settings, "signin_rate_limit", 1)
    assert httpx.post(f"{live_api.url}/v1/auth/device", json={}).status_code == 200  # the one attempt
    done = orz("cloud", "login", "--api-url", live_api.url, DISPLAY="", BROWSER="")
    assert done.returncode == exit_code_for(429), (done.returncode, done.stderr)
    assert re.search(r"too many sign-in attempts from your address; try again in \d+ s", done.stderr), done.stderr
    assert "Traceback" not in done.stderr and not (home / ".config" / "orzbob" / "token.json").exists()


def test_a_login_waiting_for_approval_waits_out_the_sign_in_limit(orz: Orz, live_api: LiveApi, nanoidp: NanoIdp,
                                                                  home: Path) -> None:
    """Others at the address used up its sign-ins while the person approves: the CLI's polls get 429,
    it waits the Retry-After and carries on instead of failing the login."""
    from api import metrics

    live_api.call(admin.create_org(live_api.app.ctx.state.sessions, "default"))
    settings = live_api.app.ctx.state.settings
    object.__setattr__(settings, "signin_rate_limit", 2)
    # 3 s buckets: the test waits seconds, not a minute, and a CLI slow to start under a full run's load still
    # polls inside the window (with 6 s, one CI run's polls all came after it: no 429 was seen).
    object.__setattr__(settings, "auth_fail_window_s", 18)

    def refusals() -> float:
        return metrics.REGISTRY.get_sample_value("orz_http_request_duration_seconds_count", {
            "route": "/v1/auth/token", "method": "POST", "status": "429"}) or 0.0

    before = refusals()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "login", "--api-url", live_api.url], cwd=ROOT,
                            env=orz.env(DISPLAY="", BROWSER=""), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    match = re.search(r"enter the code: (\S+)", proc.stderr.readline())  # the start: one attempt
    assert match
    guess = httpx.post(f"{live_api.url}/v1/auth/token", json={"grant_type": "refresh_token",
                                                              "refresh_token": "orzrt_guess"})
    assert guess.status_code == 400  # the second: the address is at its limit now
    time.sleep(1.5)  # the CLI polls (every second with nanoidp) into the 429
    nanoidp.approve(match.group(1))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "as ada@example.com" in out, err
    assert refusals() > before
