"""Typed API errors. Each carries its HTTP status and a stable code; one handler renders problem+json."""

from __future__ import annotations

from typing import Any, ClassVar

from api.log import without_credentials


class OrzError(Exception):
    """Root of every error the API shows to a caller.

    ``detail`` is what the user reads; ``internal`` is for logs only and never leaves the process.
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, *, internal: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.internal = internal
        self.extra = extra
        super().__init__(self.detail)

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://orz.cloud/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            # The same sentence under the name clients of the earlier Go API read (`{"error": "..."}`).
            "error": self.detail,
        }
        if instance:
            body["instance"] = without_credentials(instance)
        body.update(self.extra)
        return body


class BadRequest(OrzError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class ValidationFailed(OrzError):
    """Well-formed input with a value the API refuses (a schema rule, or one only the server knows: a
    limit, a name that does not exist): 422, and the CLI exits 2. A body that is not JSON is a 400."""

    status = 422
    code = "validation_failed"
    title = "Request body is not valid"

    @classmethod
    def of(cls, field: str, detail: str, **extra: Any) -> ValidationFailed:
        """One refused field, listed in ``errors`` as a schema failure lists it; ``detail`` reads alone."""
        return cls(detail, errors=[{"field": field, "message": detail}], **extra)


class Unauthorized(OrzError):
    status = 401
    code = "unauthorized"
    title = "Authentication required"


class Forbidden(OrzError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class NotFound(OrzError):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowed(OrzError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class Conflict(OrzError):
    status = 409
    code = "conflict"
    title = "Conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"
    title = "The session cannot do that in its current state"


class UnsavedWork(Conflict):
    """A delete that would lose work the runner last saw unsaved; ``?force=true`` deletes anyway."""

    code = "unsaved_work"
    title = "The session has unsaved work"


class WorkUnknown(Conflict):
    """A delete without force whose session's runner did not report the workspace's final state: deleting
    could lose work nobody has seen, so it is refused like unsaved work; ``?force=true`` deletes anyway."""

    code = "work_unknown"
    title = "The session's unsaved work could not be checked"


class SessionFailed(Conflict):
    code = "session_failed"
    title = "The session failed"


class SandboxRequired(Conflict):
    code = "sandbox_required"
    title = "Sessions need the sandbox on this server"


class PayloadTooLarge(OrzError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class UnsupportedMediaType(OrzError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class QuotaExceeded(OrzError):
    status = 429
    code = "quota_exceeded"
    title = "Active session quota reached"


class TooManyAttempts(OrzError):
    """Too many attempts: sign-ins from one address (api/failed_auth.py), a user's webhook tests
    (api/webhooks/service.py); ``retry_after_s`` becomes the Retry-After header and a field of the problem."""

    status = 429
    code = "rate_limited"
    title = "Too many attempts"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, retry_after_s=max(1, retry_after_s))
        self.retry_after_s = max(1, retry_after_s)


class TooManyConnections(OrzError):
    """One client address has its cap's worth of connections open (ORZ_API_CONNECTIONS_PER_ADDRESS); answered
    by the listener itself (api/serve.py), before any request is read."""

    status = 429
    code = "too_many_connections"
    title = "Too Many Connections"


class ClientClosedRequest(OrzError):
    """The client hung up before the answer (nginx's 499): nothing is sent, and it is not our error."""

    status = 499
    code = "client_closed_request"
    title = "Client closed the request"


class ComputeUnavailable(OrzError):
    """The compute provider failed (its ProviderFailure, as an HTTP answer): 503, the user may retry."""

    status = 503
    code = "provider_unavailable"
    title = "Compute provider unavailable"


class DatabaseUnavailable(OrzError):
    """The database could not be reached or dropped the connection mid-request; safe to retry."""

    status = 503
    code = "database_unavailable"
    title = "Database unavailable"


class NotReady(OrzError):
    status = 503
    code = "not_ready"
    title = "Service not ready"


class SecretsKeyError(OrzError):
    """The secrets key-encryption keys are missing or malformed; details name key ids, never key bytes."""

    status = 500
    code = "secrets_key_error"
    title = "Secrets encryption is misconfigured"


class SecretUnreadable(SecretsKeyError):
    """A stored secret does not decrypt: its key id is not configured, or the row was altered."""

    code = "secret_unreadable"
    title = "A stored secret cannot be decrypted"


class SignInNotConfigured(NotFound):
    code = "signin_not_configured"
    title = "That sign-in method is not configured on this server"


class SignInRefused(Forbidden):
    """The identity is genuine but the server's rules keep it out (domain, org, disabled, no new users)."""

    code = "signin_refused"
    title = "Sign-in refused"


class ApprovalPending(Forbidden):
    code = "approval_pending"
    title = "Waiting for an admin's approval"


class InvalidIdToken(Unauthorized):
    """An id_token (or a provider's answer) failed a check: signature, issuer, audience, expiry, nonce."""

    code = "invalid_id_token"
    title = "The identity provider's token was not accepted"


class IdentityProviderError(OrzError):
    status = 502
    code = "identity_provider_error"
    title = "The identity provider did not answer as expected"


class OAuthError(BadRequest):
    """RFC 6749 5.2 / RFC 8628 3.5 token-endpoint errors: ``code`` is the OAuth error code."""

    title = "The grant was not accepted"


class AuthorizationPending(OAuthError):
    code = "authorization_pending"
    title = "Waiting for you to approve the sign-in in the browser"


class SlowDown(OAuthError):
    code = "slow_down"
    title = "Polling too fast"


class ExpiredToken(OAuthError):
    code = "expired_token"
    title = "The sign-in code expired"


class AccessDenied(OAuthError):
    code = "access_denied"
    title = "The sign-in was denied"


class InvalidGrant(OAuthError):
    code = "invalid_grant"
    title = "The code or refresh token is invalid, expired or already used"


class SchemaNotAtHead(RuntimeError):
    """Raised at start-up when the database schema is not at the latest migration."""


STATUS_TO_ERROR: dict[int, type[OrzError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, PayloadTooLarge,
                UnsupportedMediaType, QuotaExceeded)
}
