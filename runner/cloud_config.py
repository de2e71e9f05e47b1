"""``.orz/cloud.yaml``: parse with line numbers (ruamel.yaml), validate (pydantic), resolve secret refs.

The same ``load``/``validate_file`` API serves the runner, ``orz cloud validate`` and the Kubernetes
PodSpec builder. Every problem is reported as ``<file>:<line>: <key.path>: <message>``.

What the earlier Go version accepted still loads: no ``version`` (it means "1.0"), an empty file, and
keys we do not know, which are warnings (``CloudConfig.warnings``, shown by ``orz cloud validate`` and
written to the session's init log) rather than errors. The naming rules live in ``api/cloud_yaml.py``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from api import cloud_yaml
from api.schemas import CLOUD_CONFIG_PATH, SECRET_REF_RE
from runner.errors import CloudConfigError

CONFIG_PATH = CLOUD_CONFIG_PATH
INIT_TIMEOUT_S = 300.0
ON_ATTACH_TIMEOUT_S = 30.0
# Kubernetes resource.Quantity: a decimal number with a binary-SI, decimal-SI or exponent suffix.
_QUANTITY = re.compile(r"^\+?(?:\d+(?:\.\d*)?|\.\d+)(?:Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_SUFFIX = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
    "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
    "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity_value(text: str) -> Decimal:
    """The numeric value of a Kubernetes quantity (``500m`` → 0.5, ``4Gi`` → 4294967296)."""
    if not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    number = re.match(r"^\+?[\d.]+", text)
    assert number is not None
    suffix = text[number.end():]
    try:
        base = Decimal(number.group().lstrip("+"))
        if suffix[:1] in ("e", "E"):
            return base * (Decimal(10) ** int(suffix[1:]))
        return base * Decimal(_SUFFIX[suffix])
    except (InvalidOperation, KeyError) as exc:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc


def _quantity(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a Kubernetes quantity such as 500m, 2 or 4Gi")
    text = str(value)
    if quantity_value(text) <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return text


def _scalar_str(value: Any) -> Any:
    # YAML reads `PORT: 5432` as a number; env values are strings in the end.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[str, BeforeValidator(_quantity)]
EnvValue = Annotated[str, BeforeValidator(_scalar_str)]
ServiceName = Annotated[str, Field(pattern=cloud_yaml.SERVICE_NAME_RE.pattern)]
Duration = Annotated[cloud_yaml.HealthSeconds, BeforeValidator(cloud_yaml.duration_seconds)]


class _Model(BaseModel):
    # Unknown keys are kept aside (model_extra) and reported as warnings, as the Go version ignored them.
    model_config = ConfigDict(extra="allow", frozen=True)


class Setup(_Model):
    init: str | None = None
    onAttach: str | None = None  # the file's key, camelCase


class Health(_Model):
    command: str
    interval: Duration = cloud_yaml.HEALTH_INTERVAL_S
    timeout: Duration = cloud_yaml.HEALTH_TIMEOUT_S
    retries: cloud_yaml.Retries = cloud_yaml.HEALTH_RETRIES

    @field_validator("command", mode="before")
    @classmethod
    def _join_argv(cls, value: Any) -> Any:
        # Accept the exec form (`[pg_isready, -U, postgres]`) as well as a shell line.
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return shlex.join(value)
        return value


class Service(_Model):
    image: cloud_yaml.Image
    env: dict[cloud_yaml.EnvKey, EnvValue] = Field(default_factory=dict)
    ports: cloud_yaml.Ports = Field(default_factory=list)
    health: Health | None = None


class Resources(_Model):
    cpu: Quantity | None = None
    memory: Quantity | None = None
    gpu: Annotated[int, Field(ge=0, le=16)] | None = None


class CloudConfig(_Model):
    version: Literal["1.0"] = "1.0"  # no version means "1.0", as it did in the Go version
    setup: Setup = Field(default_factory=Setup)
    services: dict[ServiceName, Service] = Field(default_factory=dict)
    env: dict[cloud_yaml.EnvKey, EnvValue] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)

    _path: str = PrivateAttr(default=CONFIG_PATH)
    _lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `version: 1.0` unquoted is a float in YAML.
        return "1.0" if value == 1.0 and not isinstance(value, bool) else value

    @field_validator("services")
    @classmethod
    def _names_and_count(cls, value: dict[str, Service]) -> dict[str, Service]:
        cloud_yaml.check_service_count(len(value), cloud_yaml.SERVICES_CEILING)
        cloud_yaml.service_labels(list(value))  # two names for one container, or the runner's own name
        return value

    @property
    def warnings(self) -> list[str]:
        """``<file>:<line>: <key.path>: unknown key ...`` for each key this version ignores."""
        return list(self._warnings)

    def service_label(self, name: str) -> str:
        """The service's DNS-1123 name (its container, and its directory on the local provider)."""
        return cloud_yaml.service_label(name)

    def line_of(self, *loc: str | int) -> int:
        """The line of the deepest known key on ``loc`` (1 when unknown)."""
        return _line_for(self._lines, loc)

    def problem(self, loc: tuple[str | int, ...], message: str) -> str:
        return f"{self._path}:{self.line_of(*loc)}: {_dotted(loc)}: {message}"


