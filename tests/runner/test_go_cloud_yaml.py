"""`.orz/cloud.yaml` files written for the earlier Go version load here, and run.

The fixtures in tests/fixtures/go_cloud_yaml follow the Go version's rules: no `version`, an empty file,
keys it ignored (`cacheDirs`, a lowercase `setup.onattach`), service names with capitals and `_`, dotted
env keys (Elasticsearch) and more than five services. What cannot run is still refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from api.cloud_yaml import service_label
from runner.cloud_config import load, missing_secrets, secret_refs, validate_file
from runner.errors import CloudConfigError
from runner.services import pod_sidecars
from tests.runner.conftest import MakeRepo, StartRunner
from tests.support import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "go_cloud_yaml"
GO_FILES = sorted(FIXTURES.glob("*.yaml"))


def test_there_are_go_examples() -> None:
    assert {f.name for f in GO_FILES} >= {"empty.yaml", "node-postgres-redis.yaml", "elasticsearch.yaml",
                                          "unknown-keys.yaml", "many-services.yaml"}


@pytest.mark.parametrize("file", GO_FILES, ids=lambda f: f.name)
def test_every_go_example_loads_as_version_1_0(file: Path) -> None:
    config = validate_file(file)
    assert config.version == "1.0"
    for spec in pod_sidecars(config):  # what a Kubernetes runner reports to the API takes them too
        assert spec.name in config.services


def test_an_empty_file_and_a_missing_version_mean_1_0() -> None:
    empty = validate_file(FIXTURES / "empty.yaml")
    assert empty.services == {} and empty.setup.init is None and empty.warnings == []
    node = validate_file(FIXTURES / "node-postgres-redis.yaml")
    assert node.setup.onAttach == "git fetch --quiet"
    assert set(node.services) == {"postgres", "redis"}


def test_unknown_keys_are_warnings_with_line_and_a_case_hint() -> None:
    config = validate_file(FIXTURES / "unknown-keys.yaml")
    path = str(FIXTURES / "unknown-keys.yaml")
    assert config.warnings == [
        f"{path}:4: setup.onattach: unknown key, ignored (keys are case-sensitive: did you mean onAttach?)",
        f"{path}:5: cacheDirs: unknown key, ignored",
    ]
    assert config.setup.init == "pip install -r requirements.txt"
    assert config.setup.onAttach is None  # ignored, as the Go version ignored it


def test_service_names_and_dotted_env_keys_map_to_names_kubernetes_takes() -> None:
    search = validate_file(FIXTURES / "elasticsearch.yaml").services["search_engine"]
    assert search.env["discovery.type"] == "single-node" and search.env["xpack.security.enabled"] == "false"
    many = validate_file(FIXTURES / "many-services.yaml")
    assert [service_label(n) for n in many.services] == [
        "postgres", "redis-cache", "rabbit-mq", "mailhog", "minio", "mongo-db"]


def test_the_service_limit_is_the_plans() -> None:
    text = (FIXTURES / "many-services.yaml").read_text()
    assert len(load(text, max_services=10).services) == 6
    with pytest.raises(CloudConfigError, match=r"cloud.yaml:2: services: at most 5 services are allowed on "
                                               r"this plan, found 6"):
        load(text, max_services=5)


@pytest.mark.parametrize(("text", "expected"), [
    ("version: '2.0'\n", "version: Input should be '1.0'"),
    ("services:\n  db:\n    ports: [5432]\n", "services.db.image: required key is missing"),
    ("services:\n  my_db: {image: x}\n  My-DB: {image: x}\n", "both become container name 'my-db'"),
    ("services:\n  Runner: {image: x}\n", "'runner' is the session's own container"),
    ("services:\n  bad/name: {image: x}\n", "services.bad/name: invalid name"),
    ("env:\n  A=B: x\n", "env.A=B: invalid name"),
])
def test_what_cannot_run_is_still_refused(text: str, expected: str) -> None:
    with pytest.raises(CloudConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        load(text)


def test_secret_refs_checked_against_given_keys_say_how_to_attach() -> None:
    config = validate_file(FIXTURES / "node-postgres-redis.yaml")
    assert sorted(secret_refs(config)) == ["DB_PASSWORD"]
    assert missing_secrets(config, frozenset({"DB_PASSWORD"})) == []
    problems = missing_secrets(config, frozenset({"OTHER"}))
    assert len(problems) == 2  # env.DATABASE_URL and services.postgres.env.POSTGRES_PASSWORD
    assert all("orz cloud new --secrets NAME" in p and "--data DB_PASSWORD=" in p for p in problems)




@pytest.mark.integration
@pytest.mark.timeout(40)
@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"), reason="needs redis")
async def test_a_go_style_file_runs_with_its_warnings_in_the_init_log(make_repo: MakeRepo,
                                                                     start_runner: StartRunner) -> None:
    port = free_port()
    config = f"""\
# written for the Go version: no version, keys it ignored, a service name with capitals and '_'
setup:
  init: echo init-ran
  onattach: echo never
cacheDirs: [~/.cache]
services:
  Redis_Cache:
    image: redis:7
    ports: ["{port}"]
    env: {{cluster.enabled: "no"}}
"""
    handle = await start_runner(make_repo({".orz/cloud.yaml": config}))
    ready = await handle.ready(timeout=30)
    assert ready["init_status"] == "succeeded"
    init_log = (handle.runner.state_dir / "init.log").read_text()
    assert "[orz] warning: .orz/cloud.yaml:5: cacheDirs: unknown key, ignored" in init_log
    assert "setup.onattach: unknown key, ignored (keys are case-sensitive: did you mean onAttach?)" in init_log
    assert "init-ran" in init_log
    # The local provider names the service's directory as Kubernetes names its container.
    assert (handle.runner.state_dir / "services" / "redis-cache").is_dir()
    async with await handle.connect() as conn:
        pong = await conn.run(f"redis-cli -h 127.0.0.1 -p {port} ping", check=False)
        assert pong.stdout.strip() == b"PONG"
    assert await handle.finish() == 0
