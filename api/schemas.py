"""The API's contract: request and response models shared by the API, gateway, runner and CLI.

Plain pydantic models only: no Sanic or SQLAlchemy imports, so importing this module is cheap.
Requests forbid unknown fields; responses may grow new fields (clients must ignore unknown ones).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from api import cloud_yaml

SESSION_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
# In the line a draining gateway shows attached terminals and in its SSH disconnect message; `orz cloud
# attach` reconnects when it reads this (gateway/drain.py, cli/reconnect.py).
GATEWAY_RESTARTING = "this gateway is restarting"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SECRET_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-_]{0,62}[a-z0-9])?$")
# The repository file that prepares each session, and its `${NAME}` reference to a session secret.
CLOUD_CONFIG_PATH = ".orz/cloud.yaml"


def wire_time(at: datetime) -> str:
    """A timestamp as the API's JSON writes every other one (`2026-12-05T18:04:40.120000Z`): for the JSON this
    module's models do not render (webhook bodies, a delivery's attempt log)."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")

SECRET_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Tier = Literal["small", "medium", "large"]
# member: their own sessions only; admin: every session of their org (docs/security.md, "Roles").
Role = Literal["member", "admin"]
ROLES: tuple[Role, ...] = ("member", "admin")
StateName = Literal[
    "pending", "starting", "running", "unhealthy", "stopping", "stopped", "failed", "deleting", "deleted"
]
TIER_RESOURCES: dict[str, dict[str, str]] = {
    "small": {"cpu": "2", "memory": "4Gi"},
    "medium": {"cpu": "4", "memory": "8Gi"},
    "large": {"cpu": "8", "memory": "16Gi"},
}


# Control characters a request string may carry, per field. Everything stored goes through the database
# (PostgreSQL text cannot hold NUL) and into argv/env of the runner (no NUL there either); names and
# one-line values carry no control character at all. The same ranges, as JSON-schema patterns, go into
# the OpenAPI document so clients and fuzzers know them.
_C0_C1 = "\\x00-\\x1f\\x7f-\\x9f"
_CONTROL_RULES: dict[str, tuple[str, str]] = {
    # rule: (what is refused, as a regex class body; what to call the allowed content in messages)
    "line": (_C0_C1, "one line of text with no control characters"),
    "text": ("\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f",
             "text whose only control characters are tab, newline and carriage return"),
    "log": ("\\x00", "text without NUL characters"),
}
# Lone surrogates (no UTF-8 for them) are refused by every rule. A JSON body cannot bring one: the
# parser refuses it first (400), so the documented patterns leave them out (regex engines of other
# languages cannot even write them).
_CONTROL_RES = {rule: re.compile(f"[{refused}\\ud800-\\udfff]") for rule, (refused, _) in _CONTROL_RULES.items()}
CONTROL_PATTERNS = {rule: f"^[^{refused}]*$" for rule, (refused, _) in _CONTROL_RULES.items()}
ControlRule = Literal["line", "text", "log"]


def scrub_controls(text: str, rule: ControlRule = "log") -> str:
    """``text`` with every character the rule refuses replaced by U+FFFD: for output a sender does not
    control (a command's log, an exception message) that must still be reported."""
    return _CONTROL_RES[rule].sub("\ufffd", text)


