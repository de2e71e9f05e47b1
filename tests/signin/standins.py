"""Identity providers for the sign-in tests, served over real HTTP on loopback, each in its own thread.

- `OidcStandIn` stands in for an OpenID Connect provider (Google, Keycloak, Okta, ...): discovery, JWKS,
  RFC 8628 device authorization and a token endpoint (device and authorization-code grants, PKCE S256
  checked), signing id_tokens with its own RSA key. The happy
  path also runs against nanoidp (tests/signin/nanoidp.py), a real provider; this one exists for what a
  real one will not do on request: tokens for another audience, expired ones, another issuer's, an
  unverified email, a forged signature, a discovery document naming another issuer.
- `GitHubStandIn` stands in for GitHub (Enterprise, at its base URL): the device flow
  (/login/device/code, /login/oauth/access_token), the web flow (/login/oauth/authorize, then the code
  at /login/oauth/access_token with the client secret, the registered callback and the PKCE verifier;
  a code is single use and lives 10 minutes, and a refused one is GitHub's 200 with
  `bad_verification_code`) and the REST API at <base>/api/v3 (/user, /user/emails, /user/orgs,
  /user/teams).

The person approving in the browser is played by `approve(user_code, ...)`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import serve_json

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class ThreadedJsonServer:
    """A JSON HTTP server (tests.support.serve_json) on its own event loop thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.port = 0
        self.requests: list[tuple[str, str]] = []

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        raise NotImplementedError

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        self.requests.append((method, urlsplit(path).path))
        return self.route(method, path, headers, body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve_json(reader, writer, self._route)
        finally:
            writer.close()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def start(self) -> ThreadedJsonServer:
        """Serve from a thread of its own (for tests that block on a subprocess)."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def start_here(self) -> ThreadedJsonServer:
        """Serve from the running event loop (for tests that drive the API in-process)."""
        self._server = await self._listen()
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop_here(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def serving(self) -> Iterator[Self]:
        """Served from a thread of its own while the block runs."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        assert self.loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self.stop_here(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode()).items()}


def _basic(headers: dict[str, str]) -> tuple[str, str] | None:
    value = headers.get("authorization", "")
    if not value.lower().startswith("basic "):
        return None
    user, _, password = base64.b64decode(value[6:]).decode().partition(":")
    return user, password


def _pkce_matches(form: dict[str, str], challenge: str) -> bool:
    """RFC 7636 S256: the token request's code_verifier hashes to the authorization's code_challenge."""
    verifier = form.get("code_verifier", "").encode()
    return base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode() == challenge


@functools.cache
def _keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """The stand-in's signing key and a forger's, made once per test run (RSA generation is slow)."""
    return (rsa.generate_private_key(public_exponent=65537, key_size=2048),
            rsa.generate_private_key(public_exponent=65537, key_size=2048))


@dataclass
class Device:
    user_code: str
    expires_at: float
    claims: dict[str, Any] | None = None  # set once approved
    used: bool = False
    last_poll: float = 0.0
    denied: bool = False  # the person clicked Deny


@dataclass
class OidcStandIn(ThreadedJsonServer):
    client_id: str = "orz-test"
    client_secret: str = "orz-test-secret"
    interval: int = 1
    enforce_interval: bool = False
    # Misbehaviour knobs: the discovery document's issuer, and the key id tokens are signed with.
    discovery_issuer: str | None = None
    devices: dict[str, Device] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Who is signed in at the provider in the browser: GET /authorize then redirects straight back.
    browser_email: str | None = None

    def __post_init__(self) -> None:
        ThreadedJsonServer.__init__(self)
        self.key, self.other_key = _keys()
        self.kid = "standin-1"

    def __hash__(self) -> int:
        return id(self)

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        return {"keys": [jwk]}

    def id_token(self, *, email: str, sub: str | None = None, email_verified: Any = True, forged: bool = False,
                 **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "sub": sub or f"sub-{email}", "aud": self.client_id,
                                  "iat": now, "exp": now + 300, "email": email, "email_verified": email_verified}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        key = self.other_key if forged else self.key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": self.kid})

    def approve(self, user_code: str, **token_args: Any) -> None:
        """The person signs in at the provider and approves the device; token_args shape the id_token."""
        for device in self.devices.values():
            if device.user_code == user_code:
                device.claims = token_args
                return
        raise KeyError(user_code)

    def deny(self, user_code: str) -> None:
        """The person signs in at the provider and refuses the device."""
        next(d for d in self.devices.values() if d.user_code == user_code).denied = True

    def authorize(self, authorization_url: str, *, code_challenge: str | None = None, **token_args: Any) -> str:
        """The person signs in at the authorization URL; returns the code the browser brings back.
        ``code_challenge`` replaces the one in the URL (a code obtained for somebody else's login)."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(authorization_url).query).items()}
        assert query["response_type"] == "code" and query["client_id"] == self.client_id
        assert query["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(24)
        token_args.setdefault("nonce", query["nonce"])
        self.codes[code] = {"redirect_uri": query["redirect_uri"], "used": False,
                            "challenge": code_challenge or query["code_challenge"], "token_args": token_args}
        return code

    def _redeem(self, form: dict[str, str]) -> tuple[int, Any]:
        grant = self.codes.get(form.get("code", ""))
        if grant is None or grant["used"] or grant["redirect_uri"] != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant"}
        grant["used"] = True
        if not _pkce_matches(form, grant["challenge"]):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        return 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                     "id_token": self.id_token(**grant["token_args"])}

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        url = urlsplit(path)
        if url.path == "/.well-known/openid-configuration":
            return 200, {
                "issuer": self.discovery_issuer or self.url, "jwks_uri": f"{self.url}/jwks",
                "authorization_endpoint": f"{self.url}/authorize", "token_endpoint": f"{self.url}/token",
                "device_authorization_endpoint": f"{self.url}/device_authorization",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if url.path == "/jwks":
            return 200, self.jwks()
        if url.path == "/authorize" and self.browser_email:
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            code = self.authorize(f"{self.url}{path}", email=self.browser_email)
            return 302, {"location": f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"}
        if method != "POST":
            return 404, {"error": "not_found"}
        form = _form(body)
        if _basic(headers) != (self.client_id, self.client_secret):
            return 401, {"error": "invalid_client"}
        if url.path == "/device_authorization":
            code = secrets.token_urlsafe(16)
            user_code = f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"
            self.devices[code] = Device(user_code=user_code, expires_at=time.time() + 600)
            return 200, {"device_code": code, "user_code": user_code,
                         "verification_uri": f"{self.url}/device",
                         "verification_uri_complete": f"{self.url}/device?user_code={user_code}",
                         "expires_in": 600, "interval": self.interval}
        if url.path == "/token" and form.get("grant_type") == DEVICE_GRANT:
            device = self.devices.get(form.get("device_code", ""))
            if device is None or device.used:
                return 400, {"error": "invalid_grant"}
            now = time.time()
            if self.enforce_interval and now - device.last_poll < self.interval:
                device.last_poll = now
                return 400, {"error": "slow_down"}
            device.last_poll = now
            if device.denied:
                return 400, {"error": "access_denied"}
            if device.claims is None:
                return 400, {"error": "authorization_pending"}
            device.used = True
            return 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "expires_in": 300,
                         "id_token": self.id_token(**device.claims)}
        if url.path == "/token" and form.get("grant_type") == "authorization_code":
            return self._redeem(form)
        return 400, {"error": "unsupported_grant_type"}


@dataclass
class GitHubAccount:
    id: int
    login: str
    email: str
    verified: bool = True
    orgs: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()  # "org/team-slug"


@dataclass
class GitHubStandIn(ThreadedJsonServer):
    client_id: str = "Iv1.standin"
    client_secret: str = "standin-github-secret"  # a throwaway app of a throwaway GitHub
    interval: int = 1
    devices: dict[str, Device] = field(default_factory=dict)
    tokens: dict[str, GitHubAccount] = field(default_factory=dict)
    foreign_tokens: dict[str, GitHubAccount] = field(default_factory=dict)  # other apps' tokens
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The OAuth app's registered callback URL: GitHub sends codes nowhere else.
    callback_url: str = ""
    # Who is signed in to GitHub in the browser: GET /login/oauth/authorize then redirects straight back.
    browser_account: GitHubAccount | None = None

    def __post_init__(self) -> None:
        ThreadedJsonServer.__init__(self)

    def __hash__(self) -> int:
        return id(self)

    def approve(self, user_code: str, account: GitHubAccount) -> None:
        for device in self.devices.values():
            if device.user_code == user_code:
                device.claims = {"account": account}
                return
        raise KeyError(user_code)

    def authorize(self, authorization_url: str, account: GitHubAccount, *, code_challenge: str | None = None) -> str:
        """The person signs in at GitHub's authorize page and authorizes the app; returns the code the
        browser brings back. ``code_challenge`` replaces the URL's (a code from somebody else's login)."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(authorization_url).query).items()}
        assert urlsplit(authorization_url).path == "/login/oauth/authorize"
        assert query["client_id"] == self.client_id and query["code_challenge_method"] == "S256"
        assert query["state"]  # GitHub hands it back untouched; the API must check it
        if self.callback_url:
            assert query["redirect_uri"] == self.callback_url, "not the app's registered callback URL"
        code = secrets.token_hex(10)
        self.codes[code] = {"redirect_uri": query["redirect_uri"], "used": False, "account": account,
                            "challenge": code_challenge or query["code_challenge"], "expires_at": time.time() + 600}
        return code

    def _redeem(self, form: dict[str, str]) -> tuple[int, Any]:
        if form.get("client_secret") != self.client_secret:
            return 200, {"error": "incorrect_client_credentials"}
        grant = self.codes.get(form.get("code", ""))
        if grant is None or grant["used"] or grant["expires_at"] < time.time():
            return 200, {"error": "bad_verification_code"}
        if form.get("redirect_uri") and form["redirect_uri"] != grant["redirect_uri"]:
            return 200, {"error": "redirect_uri_mismatch"}
        grant["used"] = True
        if not _pkce_matches(form, grant["challenge"]):
            return 200, {"error": "bad_verification_code", "error_description": "PKCE verification failed"}
        return 200, {"access_token": self.token_for(grant["account"]), "token_type": "bearer",
                     "scope": "read:user,user:email,read:org"}

    def token_for(self, account: GitHubAccount) -> str:
        """A token as a GitHub OAuth app (the Go CLI's) would have obtained it."""
        token = "gho_" + secrets.token_urlsafe(24)
        self.tokens[token] = account
        return token

    def foreign_token_for(self, account: GitHubAccount) -> str:
        """A token of the same person that another OAuth app (any site's "Sign in with GitHub") obtained:
        GitHub's REST API answers to it, its token check for this app does not know it."""
        token = "gho_" + secrets.token_urlsafe(24)
        self.foreign_tokens[token] = account
        return token

    def _check_token(self, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """GitHub's POST /applications/{client_id}/token: 200 with the app for its own tokens, else 404."""
        if _basic(headers) != (self.client_id, self.client_secret):
            return 401, {"message": "Bad credentials"}
        token = str(json.loads(body or b"{}").get("access_token", ""))
        account = self.tokens.get(token)
        if account is None:
            return 404, {"message": "Not Found"}
        return 200, {"app": {"client_id": self.client_id, "name": "orz"}, "user": {"id": account.id,
                                                                                "login": account.login}}

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        url = urlsplit(path)
        if url.path == f"/api/v3/applications/{self.client_id}/token" and method == "POST":
            return self._check_token(headers, body)
        if url.path.startswith("/api/v3/"):
            presented = headers.get("authorization", "").removeprefix("Bearer ")
            account = self.tokens.get(presented) or self.foreign_tokens.get(presented)
            if account is None:
                return 401, {"message": "Bad credentials"}
            if url.path == "/api/v3/user":
                return 200, {"id": account.id, "login": account.login, "email": None}
            if url.path == "/api/v3/user/emails":
                return 200, [{"email": f"old-{account.email}", "primary": False, "verified": True},
                             {"email": account.email, "primary": True, "verified": account.verified}]
            if url.path == "/api/v3/user/orgs":
                return 200, [{"login": org, "id": n} for n, org in enumerate(account.orgs)]
            if url.path == "/api/v3/user/teams":
                return 200, [{"slug": team.split("/")[1], "organization": {"login": team.split("/")[0]}}
                             for team in account.teams]
            return 404, {"message": "Not Found"}
        if url.path == "/login/oauth/authorize" and method == "GET" and self.browser_account is not None:
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            code = self.authorize(f"{self.url}{path}", self.browser_account)
            return 302, {"location": f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"}
        form = _form(body)
        if form.get("client_id") != self.client_id:
            return 200, {"error": "incorrect_client_credentials"}
        if url.path == "/login/oauth/access_token" and "code" in form:
            return self._redeem(form)
        if url.path == "/login/device/code":
            code = secrets.token_hex(20)
            user_code = f"{secrets.token_hex(2).upper()}-{secrets.token_hex(2).upper()}"
            self.devices[code] = Device(user_code=user_code, expires_at=time.time() + 900)
            return 200, {"device_code": code, "user_code": user_code, "verification_uri": f"{self.url}/login/device",
                         "expires_in": 900, "interval": self.interval}
        if url.path == "/login/oauth/access_token":
            device = self.devices.get(form.get("device_code", ""))
            if device is None or device.used:
                return 200, {"error": "bad_verification_code"}
            if device.claims is None:
                return 200, {"error": "authorization_pending"}
            device.used = True
            return 200, {"access_token": self.token_for(device.claims["account"]), "token_type": "bearer",
                         "scope": "read:user,user:email,read:org"}
        return 404, {"message": "Not Found"}
