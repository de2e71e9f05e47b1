"""The browser terminal's sign-in with the server's identity provider (docs/sign-in.md).

`/s/login?next=/s/<id>&provider=oidc|github` (the pages link each configured provider; without `provider`
the API picks OIDC when configured) asks the API to start an authorization-code + PKCE sign-in and sends
the browser to the provider, binding the API's `state` to this browser in an HttpOnly cookie (login CSRF).
`/s/callback` checks that cookie against the returned `state` and has the API finish (single-use state,
PKCE verifier, nonce, id_token checks). Both routes pass the browser's address on, so the API's
per-address sign-in limit counts them (429, Retry-After).

Where the API token goes: cookies ignore ports, and in local mode a session's own dev server listens on the
door's host (127.0.0.1:<port>), so any cookie the door sets on a path a session can name (`/s`) reaches
code inside the session. So the token sits in an HttpOnly, SameSite=Strict cookie whose Path is
`/s/k/<key>`, a fresh random key per sign-in that only the door's page learns: the callback sends the
browser back with `#signin=<key>` (a fragment never reaches a server), the page keeps the key in its
origin's localStorage (origins, unlike cookies, include the port) and asks for attach tokens at
`/s/k/<key>/<id>/token`. The browser sends the cookie nowhere else; the key is also the proof that the
request comes from the page (no other site or port knows it), and the cookie's value starts with it, so a
cookie some other port planted on a wider path is not taken for it.

Whose sign-in the page takes (login CSRF): another port can plant cookies too (a key's cookie holding its
owner's token, or a state cookie for its owner's callback), so a link to `/s/<id>#signin=<its key>` must not
sign the page in. The page's "Sign in with ..." link makes a random nonce, keeps it in the origin's
localStorage and sends it with `/s/login?...&nonce=`; the API keeps it sealed with the sign-in and hands it
back when it finishes, and the callback's redirect carries it beside the key (`#signin=<key>&nonce=<nonce>`).
The page takes a key only with the nonce it kept: no other port or site can read that, and it never sits in a
cookie (which every port would receive).

`/s/k/<key>/forget` (the page's Forget): the cookie's API token is revoked at the API and the answer clears
the cookie, which script cannot do (HttpOnly).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from http.cookies import CookieError, SimpleCookie
from urllib.parse import quote

from websockets.http11 import Request, Response

from api.client import ApiClient, ApiError, ApiUnreachable
from gateway import web_http as http

log = logging.getLogger(__name__)

SESSION_COOKIE = "orz_web"
LEGACY_CSRF_COOKIE = "orz_csrf"  # the double-submit cookie of sign-ins before the keyed path; cleared
KEY_BYTES = 24
KEY = re.compile(r"^[A-Za-z0-9_-]{32}$")
KEYED_VALUE = re.compile(r"^[A-Za-z0-9_-]{32}\.")  # an orz_web value of the keyed path: "<key>.<token>"
STATE_COOKIE = "orz_signin_state"
NEXT_COOKIE = "orz_signin_next"
STATE_TTL_S = 600
PROVIDERS = ("oidc", "github")
# Where a sign-in may send the browser afterwards: a terminal or replay page of this door, nothing else.
NEXT_PATH = re.compile(r"^/s/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/replay)?$")
PAGE_NONCE = re.compile(r"^[A-Za-z0-9_-]{32}$")  # made by the page (gateway/static/door.js)
START_AGAIN = ("orz: this sign-in was not started from a session's page in this browser (or took too long); "
               "open the session's page (/s/<session-id>) and sign in again")


def cookies(request: Request) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(request.headers.get("Cookie", ""))
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(name: str, value: str, *, path: str, max_age: int, secure: bool, http_only: bool = True,
            same_site: str = "Strict") -> str:
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", f"SameSite={same_site}"]
    if http_only:
        parts.append("HttpOnly")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _redirect(location: str, set_cookies: list[str]) -> Response:
    response = http.response(302, extra={"Location": location})
    for value in set_cookies:
        response.headers["Set-Cookie"] = value  # websockets' Headers keeps every value of a repeated name
    return response


def _refused(exc: ApiError) -> Response:
    """The API's refusal for the browser: its sentence, and Retry-After when it says how long to wait."""
    status, detail = http.api_refusal(exc.status, exc.code, exc.detail)
    response = http.text(status, f"orz: {detail}")
    retry_after = exc.body.get("retry_after_s")
    if status == 429 and isinstance(retry_after, int):
        response.headers["Retry-After"] = str(retry_after)
    return response