def _refuse_controls(value: Any, rule: ControlRule, path: str = "") -> None:
    """Raise for the first character of ``value`` (a string, or strings inside lists and dicts) the rule
    refuses. The error names the character, its position and the path below the field (``.KEY``,
    ``.0``), never the value: it may be a secret."""
    if isinstance(value, str):
        bad = _CONTROL_RES[rule].search(value)
        if bad is not None:
            raise PydanticCustomError(
                "control_character", "contains {char} at position {pos}; it must be {allowed}",
                {"char": f"U+{ord(bad.group()):04X}", "pos": bad.start(), "allowed": _CONTROL_RULES[rule][1],
                 "path": path},
            )
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _refuse_controls(item, rule, f"{path}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            # Keys are names: never a control character, whatever the values may carry.
            _refuse_controls(key, "line", f"{path}.[key]")
            _refuse_controls(item, rule, f"{path}.{key}")  # the key passed: safe to name


def _valid_session_id(value: str) -> str:
    if not SESSION_ID_RE.match(value):
        raise ValueError("session ids are 1-32 characters of a-z, 0-9 and '-', not starting or ending in '-'")
    return value


def _valid_branch(value: str) -> str:
    # The subset of git-check-ref-format that matters for a branch given on a command line.
    bad = (
        value.startswith(("-", "/", "."))
        or value.endswith(("/", ".", ".lock"))
        or ".." in value
        or "//" in value
        or "@{" in value
        or any(c in value for c in " ~^:?*[\\\x7f")
        or any(ord(c) < 32 for c in value)
    )
    if bad:
        raise ValueError("not a valid git branch name")
    return value


# A route (and a runner's ssh_host) that names a unix socket instead of a TCP host: a sandboxed local runner.
UNIX_ROUTE_PREFIX = "unix:"

# The branch rule of _valid_branch as a JSON-schema (ECMA) pattern, for the OpenAPI document;
# tests check that the two agree.
BRANCH_PATTERN = (
    r"^(?![-/.])(?!.*(?:\.\.|//|@\{))(?!.*(?:[/.]|\.lock)$)"
    r"[^\x00-\x20~^:?*\[\\\x7f-\x9f]+$"
)
_URL_CHAR = r"[^\s\x00-\x1f\x7f-\x9f]"
# The authority (up to the first / ? #) carries no credentials: no user at all in http(s), git and file
# URLs (GitHub and GitLab take a token as the user name), and in ssh:// a user name but no password.
# Enforced and documented as is: ECMA and Python read it the same way.
_HOST_CHAR = r"[^\s\x00-\x1f\x7f-\x9f/?#@]"
_AFTER_HOST = rf"(?:[/?#]{_URL_CHAR}*)?"
# No lookaheads: generators of test data from the document (schemathesis, via hypothesis) cannot build from
# them and fall back to filtering random text, which takes minutes.
_NOT_EMPTY_REST = rf"(?:{_HOST_CHAR}+{_AFTER_HOST}|[/?#]{_URL_CHAR}*)"  # at least one character after ://
REPO_URL_PATTERN = (
    rf"^(?:(?:https?|git|file)://{_NOT_EMPTY_REST}"
    rf"|ssh://(?:[^\s\x00-\x1f\x7f-\x9f/?#:]*@{_HOST_CHAR}*{_AFTER_HOST}|{_NOT_EMPTY_REST})"
    rf"|[A-Za-z0-9._][A-Za-z0-9._-]*@[A-Za-z0-9.-]+:{_URL_CHAR}+)$"
)
_REPO_URL_RE = re.compile(REPO_URL_PATTERN)
_LOOSE_URL_RE = re.compile(rf"^(?:https?|ssh|git|file)://{_URL_CHAR}+$")


# What to do instead of a token in the URL, which would be stored with the session and shown wherever it is.
_CLONE_ADVICE = ("store the token as a secret with the key GIT_TOKEN (orz cloud secrets create git --data "
                    "GIT_TOKEN=...) and name it when creating (--secrets git, or \"secrets\": [\"git\"])")


def _valid_repo_url(value: str) -> str:
    if not _REPO_URL_RE.fullmatch(value):
        if _LOOSE_URL_RE.fullmatch(value):
            # A URL but for its credentials: they would be kept in the session's row and shown to its org's
            # admins, in webhooks and in logs.
            raise ValueError(f"repo_url must not carry a user name or password "
                             f"({value.split('://', 1)[0]}://...@): {_CLONE_ADVICE}")
        raise ValueError("repo_url must be an https://, ssh://, git://, file:// or user@host:path URL")
    return value


SessionId = Annotated[str, StringConstraints(min_length=1, max_length=32), AfterValidator(_valid_session_id),
                      Field(json_schema_extra={"pattern": SESSION_ID_RE.pattern})]
Branch = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_valid_branch),
                   Field(json_schema_extra={"pattern": BRANCH_PATTERN})]
RepoUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048), AfterValidator(_valid_repo_url),
                    Field(json_schema_extra={"pattern": REPO_URL_PATTERN})]
SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_RE.pattern, min_length=1, max_length=64)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_RE.pattern)]


def _document_controls(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Put each field's control-character rule into the JSON schema as a pattern (where no stricter
    pattern is there already), and close dicts whose keys have a pattern."""
    rules: Mapping[str, ControlRule] = getattr(model, "control_rules", {})
    for name, prop in schema.get("properties", {}).items():
        _pattern_strings(prop, CONTROL_PATTERNS[rules.get(name, "line")])


def _pattern_strings(node: dict[str, Any], pattern: str) -> None:
    if node.get("type") == "string" and "enum" not in node and "const" not in node:
        node.setdefault("pattern", pattern)
    for sub in node.get("anyOf", []):
        _pattern_strings(sub, pattern)
    if isinstance(node.get("items"), dict):
        _pattern_strings(node["items"], pattern)
    if "patternProperties" in node:
        node.setdefault("additionalProperties", False)
        for sub in node["patternProperties"].values():
            _pattern_strings(sub, pattern)
    elif isinstance(node.get("additionalProperties"), dict):
        _pattern_strings(node["additionalProperties"], pattern)


class Request(BaseModel):
    """Base of every request body: unknown fields and control characters a field cannot carry are errors.

    Every string field is one line without control characters unless ``control_rules`` names it:
    "text" also allows tab, newline and carriage return; "log" refuses only NUL (runner output).
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, json_schema_extra=_document_controls)
    control_rules: ClassVar[Mapping[str, ControlRule]] = {}

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        _refuse_controls(value, cls.control_rules.get(info.field_name or "", "line"))
        return value


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------- public


