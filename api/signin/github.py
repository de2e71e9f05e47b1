"""GitHub OAuth apps (github.com or GitHub Enterprise at ORZ_GITHUB_BASE_URL): the device flow, the web
flow (authorization code with state and PKCE S256, for the browser terminal) and /user."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import httpx

from api.errors import IdentityProviderError, InvalidGrant, InvalidIdToken, SignInRefused
from api.settings import Settings
from api.signin.http import raise_device_error, request_json
from api.signin.identity import Identity, UpstreamDevice

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SCOPES = "read:user user:email read:org"


class GitHubProvider:
    name = "github"
    source = "github"
    provider_key = "github"

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.base_url = settings.github_base_url.rstrip("/")
        self.api_url = settings.github_api_url.rstrip("/")
        self.client_id = settings.github_client_id
        self._secret = settings.github_client_secret.get_secret_value()
        self.want_orgs = bool(settings.signin_orgs())
        self.want_teams = bool(settings.signin_teams())
        self._http = http

    async def start_device(self) -> UpstreamDevice:
        body = await request_json(self._http, "POST", f"{self.base_url}/login/device/code",
                                  what="the GitHub device code", data={"client_id": self.client_id, "scope": SCOPES})
        try:
            return UpstreamDevice(
                device_code=str(body["device_code"]), user_code=str(body["user_code"]),
                verification_uri=str(body["verification_uri"]), verification_uri_complete=None,
                expires_in=int(body.get("expires_in", 900)), interval=int(body.get("interval", 5)),
            )
        except (KeyError, TypeError, ValueError):
            raise IdentityProviderError("GitHub's device code answer lacks its codes") from None

    async def poll_device(self, device_code: str) -> Identity:
        form = {"client_id": self.client_id, "device_code": device_code, "grant_type": DEVICE_GRANT}
        if self._secret:
            form["client_secret"] = self._secret
        # GitHub answers 200 with {"error": ...} while the person has not approved yet.
        body = await request_json(self._http, "POST", f"{self.base_url}/login/oauth/access_token",
                                  what="the GitHub access token", ok_statuses=(200, 400), data=form)
        if not isinstance(body, dict) or "access_token" not in body:
            raise_device_error(body if isinstance(body, dict) else {}, interval=(body or {}).get("interval"))
        return await self.identity_from_token(str(body["access_token"]))

    @property
    def web_flow(self) -> bool:
        """GitHub redeems a web flow's code only with the app's client secret."""
        return bool(self._secret)

    async def authorization_url(self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str) -> str:
        """GitHub's authorize page for the web flow; GitHub is not OIDC, so ``nonce`` has no use here (the
        single-use state and PKCE bind the code to this sign-in)."""
        del nonce
        query = urlencode({"client_id": self.client_id, "redirect_uri": redirect_uri, "scope": SCOPES,
                           "state": state, "code_challenge": code_challenge, "code_challenge_method": "S256",
                           "allow_signup": "false"})
        return f"{self.base_url}/login/oauth/authorize?{query}"

    async def redeem_code(self, *, code: str, code_verifier: str, redirect_uri: str, nonce: str) -> Identity:
        """The web flow's code (single use at GitHub, bound to the PKCE verifier) for a token, then who it is."""
        del nonce
        form = {"client_id": self.client_id, "client_secret": self._secret, "code": code,
                "redirect_uri": redirect_uri, "code_verifier": code_verifier}
        # GitHub answers 200 with {"error": "bad_verification_code"} for an unknown, used or expired code.
        body = await request_json(self._http, "POST", f"{self.base_url}/login/oauth/access_token",
                                  what="the GitHub access token", ok_statuses=(200, 400), data=form)
        if not isinstance(body, dict) or "access_token" not in body:
            error = str((body or {}).get("error") or "") if isinstance(body, dict) else ""
            if error in ("bad_verification_code", "invalid_grant", "redirect_uri_mismatch"):
                raise InvalidGrant("GitHub did not accept the sign-in code (unknown, expired or already used)")
            raise IdentityProviderError(f"GitHub refused the sign-in code ({error[:64] or 'no error'})")
        return await self.identity_from_token(str(body["access_token"]))

    async def issued_to_this_app(self, token: str) -> bool | None:
        """Whether GitHub issued ``token`` to this OAuth app, by GitHub's token check (which takes the app's
        client secret); None without the secret, when GitHub will not say. /user answers for a token of any
        app, or a personal access token, so it alone proves only whose token it is, not that its holder
        signed in here."""
        if not self._secret:
            return None
        body = await request_json(self._http, "POST", f"{self.api_url}/applications/{self.client_id}/token",
                                  what="the GitHub token check", ok_statuses=(200, 404, 422),
                                  auth=(self.client_id, self._secret), json={"access_token": token})
        app = body.get("app") if isinstance(body, dict) else None
        return isinstance(app, dict) and str(app.get("client_id")) == self.client_id

    async def _get(self, token: str, path: str, what: str) -> Any:
        try:
            response = await self._http.get(f"{self.api_url}{path}", headers={
                "Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"})
        except httpx.HTTPError:
            raise IdentityProviderError(f"cannot reach GitHub for {what}") from None
        if response.status_code == 401:
            raise InvalidIdToken("GitHub does not accept the token")
        if response.status_code != 200:
            raise IdentityProviderError(f"GitHub answered {response.status_code} to {what}")
        try:
            return response.json()
        except ValueError:
            raise IdentityProviderError(f"GitHub's answer to {what} is not JSON") from None

    async def identity_from_token(self, token: str) -> Identity:
        """Who the GitHub token belongs to: id, login, primary verified email and (when rules need them)
        org memberships. The token itself is not kept."""
        user = await self._get(token, "/user", "the user")
        if not isinstance(user, dict) or "id" not in user:
            raise IdentityProviderError("GitHub's /user answer has no id")
        emails = await self._get(token, "/user/emails", "the user's emails")
        email = next((str(e["email"]) for e in emails if isinstance(e, dict) and e.get("primary")
                      and e.get("verified") and e.get("email")), None) if isinstance(emails, list) else None
        if email is None:
            raise SignInRefused("your GitHub account has no verified primary email address")
        orgs: tuple[str, ...] | None = None
        if self.want_orgs:
            listing = await self._get(token, "/user/orgs", "the user's orgs")
            orgs = tuple(str(o["login"]).lower() for o in listing if isinstance(o, dict) and o.get("login")) \
                if isinstance(listing, list) else ()
        teams: tuple[str, ...] | None = None
        if self.want_teams:
            listing = await self._get(token, "/user/teams", "the user's teams")
            teams = tuple(f"{t['organization']['login']}/{t['slug']}".lower() for t in listing
                          if isinstance(t, dict) and t.get("slug") and isinstance(t.get("organization"), dict)
                          and t["organization"].get("login")) if isinstance(listing, list) else ()
        return Identity(provider_key=self.provider_key, source=self.source, subject=str(user["id"]),
                        email=email.strip().lower(), login=str(user.get("login") or "") or None, orgs=orgs,
                        teams=teams)