# ------------------------------------------------------------------------------------------- loading


def load(text: str, path: str = CONFIG_PATH, *, max_services: int | None = None) -> CloudConfig:
    """Parse and validate the text of a cloud.yaml; raise CloudConfigError naming path and line.

    ``max_services`` is the plan's limit (RunnerSpec.max_services); None checks only the ceiling."""
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        reason = exc.problem or exc.context or "invalid YAML"
        raise CloudConfigError([f"{path}:{line}: invalid YAML: {reason}"]) from None
    except YAMLError as exc:
        raise CloudConfigError([f"{path}:1: invalid YAML: {exc}"]) from None
    if tree is None:
        tree = CommentedMap()  # an empty file (or only comments): nothing to prepare, as in the Go version
    if not isinstance(tree, CommentedMap):
        raise CloudConfigError([f'{path}:1: (top level): expected a mapping with `version: "1.0"`'])
    lines: dict[tuple[str | int, ...], int] = {}
    data = _plain(tree, (), lines)
    try:
        config = CloudConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = _dotted(loc) or "(top level)"
            problems.append(f"{path}:{_line_for(lines, loc)}: {where}: {_message(err)}")
        raise CloudConfigError(problems) from None
    config._path = path
    config._lines = lines
    if max_services is not None and len(config.services) > max_services:
        raise CloudConfigError([config.problem(("services",), f"at most {max_services} services are allowed "
                                               f"on this plan, found {len(config.services)}")])
    if problems := _port_clashes(config):
        raise CloudConfigError(problems)
    unknown = sorted(_unknown_keys(config, ()), key=lambda found: config.line_of(*found[0]))
    config._warnings = [config.problem(loc, message) for loc, message in unknown]
    return config


def _port_clashes(config: CloudConfig) -> list[str]:
    """A port two services listen on, or the runner's own: the second one could never start (nor its Pod)."""
    taken: dict[int, str] = {cloud_yaml.RUNNER_SSH_PORT: "the session's runner"}
    problems = []
    for name, service in config.services.items():
        for index, port in enumerate(service.ports):
            if port in taken:
                problems.append(config.problem(("services", name, "ports", index),
                                               f"port {port} is taken by {taken[port]}; pick another"))
            else:
                taken[port] = f"service {name}"
    return problems