class InstanceCreate(Request):
    # A task is prose; a program may be a small shell script. Names, URLs and branches are one line.
    control_rules = {"task": "text", "program": "text"}
    tier: Tier = "small"
    program: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    repo_url: RepoUrl | None = None
    branch: Branch | None = None
    secrets: Annotated[list[SecretName], Field(max_length=32, json_schema_extra={"uniqueItems": True})] = Field(
        default_factory=list)
    task: Annotated[str, StringConstraints(max_length=32768)] | None = None
    # Stop after this many idle seconds; bounded by the plan's idle timeout.
    idle_timeout_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] | None = None

    @field_validator("secrets")
    @classmethod
    def _each_secret_once(cls, names: list[str]) -> list[str]:
        # `--secrets gh,gh` is more likely a slip for another name than a wish: say so rather than store it twice.
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"named more than once: {', '.join(twice)}")
        return names


class Quota(Response):
    limit: int
    active: int
    plan: str


class Instance(Response):
    id: str
    status: StateName
    reason: str | None = None
    tier: Tier
    program: str | None = None
    repo_url: str | None = None
    branch: str | None = None
    task: str | None = None
    secrets: list[str] = Field(default_factory=list)
    # http(s)://<gateway>/v1/instances/<id>/attach, the form the Go API and CLI used; the answers of create
    # and get end in ?token=<single-use attach token> (docs/migrating-from-go.md).
    attach_url: str
    ssh: str
    attached_clients: int = 0
    idle_timeout_s: int | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    last_activity_at: datetime | None = None
    agent_state: AgentState | None = None
    agent_message: str | None = None
    agent_exit_code: int | None = None
    agent_state_at: datetime | None = None
    work: WorkState | None = None


class InstanceList(Response):
    instances: list[Instance]
    quota: Quota


class InstanceEvent(Response):
    at: datetime
    actor: str
    kind: str
    from_state: str | None = None
    to_state: str | None = None
    message: str | None = None


class ProgramExit(Response):
    """The session's program exited (and was not restarted since): when and why."""

    at: datetime
    message: str


class InstanceStatus(Response):
    instance: Instance
    events: list[InstanceEvent]
    # Set while the session's program has exited: attaching restarts it.
    program_exit: ProgramExit | None = None


class InstanceLogs(Response):
    id: str
    init_log: str = ""
    events: list[InstanceEvent] = Field(default_factory=list)


class StartRequest(Request):
    # Move the workspace to the branch's current head first, even when its setup succeeded before
    # (uncommitted changes are stashed; local commits keep it as it is).
    pull: StrictBool = False


# The certificate lifetimes a request may name at all (the server's cert_max_ttl_s narrows it further).
CERT_TTL_MIN_S = 10
CERT_TTL_MAX_S = 86400


class AttachRequest(Request):
    # The contents of a .pub file end in a newline (and RFC 4716 keys span lines).
    control_rules = {"public_key": "text"}

    # An OpenSSH public key ("ssh-ed25519 AAAA... comment") to certify; omit it for a JWT only.
    public_key: Annotated[str, StringConstraints(min_length=1, max_length=16384)] | None = None
    # Strict: "readonly": "no" must be an error, not a silently coerced value.
    readonly: StrictBool = False
    # A certificate lifetime other than the default, up to the server's cert_max_ttl_s (automation).
    ttl_s: Annotated[StrictInt, Field(ge=CERT_TTL_MIN_S, le=CERT_TTL_MAX_S)] | None = None


class AttachGrant(Response):
    id: str
    status: StateName
    user: str
    certificate: str | None = None
    certificate_expires_at: datetime | None = None
    token: str
    token_expires_at: datetime
    ssh: str
    ssh_host: str
    ssh_port: int
    attach_url: str
    readonly: bool = False
    host_keys: list[str] = Field(default_factory=list, description=(
        "the gateway's SSH host key as OpenSSH public key lines, for known_hosts under `[ssh_host]:ssh_port` "
        "(the bare host on port 22): pin it before connecting. Empty when the server does not publish it"))


