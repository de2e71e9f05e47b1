"""``.orz/cloud.yaml`` parsing: good files load, every bad one names the file, line and key path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from runner.cloud_config import load, quantity_value, resolve_env, resolve_service_env, validate_file
from runner.errors import CloudConfigError

GOOD = """\
version: "1.0"
setup:
  init: npm ci
  onAttach: echo hello
services:
  db:
    image: postgres:16
    env:
      POSTGRES_PASSWORD: ${PG_PASSWORD}
    ports: [5432]
    health: {command: [pg_isready, -U, postgres], interval: 2s, timeout: 1, retries: 10}
env:
  DEBUG: 1
  TOKEN: "x-${API_KEY}-y"
resources: {cpu: 500m, memory: 4Gi, gpu: 1}
"""


def problem(text: str) -> str:
    with pytest.raises(CloudConfigError) as info:
        load(text)
    return str(info.value)


def test_good_file_loads_with_typed_values() -> None:
    config = load(GOOD)
    assert config.setup.init == "npm ci" and config.setup.onAttach == "echo hello"
    db = config.services["db"]
    assert db.health is not None
    assert db.health.command == "pg_isready -U postgres"
    assert (db.health.interval, db.health.timeout, db.health.retries) == (2.0, 1.0, 10)
    assert config.env["DEBUG"] == "1"
    assert config.resources.cpu == "500m" and config.resources.gpu == 1


def test_secret_refs_resolve_only_against_session_secrets() -> None:
    config = load(GOOD)
    assert resolve_env(config, {"API_KEY": "k"}) == {"DEBUG": "1", "TOKEN": "x-k-y"}
    assert resolve_service_env(config, "db", {"PG_PASSWORD": "pw"}) == {"POSTGRES_PASSWORD": "pw"}
    with pytest.raises(CloudConfigError) as info:
        resolve_env(config, {})
    assert str(info.value) == (".orz/cloud.yaml:14: env.TOKEN: ${API_KEY} is not one of this session's secrets "
                               "(it has none: no --secrets were named); "
                               "create one with the key API_KEY (orz cloud secrets create NAME --data API_KEY=...) "
                               "and start the session with it: orz cloud new --secrets NAME")
    with pytest.raises(CloudConfigError) as info:
        resolve_env(config, {"GH_TOKEN": "secret-value", "PG_PASSWORD": "pw"})
    assert "${API_KEY} is not one of this session's secrets (its secrets have the keys GH_TOKEN, PG_PASSWORD)" \
        in str(info.value) and "secret-value" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: '1.0'\nsetup: [\n  - a\n b: c\n", ".orz/cloud.yaml:3: invalid YAML"),
        ("version: '1.0'\nservices:\n  db:\n    image: p\n    health:\n      command: x\n"
         "      retries: many\n",
         ".orz/cloud.yaml:7: services.db.health.retries: Input should be a valid integer"),
        ("version: '1.0'\nservices:\n" + "".join(f"  s{i}:\n    image: x\n" for i in range(17)),
         ".orz/cloud.yaml:2: services: at most 16 services are allowed on this plan, found 17"),
        ("version: '1.0'\nresources:\n  cpu: 2\n  memory: 4Gb\n",
         ".orz/cloud.yaml:4: resources.memory: '4Gb' is not a Kubernetes quantity"),
        ("version: '1.0'\nresources:\n  cpu: -1\n", ".orz/cloud.yaml:3: resources.cpu:"),
        ("version: '2.0'\n", ".orz/cloud.yaml:1: version: Input should be '1.0'"),
        ("version: '1.0'\nenv:\n  A: 1\n  A: 2\n", ".orz/cloud.yaml:4: invalid YAML: found duplicate key"),
        ("version: '1.0'\nservices:\n  db:\n    image: x\n    ports: [5432, 99999]\n",
         ".orz/cloud.yaml:5: services.db.ports[1]: Input should be less than or equal to 65535"),
        ("version: '1.0'\nenv:\n  1BAD: x\n",
         ".orz/cloud.yaml:3: env.1BAD: invalid name: String should match pattern"),
        ("- just\n- a list\n", ".orz/cloud.yaml:1: (top level): expected a mapping"),
        ("services:\n  a:\n    image: x\n    ports: [5432]\n  b:\n    image: y\n    ports: [5432]\n",
         ".orz/cloud.yaml:7: services.b.ports[0]: port 5432 is taken by service a"),
        ("services:\n  a:\n    image: x\n    ports: [2222]\n",
         ".orz/cloud.yaml:4: services.a.ports[0]: port 2222 is taken by the session's runner"),
    ],
)
def test_bad_files_name_line_and_key_path(text: str, expected: str) -> None:
    assert problem(text).startswith(expected), problem(text)


def test_unquoted_version_is_accepted() -> None:
    assert load("version: 1.0\n").version == "1.0"


def test_validate_file_uses_the_given_path(tmp_path: Path) -> None:
    file = tmp_path / "cloud.yaml"
    file.write_text("version: '1.0'\nresources: {cpu: lots}\n")
    with pytest.raises(CloudConfigError, match=r"cloud.yaml:2: resources.cpu: 'lots' is not"):
        validate_file(file)
    with pytest.raises(CloudConfigError, match="cannot read"):
        validate_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", Decimal("0.5")), ("2", Decimal(2)), ("4Gi", Decimal(4 * 2**30)), ("1e3", Decimal(1000)),
     ("1.5k", Decimal(1500))],
)
def test_quantities(text: str, value: Decimal) -> None:
    assert quantity_value(text) == value


@pytest.mark.parametrize("text", ["4Gb", "", "m", "1.2.3", "1 Gi", "Gi1"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        quantity_value(text)