def _unknown_keys(model: BaseModel, loc: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    """Each key the model does not know, with a hint when it differs from a known key only in case."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    known = {name.lower(): name for name in type(model).model_fields}
    for key in model.model_extra or {}:
        hint = known.get(str(key).lower())
        message = "unknown key, ignored"
        if hint:
            message += f" (keys are case-sensitive: did you mean {hint}?)"
        found.append(((*loc, key), message))
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found += _unknown_keys(value, (*loc, name))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    found += _unknown_keys(item, (*loc, name, key))
    return found


def validate_file(path: Path | str) -> CloudConfig:
    """Load one file; a missing or unreadable file is a CloudConfigError too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CloudConfigError([f"{path}:1: cannot read: {exc}"]) from None
    return load(text, str(path))


def find(workspace: Path, *, max_services: int | None = None) -> CloudConfig | None:
    """The workspace's config, or None when the repo has no ``.orz/cloud.yaml``."""
    file = workspace / CONFIG_PATH
    if not file.exists():
        return None
    return load(_read(file), CONFIG_PATH, max_services=max_services)


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CloudConfigError([f"{CONFIG_PATH}:1: cannot read: {exc}"]) from None


# -------------------------------------------------------------------------------------------- secrets


# The images the local provider runs, from the installed binaries (by image_kind); on Kubernetes any image
# (from the registries the operator allows) runs as a container.
LOCAL_KINDS = frozenset({"postgres", "redis"})


def image_kind(image: str) -> str:
    """``docker.io/library/postgres:16-alpine`` → ``postgres``."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return {"postgresql": "postgres", "valkey": "redis"}.get(name, name)


def local_provider_problems(config: CloudConfig) -> list[str]:
    """One line (file, line, key) per service the local provider cannot run: the runner refuses the session
    with them, and `orz cloud validate` says so (it cannot know where the server runs sessions)."""
    return [config.problem(("services", name, "image"),
                           f"{service.image} cannot run on the local provider (`orz server`, `make dev`): only "
                           "postgres and redis images run there, from their installed binaries; on Kubernetes "
                           "any allowed image runs")
            for name, service in config.services.items() if image_kind(service.image) not in LOCAL_KINDS]


def resolve_env(config: CloudConfig, secrets: Mapping[str, str]) -> dict[str, str]:
    """The top-level ``env`` with ``${NAME}`` replaced from the session's secret env only."""
    return _resolve(config, ("env",), config.env, secrets)


def resolve_service_env(config: CloudConfig, name: str, secrets: Mapping[str, str]) -> dict[str, str]:
    return _resolve(config, ("services", name, "env"), config.services[name].env, secrets)


def secret_refs(config: CloudConfig) -> dict[str, list[tuple[str | int, ...]]]:
    """Every ``${NAME}`` the file uses, with the key paths that use it."""
    places: list[tuple[tuple[str | int, ...], str]] = [(("env", k), v) for k, v in config.env.items()]
    for name, service in config.services.items():
        places += [(("services", name, "env", k), v) for k, v in service.env.items()]
    refs: dict[str, list[tuple[str | int, ...]]] = {}
    for loc, value in places:
        for ref in SECRET_REF_RE.findall(value):
            refs.setdefault(ref, []).append(loc)
    return refs


def missing_secrets(config: CloudConfig, keys: set[str] | frozenset[str]) -> list[str]:
    """A problem line for each ``${NAME}`` that none of the given secret keys provides."""
    return [config.problem(loc, cloud_yaml.missing_secret(ref, keys))
            for ref, locs in secret_refs(config).items() if ref not in keys for loc in locs]


def _resolve(config: CloudConfig, base: tuple[str, ...], env: Mapping[str, str],
             secrets: Mapping[str, str]) -> dict[str, str]:
    problems: list[str] = []
    out: dict[str, str] = {}

    for key, value in env.items():
        def sub(match: re.Match[str], key: str = key) -> str:
            name = match.group(1)
            if name not in secrets:
                problems.append(config.problem((*base, key), cloud_yaml.missing_secret(name, secrets.keys())))
                return ""
            return secrets[name]

        out[key] = SECRET_REF_RE.sub(sub, value)
    if problems:
        raise CloudConfigError(problems)
    return out


# ------------------------------------------------------------------------------------------- helpers


def _plain(node: Any, loc: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]) -> Any:
    """ruamel's round-trip tree as plain dicts and lists, recording each key's 1-based line."""
    if isinstance(node, CommentedMap):
        out: dict[Any, Any] = {}
        for key, value in node.items():
            key_loc = (*loc, str(key))
            lines[key_loc] = node.lc.key(key)[0] + 1
            out[str(key) if not isinstance(key, str) else key] = _plain(value, key_loc, lines)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, value in enumerate(node):
            lines[(*loc, i)] = node.lc.item(i)[0] + 1
            items.append(_plain(value, (*loc, i), lines))
        return items
    if isinstance(node, str):
        return str(node)  # ruamel's scalar string subclasses → plain str
    return node


def _line_for(lines: Mapping[tuple[str | int, ...], int], loc: tuple[Any, ...]) -> int:
    for end in range(len(loc), 0, -1):
        line = lines.get(tuple(loc[:end]))
        if line is not None:
            return line
    return 1


def _dotted(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself is bad"; the path already names it
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    if "[key]" in err["loc"]:
        msg = f"invalid name: {msg}"
    return msg.removeprefix("Value error, ")