class MeUser(Response):
    id: str
    email: str
    role: Role = "member"
    # Kept for clients older than roles: true exactly when role is "admin".
    is_admin: bool


class MeOrg(Response):
    id: str
    name: str
    plan: str
    # A running session with no activity for this long is stopped (its workspace kept); a stopped one is
    # deleted after retention_s. The org's own values, else the deployment's; None from older servers.
    idle_timeout_s: int | None = None
    retention_s: int | None = None


class MeGateway(Response):
    """Where users' ssh connects, and the host key it must find there."""

    ssh_host: str
    ssh_port: int
    host_keys: list[str] = Field(default_factory=list, description=(
        "OpenSSH public key lines of the gateway's host key (empty: the server does not publish it)"))
    known_hosts: list[str] = Field(default_factory=list, description=(
        "the same keys as ~/.ssh/known_hosts lines for ssh_host and ssh_port"))


class Me(Response):
    user: MeUser
    org: MeOrg
    quota: Quota
    gateway: MeGateway | None = None
    # How the presented token was obtained: "token" (minted by an admin), "api" (POST /v1/tokens), "github",
    # "oidc:<name>".
    source: str = "token"


# ------------------------------------------------------------------------------------------- sign-in

SignInProviderName = Literal["oidc", "github"]


class SignInProviders(Response):
    """The identity providers this server signs people in with."""

    providers: list[str]


class DeviceAuthorizationRequest(Request):
    provider: SignInProviderName | None = None


class DeviceAuthorization(Response):
    """An RFC 8628 device authorization: show the code and URL, then poll /v1/auth/token."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: int
    interval: int
    provider: str


class TokenRequest(Request):
    grant_type: Literal["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]
    device_code: Annotated[str, StringConstraints(max_length=256)] | None = None
    refresh_token: Annotated[str, StringConstraints(max_length=256)] | None = None


class TokenGrant(Response):
    """An API token (with its lifetime) and the refresh token that gets the next one."""

    access_token: str
    token_type: str = "Bearer"  # noqa: S105  # nosec B105  # the RFC 6750 scheme name
    expires_in: int
    refresh_token: str | None = None
    source: str


class BrowserSignInStart(Request):
    """The gateway starts a browser sign-in that will come back to redirect_uri."""

    redirect_uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    # None: the OIDC issuer when there is one, else GitHub's web flow.
    provider: SignInProviderName | None = None
    # The browser's address as the web door saw it: the sign-in limit counts attempts per address.
    source_address: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    # A random value the door's page made and kept before it sent the browser away: kept sealed with the
    # sign-in and handed back when it finishes, so the page takes only a key of a sign-in it started.
    page_nonce: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{32}$")] | None = None


class BrowserSignInRedirect(Response):
    """Where to send the browser, and the state to bind to it (an HttpOnly cookie) until it returns."""

    authorization_url: str
    state: str


class BrowserSignInFinish(Request):
    state: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    code: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    redirect_uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    source_address: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None


class BrowserSignInGrant(TokenGrant):
    """A finished browser sign-in: the API token, and the page's nonce it was started with."""

    page_nonce: str | None = None


class GoExchangeRequest(Request):
    """What the Go CLI's `orz login` sends: its GitHub token and who GitHub said it belongs to."""

    github_token: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    github_id: int | None = None
    github_login: Annotated[str, StringConstraints(max_length=255)] | None = None
    email: Annotated[str, StringConstraints(max_length=254)] | None = None


class GoExchangeUser(Response):
    id: str
    login: str | None = None
    email: str
    org_id: str
    plan: str


class GoExchange(Response):
    """The Go CLI's exchange answer: an API token and the user it belongs to."""

    token: str
    user: GoExchangeUser


class SecretCreate(Request):
    # Values may be PEM keys or JSON documents; names and keys never carry control characters.
    control_rules = {"data": "text"}
    name: SecretName
    data: Annotated[dict[EnvName, Annotated[str, StringConstraints(max_length=65536)]],
                    Field(min_length=1, max_length=64)]
    # "org" shares the secret with everyone in the org; "user" (default) keeps it to its creator.
    scope: Literal["user", "org"] = "user"


class SecretReplace(Request):
    control_rules = {"data": "text"}
    data: Annotated[dict[EnvName, Annotated[str, StringConstraints(max_length=65536)]],
                    Field(min_length=1, max_length=64)]


class Secret(Response):
    name: str
    keys: list[str]
    scope: Literal["user", "org"]
    created_at: datetime
    updated_at: datetime


class SecretList(Response):
    secrets: list[Secret]


