"""The web door's HTTP helpers: routes, origin checks, log-safe paths, static files."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request

from gateway import web_http as http
from tests.gateway.conftest import gateway_env


def request(path: str = "/", **headers: str) -> Request:
    h = Headers()
    for key, value in headers.items():
        h[key.replace("_", "-")] = value
    return Request(path, h)


def test_routes() -> None:
    t = http.parse_target("/v1/instances/abc-1/attach?token=x.y.z&cols=100")
    assert t is not None and (t.kind, t.arg, t.query["token"], t.query["cols"]) == ("attach", "abc-1", "x.y.z", "100")
    assert http.parse_target("/v1/instances/abc/ssh?token=t").kind == "ssh"  # type: ignore[union-attr]
    assert http.parse_target("/s/abc").kind == "page"  # type: ignore[union-attr]
    assert http.parse_target("/s/abc/token").kind == "token"  # type: ignore[union-attr]
    key = "K" * 32  # the browser sign-in's keyed paths (gateway/web_signin.py)
    keyed = http.parse_target(f"/s/k/{key}/abc/recording?part=previous")
    assert keyed is not None and (keyed.kind, keyed.arg, keyed.key) == ("recording", "abc", key)
    assert http.parse_target("/s/abc/token").key == ""  # type: ignore[union-attr]
    assert http.parse_target("/s/k/short/abc/token") is None
    assert http.parse_target("/v1/instances/../attach") is None
    assert http.parse_target("/s/<script>") is None
    assert http.parse_target("/elsewhere") is None


def test_loggable_path_drops_the_query() -> None:
    assert http.loggable_path("/v1/instances/a/attach?token=secret") == "/v1/instances/a/attach"
    assert http.loggable_path(f"/s/k/{'K' * 32}/a/token") == "/s/k/.../a/token"  # nor the sign-in's key


@pytest.mark.integration
async def test_a_token_pasted_into_a_web_door_path_does_not_reach_the_gateways_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A user who pastes their API token (or an attach token's first part) where the session id goes: each
    refusal the door logs names the path or the id, cut to the token's kind and lookup prefix."""
    caplog.set_level(logging.INFO)
    api_token = "orz_" + secrets.token_urlsafe(30)  # the shape `orz cloud login` saves
    jwt_head = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9"  # an attach token's first part, pasted alone
    async with gateway_env(tmp_path) as env, httpx.AsyncClient(timeout=10) as client:
        assert env.gateway.web is not None
        door = f"127.0.0.1:{env.gateway.web.port}"
        for value in (api_token, jwt_head):
            with pytest.raises(InvalidStatus) as refused:  # an attach whose token the door refuses
                async with connect(f"ws://{door}/v1/instances/{value}/attach?token=not.a.jwt", open_timeout=5):
                    pass
            assert refused.value.response.status_code == 401
            evil = await client.get(f"http://{door}/s/{value}/token", headers={"Origin": "https://evil.example"})
            assert evil.status_code == 403
            for endpoint in ("token", "recording"):  # the page's endpoints: the API refuses the session
                answer = await client.get(f"http://{door}/s/{value}/{endpoint}",
                                          headers={"Authorization": f"Bearer {env.api.service_token}"})
                assert answer.status_code >= 400
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
    assert "refused: origin not allowed" in logged and "web token for" in logged, logged
    assert f"/v1/instances/{api_token[:12]}.../attach" in logged  # which token it was, not its value
    assert api_token not in logged and api_token[12:] not in logged
    assert jwt_head not in logged and jwt_head[3:] not in logged


def test_origin_check() -> None:
    allowed = http.configured_origins("wss://gw.example.com")
    assert allowed == frozenset({"https://gw.example.com"})
    assert http.origin_allowed(request(Host="127.0.0.1:8443"), allowed)  # not a browser: no Origin
    assert http.origin_allowed(request(Host="127.0.0.1:8443", Origin="http://127.0.0.1:8443"), allowed)
    assert http.origin_allowed(request(Host="10.0.0.5", Origin="https://gw.example.com"), allowed)
    assert not http.origin_allowed(request(Host="127.0.0.1:8443", Origin="https://evil.example"), allowed)
    assert not http.origin_allowed(request(Host="127.0.0.1:8443", Origin="null"), allowed)


def test_static_files_stay_inside_the_static_dir() -> None:
    assert http.static_file("vendor/xterm/xterm.js").status_code == 200
    assert http.static_file("../web.py").status_code == 404
    assert http.static_file("vendor/xterm/LICENSE").status_code == 404  # not a served type
    page = http.terminal_page("abc-1")
    assert b'data-session="abc-1"' in page.body
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_the_pages_link_each_configured_provider_by_name_and_escape_it() -> None:
    """What the web door shows comes from Settings.signin_providers (the real door: tests/gateway/test_web_signin*)."""
    assert "/s/login" not in http.terminal_page("abc-1").body.decode()
    assert "/s/login" not in http.terminal_page("abc-1", "replay.html", signin={}).body.decode()
    both = {"oidc": "<Keycloak & co>", "github": "GitHub"}
    page = http.terminal_page("abc-1", signin=both).body.decode()
    assert ('href="/s/login?next=%2Fs%2Fabc-1&amp;provider=oidc">Sign in with &lt;Keycloak &amp; co&gt;</a>'
            in page)
    assert 'href="/s/login?next=%2Fs%2Fabc-1&amp;provider=github">Sign in with GitHub</a>' in page
    assert "<Keycloak" not in page
    replay = http.terminal_page("abc-1", "replay.html", signin=both).body.decode()
    assert "next=%2Fs%2Fabc-1%2Freplay&amp;provider=github" in replay  # back to the replay after signing in


def test_the_pages_share_one_head_and_sign_in_form() -> None:
    """Both pages show the same head and sign-in form, each with its own title and button, from one copy."""
    terminal = http.terminal_page("abc-1").body.decode()
    replay = http.terminal_page("abc-1", "replay.html").body.decode()
    assert "<title>abc-1 · Orzbob Cloud</title>" in terminal and '<button type="submit">Connect</button>' in terminal
    assert "<title>abc-1 replay · Orzbob Cloud</title>" in replay and '<button type="submit">Load</button>' in replay
    head = replay.split("<main")[0].replace("abc-1 replay ·", "abc-1 ·").replace(">Load<", ">Connect<")
    assert head == terminal.split("<main")[0]
    assert terminal.endswith("</body>\n</html>\n") and replay.endswith("</body>\n</html>\n")
    holders = [f.name for f in http.STATIC_DIR.glob("*.html") if 'id="api-token"' in f.read_text()]
    assert holders == [http.SHELL]


def test_settings_name_the_configured_providers() -> None:
    from api.settings import Settings

    assert Settings(oidc_issuer="https://idp.example", oidc_client_id="").signin_providers() == {}
    assert Settings(oidc_issuer="https://idp.example", oidc_client_id="orz").signin_providers() == {"oidc": "OIDC"}
    both = Settings(oidc_issuer="https://idp.example", oidc_client_id="orz", oidc_name="Keycloak",
                    github_client_id="Iv1.abc")
    assert both.signin_providers() == {"oidc": "Keycloak", "github": "GitHub"}