class BrowserSignIn:
    def __init__(self, api: ApiClient, web_base_url: str, internal_api_url: str) -> None:
        self.api = api
        self.internal_api_url = internal_api_url
        self.callback_url = f"{web_base_url.rstrip('/')}/s/callback"
        self.secure = web_base_url.startswith("https://")

    def _started_cleared(self) -> list[str]:
        """Set-Cookie values that remove a sign-in's state and next cookies."""
        return [_cookie(name, "", path="/s/callback", max_age=0, secure=self.secure, same_site="Lax")
                for name in (STATE_COOKIE, NEXT_COOKIE)]

    def legacy_cleared(self) -> list[str]:
        """Set-Cookie values that remove earlier sign-ins' cookies from the wide ``/s`` path."""
        return [_cookie(name, "", path="/s", max_age=0, secure=self.secure, http_only=name == SESSION_COOKIE)
                for name in (SESSION_COOKIE, LEGACY_CSRF_COOKIE)]

    def forget_legacy(self, request: Request, response: Response) -> Response:
        """``response``, removing a pre-keyed-path sign-in's cookies the browser sent with ``request``: they
        hold an API token every port of this host receives, so they go at the first page the user opens,
        not only at the next sign-in."""
        if legacy_cookies(request):
            for value in self.legacy_cleared():
                response.headers["Set-Cookie"] = value
        return response

    async def login(self, request: Request, query: dict[str, str], source: str) -> Response:
        target = query.get("next", "")
        if not NEXT_PATH.match(target):
            return http.text(400, "orz: next must be a terminal or replay page (/s/<session-id>[/replay])")
        provider = query.get("provider") or None
        if provider is not None and provider not in PROVIDERS:
            return http.text(400, f"orz: provider must be one of {', '.join(PROVIDERS)}")
        nonce = query.get("nonce", "")
        if not PAGE_NONCE.match(nonce):  # the page's link adds it: a sign-in it did not start is never taken
            return http.text(400, "orz: start signing in from the session's page (/s/<session-id>): its "
                                  "\"Sign in\" link says which browser the sign-in is for")
        try:
            started = await self.api.browser_signin_start(self.callback_url, provider=provider,
                                                          source_address=source, page_nonce=nonce)
        except ApiUnreachable:
            return http.text(503, "orz: Orzbob Cloud is unavailable right now")
        except ApiError as exc:
            return _refused(exc)
        # Lax, not Strict: the provider's redirect back is a cross-site top-level navigation.
        return _redirect(started.authorization_url, [
            _cookie(STATE_COOKIE, started.state, path="/s/callback", max_age=STATE_TTL_S, secure=self.secure,
                    same_site="Lax"),
            _cookie(NEXT_COOKIE, quote(target, safe="/"), path="/s/callback", max_age=STATE_TTL_S,
                    secure=self.secure, same_site="Lax"),
        ])

    async def callback(self, request: Request, query: dict[str, str], source: str) -> Response:
        jar = cookies(request)
        state, code = query.get("state", ""), query.get("code", "")
        expected = jar.get(STATE_COOKIE, "")
        if "error" in query:
            return http.text(403, "orz: the identity provider did not sign you in")
        if not state or not code or not expected or not hmac.compare_digest(state.encode(), expected.encode()):
            return http.text(400, "orz: this sign-in was not started in this browser; start again")
        target = jar.get(NEXT_COOKIE, "")
        if not NEXT_PATH.match(target):
            # Without the page to go back to, no page would learn the key: a cookie nobody could use. Nothing
            # is redeemed; the state expires at the API.
            return _with_cookies(http.text(400, START_AGAIN), self._started_cleared())
        try:
            grant = await self.api.browser_signin_finish(state, code, self.callback_url, source_address=source)
        except ApiUnreachable:
            return http.text(503, "orz: Orzbob Cloud is unavailable right now")
        except ApiError as exc:
            log.info("web sign-in from %s refused: %d %s", source, exc.status, exc.code)
            return _refused(exc)
        clear = self._started_cleared()
        if not grant.page_nonce or not PAGE_NONCE.match(grant.page_nonce):  # started by a door before the nonce
            return _with_cookies(http.text(400, START_AGAIN), clear)
        key = secrets.token_urlsafe(KEY_BYTES)
        # Earlier sign-ins' cookies on the wide /s path (which every port of this host received): removed.
        clear += self.legacy_cleared()
        set_cookies = [
            _cookie(SESSION_COOKIE, f"{key}.{grant.access_token}", path=f"/s/k/{key}", max_age=grant.expires_in,
                    secure=self.secure),
            *clear,
        ]
        return _redirect(f"{target}#signin={key}&nonce={grant.page_nonce}", set_cookies)

    async def forget(self, request: Request, key: str, source: str) -> tuple[Response, bool]:
        """The page's Forget: the API token in this key's cookie is revoked (it stops working everywhere, also
        where the cookie was copied to), and the answer removes the cookie, which the page's script cannot.
        Also returns whether the API refused the cookie's token (a guess counts like one at the token route)."""
        revoked = refused = False
        token = cookie_token(request, key)
        if token is not None:
            api = ApiClient(self.internal_api_url, token)
            try:
                await api.revoke()
                revoked = True
            except ApiUnreachable:
                log.warning("web sign-out from %s: the API is unreachable; the token stays valid until it "
                            "expires", source)
            except ApiError as exc:  # 401: expired or revoked already
                refused = exc.status == 401
            finally:
                await api.aclose()
        cleared = [_cookie(SESSION_COOKIE, "", path=f"/s/k/{key}", max_age=0, secure=self.secure)]
        if legacy_cookies(request):
            cleared += self.legacy_cleared()
        return _with_cookies(http.json_response(200, {"cleared": True, "revoked": revoked}), cleared), refused


def _with_cookies(response: Response, set_cookies: list[str]) -> Response:
    for value in set_cookies:
        response.headers["Set-Cookie"] = value  # websockets' Headers keeps every value of a repeated name
    return response


def legacy_cookies(request: Request) -> bool:
    """Whether the browser still holds a cookie of a sign-in from before the keyed path: its API token on the
    wide ``/s`` path, which the browser also sends to every other port of this host (a session's dev server)."""
    for part in request.headers.get("Cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == LEGACY_CSRF_COOKIE or (name == SESSION_COOKIE and not KEYED_VALUE.match(value)):
            return True
    return False


def cookie_token(request: Request, key: str) -> str | None:
    """The signed-in browser's API token, for a request to its keyed path (``/s/k/<key>/...``): only the page
    that signed in knows the key, and only there does the browser send the cookie."""
    if not KEY.match(key):
        return None
    # Every orz_web value the browser sent (a cookie planted on a wider path by another port may sit beside
    # ours): only the one that starts with this path's key is ours.
    for part in request.headers.get("Cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name != SESSION_COOKIE:
            continue
        prefix, _, token = value.partition(".")
        if token and hmac.compare_digest(prefix.encode(), key.encode()):
            return token
    return None