# What a webhook can be sent (docs/webhooks.md): an agent's state change, a session's, and the test ping.
WebhookEvent = Literal["agent.needs_input", "agent.idle", "agent.exited", "agent.working",
                       "session.running", "session.stopped", "session.failed", "session.deleted"]
WEBHOOK_EVENTS: tuple[str, ...] = WebhookEvent.__args__  # type: ignore[attr-defined]
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("agent.needs_input", "agent.idle", "agent.exited", "session.failed")
WebhookFormat = Literal["slack", "json"]


class WebhookCreate(Request):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    # "slack": Slack-compatible incoming-webhook JSON ({"text": ...}); "json": the event's fields.
    format: WebhookFormat = "json"
    events: Annotated[list[WebhookEvent], Field(min_length=1, max_length=len(WEBHOOK_EVENTS))] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))
    description: Annotated[str, StringConstraints(max_length=200)] | None = None


class Webhook(Response):
    id: str
    url: str
    format: WebhookFormat
    events: list[str]
    description: str | None = None
    created_at: datetime


class WebhookCreated(Webhook):
    # The signing secret: in this answer only, never again.
    secret: str


class WebhookList(Response):
    webhooks: list[Webhook]


class ApiTokenCreate(Request):
    # A label for the token's owner to know it by (the laptop, the pipeline).
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    # Days until it stops working; null: until revoked.
    expires_in_days: Annotated[int, Field(ge=1, le=366)] | None = 90


class ApiTokenInfo(Response):
    id: str
    name: str
    # The token's first characters: enough to tell it apart (and to revoke it by), never enough to use.
    prefix: str
    # How it was made: null (an admin minted it), "api" (POST /v1/tokens), "github", "oidc:<name>", ...
    source: str | None = None
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    # Whether this is the token the request came with.
    current: bool = False


class ApiTokenCreated(ApiTokenInfo):
    # The token: in this answer only, never again.
    token: str


class ApiTokenList(Response):
    tokens: list[ApiTokenInfo]


class WebhookAttempt(Response):
    at: datetime
    attempt: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


class WebhookDelivery(Response):
    id: str
    webhook_id: str
    event: str
    session_id: str | None = None
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    status_code: int | None = None
    error: str | None = None
    created_at: datetime
    next_attempt_at: datetime | None = None
    finished_at: datetime | None = None
    log: list[WebhookAttempt] = Field(default_factory=list)


class WebhookDeliveryList(Response):
    deliveries: list[WebhookDelivery]


class Problem(Response):
    type: str
    title: str
    status: int
    detail: str
    code: str
    # `detail` again, for clients of the earlier Go API, which printed this field.
    error: str
    instance: str | None = None


class Health(Response):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


# -------------------------------------------------------------------------------------------- internal

InitStatus = Literal["pending", "running", "succeeded", "failed", "none"]
# What the session's agent is doing: reported by `orz-session state`, Claude Code hooks, or the runner's
# detector (no output while the pane's foreground process waits on its terminal), and `exited` with a code.
AgentState = Literal["working", "needs_input", "idle", "exited"]
AGENT_MESSAGE_MAX = 1024


WORK_FILES_MAX = 100  # uncommitted paths a work report lists (it counts them all)
WORK_FILES_SHOWN = 10  # of which a one-line summary names


class WorkState(BaseModel):
    """The workspace's git state as the runner last saw it: what a delete without a push would lose."""

    model_config = ConfigDict(extra="ignore")

    dirty_files: int = Field(default=0, ge=0)
    unpushed_commits: int = Field(default=0, ge=0)
    # The uncommitted paths as `git status --porcelain` names them (quoted where unusual), the first
    # WORK_FILES_MAX: so a refused delete can say which files it would lose.
    files: Annotated[list[Annotated[str, StringConstraints(max_length=1024)]],
                     Field(max_length=WORK_FILES_MAX)] = Field(default_factory=list)
    # The runner's last report, made after the program was stopped and the work pushed where it could be:
    # what a delete of the stopped session would lose (a later report could only come from a new start).
    final: bool = False
    # Set once the runner pushed a WIP commit of everything to orz/<session id> on the origin.
    wip_branch: Annotated[str, StringConstraints(max_length=255)] | None = None
    wip_commit: Annotated[str, StringConstraints(max_length=64)] | None = None
    # Why the WIP commit could not be pushed (no origin, no credentials, ...).
    wip_error: Annotated[str, StringConstraints(max_length=1024)] | None = None
    scanned_at: datetime | None = None

    @property
    def at_risk(self) -> bool:
        """Work a delete would lose: uncommitted files or unpushed commits not saved to the WIP branch."""
        return bool((self.dirty_files or self.unpushed_commits) and not self.wip_commit)

    def summary(self) -> str:
        """One line for people: '2 uncommitted files (a.py, b.md), 1 unpushed commit; not saved: <why>'."""
        files = f"{self.dirty_files} uncommitted file{'s' if self.dirty_files != 1 else ''}"
        if self.files:
            shown = self.files[:WORK_FILES_SHOWN]
            more = self.dirty_files - len(shown)
            files += f" ({', '.join(shown)}{f', and {more} more' if more > 0 else ''})"
        commits = f"{self.unpushed_commits} unpushed commit{'s' if self.unpushed_commits != 1 else ''}"
        line = f"{files}, {commits}"
        if self.wip_commit:
            line += f"; saved to {self.wip_branch} ({self.wip_commit[:12]})"
        elif self.wip_error:
            line += f"; not saved: {self.wip_error}"
        return line


