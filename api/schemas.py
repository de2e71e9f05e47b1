"""The API's contract: request and response models shared by the API, gateway, runner and CLI.

Plain pydantic models only: no Sanic or SQLAlchemy imports, so importing this module is cheap.
Requests forbid unknown fields; responses may grow new fields (clients must ignore unknown ones).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StringConstraints

SESSION_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SECRET_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-_]{0,62}[a-z0-9])?$")
# The repository file that prepares each session, and its `${NAME}` reference to a session secret.
CLOUD_CONFIG_PATH = ".orz/cloud.yaml"
SECRET_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Tier = Literal["small", "medium", "large"]
StateName = Literal[
    "pending", "starting", "running", "unhealthy", "stopping", "stopped", "failed", "deleting", "deleted"
]
TIER_RESOURCES: dict[str, dict[str, str]] = {
    "small": {"cpu": "2", "memory": "4Gi"},
    "medium": {"cpu": "4", "memory": "8Gi"},
    "large": {"cpu": "8", "memory": "16Gi"},
}


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

_REPO_URL_RE = re.compile(r"^(?:(?:https?|ssh|git|file)://\S+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:\S+)$")


def _valid_repo_url(value: str) -> str:
    if not _REPO_URL_RE.match(value) or value.startswith("-"):
        raise ValueError("repo_url must be an https://, ssh://, git://, file:// or user@host:path URL")
    return value


SessionId = Annotated[str, StringConstraints(min_length=1, max_length=32), AfterValidator(_valid_session_id)]
Branch = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_valid_branch)]
RepoUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048), AfterValidator(_valid_repo_url)]
SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_RE.pattern, min_length=1, max_length=64)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_RE.pattern)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------- public


class InstanceCreate(Request):
    tier: Tier = "small"
    program: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    repo_url: RepoUrl | None = None
    branch: Branch | None = None
    secrets: Annotated[list[SecretName], Field(max_length=32)] = Field(default_factory=list)
    task: Annotated[str, StringConstraints(max_length=32768)] | None = None
    # Stop after this many idle seconds; bounded by the plan's idle timeout.
    idle_timeout_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] | None = None


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
    attach_url: str
    ssh: str
    attached_clients: int = 0
    idle_timeout_s: int | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    last_activity_at: datetime | None = None


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


class InstanceStatus(Response):
    instance: Instance
    events: list[InstanceEvent]


class InstanceLogs(Response):
    id: str
    init_log: str = ""
    events: list[InstanceEvent] = Field(default_factory=list)


class AttachRequest(Request):
    # An OpenSSH public key ("ssh-ed25519 AAAA... comment") to certify; omit it for a JWT only.
    public_key: Annotated[str, StringConstraints(min_length=1, max_length=16384)] | None = None
    # Strict: "readonly": "no" must be an error, not a silently coerced value.
    readonly: StrictBool = False


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


class MeUser(Response):
    id: str
    email: str
    is_admin: bool


class MeOrg(Response):
    id: str
    name: str
    plan: str


class Me(Response):
    user: MeUser
    org: MeOrg
    quota: Quota


class SecretCreate(Request):
    name: SecretName
    data: Annotated[dict[EnvName, Annotated[str, StringConstraints(max_length=65536)]],
                    Field(min_length=1, max_length=64)]
    # "org" shares the secret with everyone in the org; "user" (default) keeps it to its creator.
    scope: Literal["user", "org"] = "user"


class SecretReplace(Request):
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


class Problem(Response):
    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


class Health(Response):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


# -------------------------------------------------------------------------------------------- internal

InitStatus = Literal["pending", "running", "succeeded", "failed", "none"]
SidecarMode = Literal["local", "pod"]


class SidecarHealth(Request):
    command: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    # interval and timeout in seconds (500ms in .orz/cloud.yaml is 0.5)
    interval: float = Field(default=5.0, gt=0, le=3600)
    timeout: float = Field(default=5.0, gt=0, le=3600)
    retries: int = Field(default=3, ge=1, le=100)


class SidecarSpec(Request):
    """One ``services:`` entry of .orz/cloud.yaml as the runner reports it (pod mode).

    Env values keep their ``${NAME}`` secret references unresolved: they never carry a secret's value.
    The bounds are structural only; the provider checks names, images and ports and says which is wrong.
    """

    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    env: Annotated[dict[EnvName, Annotated[str, StringConstraints(max_length=32768)]],
                   Field(max_length=128)] = Field(default_factory=dict)
    ports: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], Field(max_length=16)] = Field(
        default_factory=list)
    health: SidecarHealth | None = None


def services_digest(services: Sequence[Mapping[str, Any]]) -> str:
    """A stable digest of services as plain data (SidecarSpec dumps), to tell whether two sets are the same."""
    text = json.dumps(list(services), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class RunnerSpec(Request):
    """What a runner is told to run; the provider hands it over as ORZ_RUNNER_SPEC (JSON)."""

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
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 0
    advertise_host: str | None = None
    # Sandboxed local runners start while their network is still being set up (their start-up overlaps
    # it); the sandbox's launcher creates this file once the network and the API relay are up.
    network_ready_file: str | None = None
    workspace: str
    state_dir: str
    # Where the `services:` of .orz/cloud.yaml run: "local" processes the runner starts, or "pod"
    # containers beside the runner (Kubernetes), which the runner reports and never starts itself.
    sidecars: SidecarMode = "local"
    # Pod mode: services_digest() of the services this Pod was built with.
    pod_services_digest: str = ""


class Heartbeat(Request):
    """Runner → API, every heartbeat interval and on every notable change."""

    host_key: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    attached_clients: int = Field(default=0, ge=0)
    last_input_at: datetime | None = None
    last_output_at: datetime | None = None
    init_status: InitStatus = "none"
    program_running: bool = False
    program_exit_code: int | None = None
    # Set when the runner cannot go on (bad .orz/cloud.yaml, clone failed): the session fails with it.
    fatal_error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    init_log_tail: Annotated[str, StringConstraints(max_length=65536)] | None = None
    # Pod mode, when .orz/cloud.yaml names other services than the Pod runs: the services it names. The
    # API restarts the Pod with them; the runner starts nothing until then.
    services: Annotated[list[SidecarSpec], Field(max_length=16)] | None = None


class HeartbeatReply(Response):
    state: StateName
    heartbeat_interval_s: int


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


def problem_detail(body: dict[str, Any]) -> str:
    """The one line a client shows for a problem+json body."""
    return str(body.get("detail") or body.get("title") or "request failed")
