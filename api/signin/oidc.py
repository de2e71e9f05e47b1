"""Any OpenID Connect issuer, found by its discovery document: device grant, code grant, id_token checks."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from api.errors import IdentityProviderError, InvalidIdToken, SignInRefused
from api.settings import Settings
from api.signin.http import raise_device_error, request_json
from api.signin.identity import Identity, UpstreamDevice

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Asymmetric signatures only: "none" and HMAC (keyed with the client secret) are never accepted.
SIGNING_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class OidcProvider:
    name = "oidc"

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.client_id = settings.oidc_client_id
        self._secret = settings.oidc_client_secret.get_secret_value()
        self.scopes = settings.oidc_scopes
        self.label = settings.oidc_name
        self.skew_s = settings.signin_clock_skew_s
        self.ttl_s = settings.signin_metadata_ttl_s
        self._http = http
        self._metadata: tuple[float, dict[str, Any]] | None = None
        self._jwks: tuple[float, jwt.PyJWKSet] | None = None

    @property
    def source(self) -> str:
        return f"oidc:{self.label}"

    @property
    def provider_key(self) -> str:
        return f"oidc:{self.issuer}"

    # -- metadata ----------------------------------------------------------------------------------

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is not None and self._metadata[0] > time.monotonic():
            return self._metadata[1]
        doc = await request_json(self._http, "GET", f"{self.issuer}/.well-known/openid-configuration",
                                 what="the discovery document")
        if not isinstance(doc, dict):
            raise IdentityProviderError("the issuer's discovery document is not a JSON object")
        # OIDC Discovery 4.3: the document must name the issuer it was fetched for, exactly.
        if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
            raise IdentityProviderError("the discovery document names another issuer than ORZ_OIDC_ISSUER",
                                        internal=f"discovery issuer {doc.get('issuer')!r} != {self.issuer!r}")
        self._metadata = (time.monotonic() + self.ttl_s, doc)
        return doc

    async def _endpoint(self, name: str) -> str:
        url = (await self.metadata()).get(name)
        if not isinstance(url, str) or not url:
            raise IdentityProviderError(f"the issuer's discovery document has no {name}")
        return url

    async def _keys(self, refresh: bool = False) -> jwt.PyJWKSet:
        if not refresh and self._jwks is not None and self._jwks[0] > time.monotonic():
            return self._jwks[1]
        data = await request_json(self._http, "GET", await self._endpoint("jwks_uri"), what="the JWKS")
        try:
            keys = jwt.PyJWKSet.from_dict(data)
        except (jwt.PyJWTError, TypeError, KeyError):
            raise IdentityProviderError("the issuer's JWKS holds no usable key") from None
        self._jwks = (time.monotonic() + self.ttl_s, keys)
        return keys

    async def _signing_key(self, token: str) -> tuple[Any, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidIdToken("the id_token is not a JWT") from None
        alg = header.get("alg")
        if alg not in SIGNING_ALGS:
            raise InvalidIdToken(f"the id_token's signature algorithm {str(alg)[:16]!r} is not accepted")
        kid = header.get("kid")
        for refresh in (False, True):  # an unknown kid: the issuer may have rotated its keys
            keys = await self._keys(refresh=refresh)
            matching = [k for k in keys.keys if kid is None or k.key_id == kid]
            if matching:
                return matching[0].key, alg
        raise InvalidIdToken("the id_token is signed with a key the issuer does not publish")

    # -- id_token ----------------------------------------------------------------------------------

    async def verify_id_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        """The id_token's claims once its signature (JWKS), issuer, audience, expiry and nonce check out."""
        key, alg = await self._signing_key(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=self.client_id, issuer=self.issuer, leeway=self.skew_s,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidIdToken("the id_token has expired; if the identity provider just issued it, its clock and "
                                 "this server's disagree by more than ORZ_SIGNIN_CLOCK_SKEW_S",
                                 internal=self._clock_note(token)) from None
        except jwt.ImmatureSignatureError:
            # pyjwt's name for iat/nbf in the future: the provider's clock runs ahead of this server's.
            raise InvalidIdToken("the id_token is not valid yet: the identity provider's clock is ahead of this "
                                 "server's by more than ORZ_SIGNIN_CLOCK_SKEW_S",
                                 internal=self._clock_note(token)) from None
        except jwt.InvalidAudienceError:
            raise InvalidIdToken("the id_token was issued to another client (audience)") from None
        except jwt.InvalidIssuerError:
            raise InvalidIdToken("the id_token comes from another issuer than ORZ_OIDC_ISSUER") from None
        except jwt.PyJWTError as exc:
            raise InvalidIdToken(f"the id_token is not valid: {type(exc).__name__}") from None
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.client_id:
            raise InvalidIdToken("the id_token was issued to another client (azp)")
        if nonce is not None and claims.get("nonce") != nonce:
            raise InvalidIdToken("the id_token's nonce does not match this sign-in")
        return claims

    def _clock_note(self, token: str) -> str:
        """For the operator's log: the id_token's times against this server's clock (no claim but times)."""
        claims = jwt.decode(token, options={"verify_signature": False})
        times = {name: claims.get(name) for name in ("iat", "nbf", "exp") if isinstance(claims.get(name), int)}
        now = int(time.time())
        offsets = ", ".join(f"{name} {value - now:+d} s" for name, value in times.items())
        return f"id_token times against this server's clock: {offsets} (skew allowed: {self.skew_s} s)"

    async def identity(self, id_token: str, access_token: str | None, *, nonce: str | None = None) -> Identity:
        """Who signed in: the verified id_token's subject, and its email only when the issuer verified it.
        Issuers that keep the email out of the id_token (OIDC Core 5.4) are asked at their UserInfo
        endpoint, whose answer must name the same subject."""
        claims = await self.verify_id_token(id_token, nonce=nonce)
        if "email" not in claims and access_token:
            info = await request_json(self._http, "GET", await self._endpoint("userinfo_endpoint"),
                                      what="the userinfo", headers={"Authorization": f"Bearer {access_token}"})
            if not isinstance(info, dict) or info.get("sub") != claims["sub"]:
                raise InvalidIdToken("the userinfo answer is about another subject than the id_token")
            claims = {**claims, "email": info.get("email"), "email_verified": info.get("email_verified")}
        email = claims.get("email")
        verified = claims.get("email_verified")
        if not isinstance(email, str) or not email:
            raise SignInRefused("the identity provider gave no email address (ask for the 'email' scope)")
        if verified is not True and verified != "true":
            raise SignInRefused(f"the identity provider has not verified the email address {email}")
        return Identity(provider_key=self.provider_key, source=self.source, subject=str(claims["sub"]),
                        email=email.strip().lower(), login=claims.get("preferred_username"))

    # -- grants ------------------------------------------------------------------------------------

    def _client_auth(self, form: dict[str, str]) -> dict[str, Any]:
        """client_secret_basic for a confidential client, client_id in the form for a public one."""
        if self._secret:
            return {"data": form, "auth": (self.client_id, self._secret)}
        return {"data": {**form, "client_id": self.client_id}}

    async def start_device(self) -> UpstreamDevice:
        url = await self._endpoint("device_authorization_endpoint")
        body = await request_json(self._http, "POST", url, what="the device authorization",
                                  **self._client_auth({"scope": self.scopes}))
        try:
            return UpstreamDevice(
                device_code=str(body["device_code"]), user_code=str(body["user_code"]),
                verification_uri=str(body.get("verification_uri") or body["verification_url"]),
                verification_uri_complete=body.get("verification_uri_complete"),
                expires_in=int(body.get("expires_in", 600)), interval=int(body.get("interval", 5)),
            )
        except (KeyError, TypeError, ValueError):
            raise IdentityProviderError("the device authorization answer lacks its codes") from None

    async def poll_device(self, device_code: str) -> Identity:
        url = await self._endpoint("token_endpoint")
        body = await request_json(self._http, "POST", url, what="the device token", ok_statuses=(200, 400, 401),
                                  **self._client_auth({"grant_type": DEVICE_GRANT, "device_code": device_code}))
        if "error" in body or "id_token" not in body:
            if "error" not in body:
                raise IdentityProviderError("the identity provider's token answer has no id_token")
            raise_device_error(body, interval=body.get("interval"))
        return await self.identity(str(body["id_token"]), body.get("access_token"))

    async def authorization_url(self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str) -> str:
        url = await self._endpoint("authorization_endpoint")
        query = urlencode({"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                           "scope": self.scopes, "state": state, "nonce": nonce,
                           "code_challenge": code_challenge, "code_challenge_method": "S256"})
        return f"{url}{'&' if '?' in url else '?'}{query}"

    async def redeem_code(self, *, code: str, code_verifier: str, redirect_uri: str, nonce: str) -> Identity:
        url = await self._endpoint("token_endpoint")
        body = await request_json(
            self._http, "POST", url, what="the authorization code", ok_statuses=(200, 400, 401),
            **self._client_auth({"grant_type": "authorization_code", "code": code, "code_verifier": code_verifier,
                                 "redirect_uri": redirect_uri}))
        if "id_token" not in body:
            raise_device_error({"error": "invalid_grant"} if "error" in body else body)
        return await self.identity(str(body["id_token"]), body.get("access_token"), nonce=nonce)