SidecarMode = Literal["local", "pod"]


class SidecarHealth(Request):
    command: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    # interval and timeout in seconds (500ms in .orz/cloud.yaml is 0.5)
    interval: cloud_yaml.HealthSeconds = cloud_yaml.HEALTH_INTERVAL_S
    timeout: cloud_yaml.HealthSeconds = cloud_yaml.HEALTH_TIMEOUT_S
    retries: cloud_yaml.Retries = cloud_yaml.HEALTH_RETRIES


class SidecarSpec(Request):
    """One ``services:`` entry of .orz/cloud.yaml as the runner reports it (pod mode).

    Env values keep their ``${NAME}`` secret references unresolved: they never carry a secret's value.
    The bounds are structural only; the provider checks names, images and ports and says which is wrong.
    """

    control_rules = {"env": "text"}

    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    image: cloud_yaml.Image
    env: Annotated[dict[cloud_yaml.EnvKey, Annotated[str, StringConstraints(max_length=32768)]],
                   Field(max_length=128)] = Field(default_factory=dict)
    ports: cloud_yaml.Ports = Field(default_factory=list)
    health: SidecarHealth | None = None


def services_digest(services: Sequence[Mapping[str, Any]]) -> str:
    """A stable digest of services as plain data (SidecarSpec dumps), to tell whether two sets are the same."""
    text = json.dumps(list(services), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# Gateway -> runner, on each session channel: whether that channel's client forwarded its agent (ssh -A),
# "yes" or "no" (absent: an older gateway). The runner sets SSH_AUTH_SOCK only for "yes".
CLIENT_AGENT_ENV = "ORZ_CLIENT_AGENT"
# The part of an SSH client's environment a session may see (the gateway passes it on, the runner sets it).
CLIENT_ENV_NAMES = ("TERM", "LANG")
CLIENT_ENV_PREFIX = "LC_"


def client_env_allowed(name: str) -> bool:
    return name in CLIENT_ENV_NAMES or name.startswith(CLIENT_ENV_PREFIX)


# Files the runner writes in its state directory (RunnerSpec.state_dir) and the local provider reads
# (the recording's files are the runner's own spool: the API stores what it uploads, api/instances/recordings.py).
STATE_INIT_LOG = "init.log"
# Each run of the runner begins its part of the init log with this line and "N, <UTC time>": the init log
# keeps every run's output, and a user reading it after a restart tells which lines are this start's.
INIT_LOG_START = "[orz] start "
# The runner's logger for lines only operators read: in its log (the session directory's runner log, the runner
# container's log on Kubernetes) but never in `orz cloud logs` (providers' read_log leave its records out).
RUNNER_OPERATOR_LOGGER = "runner.operator"
# The local provider's log (read_log) shows this start's part of the init log under INIT_LOG_TITLE and earlier
# starts' under INIT_LOG_EARLIER_TITLE; `orz cloud logs -f` follows the two as the one log they were.
INIT_LOG_TITLE = "== init log =="
INIT_LOG_EARLIER_TITLE = "== init log, earlier starts =="
STATE_FATAL_FILE = "fatal_error"
# Written once sidecars, tmux and the endpoint are gone: the provider need not wait for the runner's exit.
STATE_RELEASED_FILE = "released"
# The agent pane's recording (asciicast v2) and the part it rotated out when it reached its size cap.
STATE_RECORDING = "recording.cast"
STATE_RECORDING_PREVIOUS = "recording.1.cast"
RECORDING_CONTENT_TYPE = "application/x-asciicast"
# The smallest cap a recording may have: a few of the largest events the runner writes (4 KiB of output,
# JSON-escaped) must fit in one part.
RECORDING_MIN_BYTES = 64 * 1024
# The runner uploads its recording to the API (POST /internal/v1/instances/{id}/recording) in requests of
# at most this many bytes; the route refuses larger ones (413).
RECORDING_UPLOAD_MAX_BYTES = 128 * 1024
# The runner's name for one part of a recording (random, made when the part starts).
RECORDING_PART_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RunnerSpec(Request):
    """What a runner is told to run; the provider hands it over as ORZ_RUNNER_SPEC (JSON)."""

    control_rules = {"task": "text", "program": "text"}

    session_id: SessionId
    api_url: str
    repo_url: str | None = None
    branch: str | None = None
    program: str | None = None
    task: str | None = None
    # The gateway's client public key: the only key the runner's SSH endpoint accepts.
    gateway_public_key: str
    heartbeat_interval_s: int = 20
    # Names of environment variables that carry secrets (values come in the environment itself).
    secret_env: list[str] = Field(default_factory=list)
    # The runner's own SSH endpoint, which only the gateway connects to: where it listens ("unix:<path>" for
    # a socket; port 0: any free port). Not Settings.ssh_host/ssh_port, the gateway's listener for users.
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 0
    advertise_host: str | None = None
    # Sandboxed local runners start while their network is still being set up (their start-up overlaps
    # it); the sandbox's launcher creates this file once the network and the API relay are up.
    network_ready_file: str | None = None
    # Sandboxed local runners connect to the API from this loopback address in their namespace: the
    # launcher's relay keeps connections for it that the session's own programs cannot use up.
    api_source_address: str | None = None
    workspace: str
    state_dir: str
    # Where the pane's text is kept across a stop when the state dir is not kept (Kubernetes: its state dir
    # is an emptyDir that goes with the Pod): used when its directory exists, else beside the tmux socket.
    scrollback_file: str | None = None
    # Where the `services:` of .orz/cloud.yaml run: "local" processes the runner starts, or "pod"
    # containers beside the runner (Kubernetes), which the runner reports and never starts itself.
    sidecars: SidecarMode = "local"
    # Pod mode: services_digest() of the services this Pod was built with.
    pod_services_digest: str = ""
    # How many `services:` this session's plan allows (settings.services_for).
    max_services: int = Field(default=cloud_yaml.DEFAULT_MAX_SERVICES, ge=0, le=cloud_yaml.SERVICES_CEILING)
    # `orz cloud start --pull`: update the workspace to the branch's head even after a successful setup.
    pull: bool = False
    # No pane output for this long while the foreground process waits on the terminal: needs_input.
    needs_input_after_s: float = Field(default=60.0, gt=0)
    # How often the workspace's git state (dirty files, unpushed commits) is read for heartbeats.
    work_scan_s: float = Field(default=15.0, gt=0)
    # Record the agent's pane as asciicast v2, each part at most this many bytes (the previous part is
    # kept beside it); 0: do not record (the org turned recording off).
    recording_max_bytes: int = Field(default=0, ge=0)
    # The session's owner as git's default author and committer (user.name / user.email at the lowest
    # priority: a repo's or the user's own git config wins); None: git's own defaults.
    owner_name: str | None = Field(default=None, max_length=255)
    owner_email: str | None = Field(default=None, max_length=254)

    @field_validator("recording_max_bytes")
    @classmethod
    def _recording_cap(cls, value: int) -> int:
        if 0 < value < RECORDING_MIN_BYTES:
            raise ValueError(f"must be 0 (off) or at least {RECORDING_MIN_BYTES}")
        return value


PROGRAM_EVENT_KINDS = ("program_exited", "program_restarted")


# What an INTEGER column holds (PostgreSQL's is 32-bit): a runner's number outside it would be a 500 there.
ExitCode = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
ClientCount = Annotated[int, Field(ge=0, le=2**31 - 1)]


class ProgramEvent(Request):
    """Runner → API: the session's program exited or was restarted (recorded as a session event)."""

    control_rules = {"message": "log"}

    kind: Literal["program_exited", "program_restarted"]
    exit_code: ExitCode | None = None
    message: Annotated[str, StringConstraints(max_length=1024)]


class Heartbeat(Request):
    """Runner → API, every heartbeat interval and on every notable change."""

    # Output of the session's own commands: escape sequences are fine, NUL cannot be stored.
    control_rules = {"fatal_error": "log", "init_log_tail": "log"}

    host_key: str | None = None
    # Where the gateway reaches the runner's endpoint (RunnerSpec.ssh_host/advertise_host, the bound port).
    ssh_host: str | None = None
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    attached_clients: ClientCount = 0
    last_input_at: datetime | None = None
    last_output_at: datetime | None = None
    init_status: InitStatus = "none"
    program_running: bool = False
    program_exit_code: ExitCode | None = None
    # Set when the runner cannot go on (bad .orz/cloud.yaml, clone failed): the session fails with it.
    fatal_error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    init_log_tail: Annotated[str, StringConstraints(max_length=65536)] | None = None
    # Pod mode, when .orz/cloud.yaml names other services than the Pod runs: the services it names. The
    # API restarts the Pod with them; the runner starts nothing until then.
    services: Annotated[list[SidecarSpec], Field(max_length=cloud_yaml.SERVICES_CEILING)] | None = None
    # Program exits and restarts since the last heartbeat that got through (each sent once; absent when
    # none, so an API of the previous release still takes the heartbeat).
    program_events: Annotated[list[ProgramEvent], Field(max_length=16)] | None = None
    # The agent's state (None: not known yet); a change is recorded as an `agent` event.
    agent_state: AgentState | None = None
    agent_message: Annotated[str, StringConstraints(max_length=AGENT_MESSAGE_MAX)] | None = None
    agent_exit_code: ExitCode | None = None
    work: WorkState | None = None


class HeartbeatReply(Response):
    state: StateName
    heartbeat_interval_s: int


class RecordingAck(Response):
    """Where the API's copy of the session's recording ends: the current part's name and size in bytes.

    The answer to an upload (200), and the body of its 409 when the upload did not start there: the runner
    then sends again from ``offset`` of ``part``, or its own part from 0 when ``part`` is not its own."""

    part: str
    offset: int


class Route(Response):
    host: str
    port: int
    host_key: str


class AuthorizeRequest(Request):
    """Gateway → API: may this user attach to this session now, and where is it?"""

    session_id: str = Field(max_length=64)
    user_id: str = Field(max_length=64)
    method: Literal["certificate", "jwt", "websocket"]
    jti: str | None = Field(default=None, max_length=64)
    jti_expires_at: datetime | None = None
    readonly: bool = False
    source_address: str | None = Field(default=None, max_length=64)
    # Start a stopped session (wake on connect) instead of refusing.
    wake: bool = True


class AuthorizeReply(Response):
    session_id: str
    user_id: str
    state: StateName
    mode: Literal["rw", "ro"]
    route: Route | None = None
    message: str | None = None


class AttachEventIn(Request):
    """Gateway → API: a client attached or detached."""

    session_id: str = Field(max_length=64)
    user_id: str = Field(max_length=64)
    event: Literal["attached", "detached"]
    connection_id: str = Field(max_length=64)
    source_address: str | None = Field(default=None, max_length=64)
    bytes_in: int = Field(default=0, ge=0)
    bytes_out: int = Field(default=0, ge=0)
    duration_s: float = Field(default=0.0, ge=0)


class LiveAttachment(Request):
    """A user attached to a session through a gateway, right now."""

    session_id: str = Field(max_length=64)
    user_id: str = Field(max_length=64)


# One gateway asks about its live attachments in chunks of at most this many.
ACCESS_CHECK_MAX = 1000


class AccessCheck(Request):
    """Gateway → API: which of these live attachments are no longer allowed?"""

    attachments: list[LiveAttachment] = Field(max_length=ACCESS_CHECK_MAX)


class RevokedAttachment(Response):
    session_id: str
    user_id: str
    reason: str  # the one line the attached user reads before the gateway hangs up


class AccessCheckReply(Response):
    revoked: list[RevokedAttachment]


class AuthFailureIn(Request):
    """Gateway → API: a client at this address failed to authenticate."""

    source_address: str = Field(min_length=1, max_length=64)


class AuthFailureReply(Response):
    """The address's failures inside the window (every gateway's), and how long it must now wait (0: not)."""

    failures: int
    limit: int
    retry_after_s: int


def error_message(err: Mapping[str, Any]) -> str:
    """One pydantic error's message; a validator's own ValueError reads as written, without "Value error, "."""
    return str(err["msg"]).removeprefix("Value error, ") if err["type"] == "value_error" else str(err["msg"])


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Field and message of each error, never the input (it may be a secret)."""
    return [
        # A control character deep in a field (a dict value, a list item) names its path below the field.
        {"field": (".".join(str(p) for p in err["loc"]) + str(err.get("ctx", {}).get("path", ""))) or "(body)",
         "message": error_message(err)}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def describe_validation(exc: ValidationError) -> str:
    """One line: the first error's field and message, and how many more there are."""
    errs = validation_errors(exc)
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{errs[0]['field']}: {errs[0]['message']}{more}"


def problem_detail(body: dict[str, Any]) -> str:
    """The one line a client shows for a problem+json body."""
    return str(body.get("detail") or body.get("title") or "request failed")
