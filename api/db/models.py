"""Database tables. Times are UTC; ids are short prefixed strings."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, validates

from api.db.base import Base, UTCDateTime, utcnow


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("org"))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    plan: Mapped[str] = mapped_column(String(16), default="free")
    # Per-org overrides of the plan defaults; None means the plan's value.
    idle_timeout_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    retention_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Whether the org's sessions record their agent's pane (docs/security.md#recordings); read at each start.
    recording_enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    # Bumped by every quota-checked create: the write takes the org's row lock, serializing creates.
    quota_serial: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("usr"))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # "member": sees and manages only their own sessions; "admin": all of the org's (docs/security.md).
    role: Mapped[str] = mapped_column(String(16), default="member", server_default="member")
    # The previous release's admin flag, kept in step with `role` while its code may run on this schema
    # (migration 0003 is expand-only); nothing of this release reads it.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Signed in for the first time and waiting for `orz admin approve`; also is_active=False, so code of
    # the previous release (which knows only is_active) keeps them out as well (migration 0007).
    approval_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @validates("role")
    def _keep_is_admin_in_step(self, _key: str, role: str) -> str:
        self.is_admin = role == "admin"
        return role


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("tok"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="default")
    # Looked up by prefix, then the SHA-256 of the whole token is compared in constant time.
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # How the token was obtained: None for one an admin minted, else the identity provider of the
    # sign-in ("github", "oidc:<name>"); `orz cloud whoami` shows it.
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)


class UserIdentity(Base):
    """A person's account at an identity provider, linked to the user it signs in as."""

    __tablename__ = "user_identities"
    __table_args__ = (UniqueConstraint("provider", "subject", name="uq_user_identities_provider_subject"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("idn"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # "github", or "oidc:" + the issuer URL: the same subject at two issuers is two identities.
    provider: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    login: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_signin_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RefreshToken(Base):
    """Refresh tokens of signed-in CLIs: stored as prefix + SHA-256 like API tokens, single use (each
    refresh rotates it), and a reused one revokes its whole family (RFC 9700 4.14.2)."""

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("rft"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[str] = mapped_column(String(32), index=True)
    # The API token issued with this refresh token; revoked with it on logout.
    api_token_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class DeviceGrant(Base):
    """One `orz cloud login` in progress (RFC 8628), brokered to the identity provider's own device flow.

    The CLI holds the device code (stored here as prefix + SHA-256); the provider's device code, which
    the API polls with, is sealed with the secrets key. Deleted once redeemed or expired."""

    __tablename__ = "device_grants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("dev"))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    interval_s: Mapped[int] = mapped_column(Integer, default=5)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    redeemed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Who started it, as per-address limits count it (an IPv6 address as its /64): each address gets a
    # bounded share of the sign-ins in progress (api/signin/service.py). NULL: started before it was recorded.
    source: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class SigninState(Base):
    """A browser sign-in in progress (authorization code + PKCE): the state the provider sends back,
    stored as a SHA-256, with the nonce and PKCE verifier sealed. Single use; gone once finished."""

    __tablename__ = "signin_states"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("sst"))
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    redirect_uri: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    source: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # as DeviceGrant.source


class Instance(Base):
    """One session: its spec, lifecycle state, where its runner is and how it was last seen."""

    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_org_state", "org_id", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    tier: Mapped[str] = mapped_column(String(16))
    program: Mapped[str | None] = mapped_column(Text, nullable=True)
    repo_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    branch: Mapped[str | None] = mapped_column(String(255), nullable=True)
    task: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Everything else the create request asked for (secret names, resources, idle timeout).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provider: Mapped[str] = mapped_column(String(32))
    # What the provider needs to find the compute again (pid, pod name, PVC, ...).
    provider_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    route_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    route_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    runner_host_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    runner_token_prefix: Mapped[str | None] = mapped_column(String(16), nullable=True)
    runner_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The runner token a stop (or failure) just took away, good for nothing but the recording's final
    # upload until ``recording_grace_until`` (docs/security.md#recordings): the runner sends that upload
    # as it stops, which on Kubernetes is after its token was cleared.
    recording_grace_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    recording_grace_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    init_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attached_clients: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # What the agent in the session is doing (schemas.AgentState), as the runner last reported it.
    agent_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    agent_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    agent_exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    agent_state_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The workspace's git state (schemas.WorkState as JSON): dirty files, unpushed commits, the WIP push.
    work: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Recording(Base):
    """A session's pane recording (asciicast v2) as its runner uploaded it: which part is current, its size.

    The bytes are in ``recording_chunks``, one row per upload; the current part's rows have ``part_no``,
    the previous part's (kept when the current one reached the cap) ``part_no - 1``."""

    __tablename__ = "recordings"

    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True)
    # The runner's name for the current part (a new name starts a new part) and for the one before it.
    part_id: Mapped[str] = mapped_column(String(64))
    part_no: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    previous_part_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RecordingChunk(Base):
    """One upload's bytes of a recording part, at ``byte_offset`` in that part."""

    __tablename__ = "recording_chunks"

    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True)
    part_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    byte_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Event(Base):
    """Audit trail: every transition and notable action on an instance."""

    __tablename__ = "events"
    # The per-session questions on hot paths (the runner event budget, a recorded OOM kill) by kind and time.
    __table_args__ = (Index("ix_events_instance_kind_at", "instance_id", "kind", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(32))  # indexed first in ix_events_instance_kind_at
    org_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class Secret(Base):
    """A named bundle of environment values, encrypted with AES-256-GCM under a rotating key."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("org_id", "scope", "name", name="uq_secrets_org_scope_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("sec"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    # "org" for org-wide secrets, else the owning user's id; keeps the unique key free of NULLs.
    scope: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    keys: Mapped[list[str]] = mapped_column(JSON, default=list)
    key_id: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class AuthFailure(Base):
    """Failed authentications per source address and time bucket, shared by every gateway replica."""

    __tablename__ = "auth_failures"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix time // bucket length
    count: Mapped[int] = mapped_column(Integer, default=0)


class UsedJti(Base):
    """Attach-JWT ids already spent; kept until the token would have expired anyway."""

    __tablename__ = "used_jtis"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class SchedulerLease(Base):
    """Leader lease: the one scheduler replica allowed to act holds the row until it expires."""

    __tablename__ = "scheduler_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Bumped at each change of holder; the leader's writes check it (api/jobs/lease.py, fence).
    generation: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Webhook(Base):
    """A user's webhook: where their sessions' notable events are POSTed, signed with a sealed secret."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("wh"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    # Event names (schemas.WebhookEvent) this webhook is sent.
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    description: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The signing secret, sealed with the secrets key (api/credentials/secrets_box.py) and bound to this row.
    key_id: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event to send to one webhook: the outbox row (written in the event's transaction) and its log.

    ``state`` is pending until a 2xx (delivered) or until the attempts run out or the receiver refuses
    (failed). A replica sending it holds a claim (claimed_by, claimed_until); an expired claim (the
    replica died) is taken over. ``log`` holds one entry per attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("whd"))
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The exact request body, the same on every attempt (the receiver dedupes on the delivery id).
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SchemaCompat(Base):
    """Code heads that may run on the schema at ``schema_revision`` (written by `orz admin migrate`).

    Rows of another revision than the current one mean nothing: a migration that stopped half-way
    leaves rows that no longer apply, and the start check ignores them."""

    __tablename__ = "schema_compat"

    schema_revision: Mapped[str] = mapped_column(String(64), primary_key=True)
    head: Mapped[str] = mapped_column(String(64), primary_key=True)
