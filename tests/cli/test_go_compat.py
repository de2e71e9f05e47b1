"""`orz cloud` for users of the Go CLI: its flags and arguments, and validate on the Go examples' files."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.cli.conftest import LiveApi, Orz, Tenant

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "go_cloud_yaml"


def test_validate_takes_every_go_example_and_warns_of_ignored_keys(orz: Orz, home: Path) -> None:
    for file in sorted(FIXTURES.glob("*.yaml")):
        done = orz("cloud", "validate", str(file))
        assert done.returncode == 0, (file.name, done.stderr)
        assert done.stdout.startswith(f"{file}: ok")
    unknown = orz("cloud", "validate", str(FIXTURES / "unknown-keys.yaml"))
    assert "orz: warning: " in unknown.stderr
    hint = ":4: setup.onattach: unknown key, ignored (keys are case-sensitive: did you mean onAttach?)"
    assert hint in unknown.stderr
    assert ":5: cacheDirs: unknown key, ignored" in unknown.stderr
    many = orz("cloud", "validate", str(FIXTURES / "many-services.yaml"))
    assert "ok (6 services)" in many.stdout


def test_validate_checks_secret_refs_against_the_secrets_given(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                               tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".orz").mkdir(parents=True)
    shutil.copy(FIXTURES / "node-postgres-redis.yaml", repo / ".orz" / "cloud.yaml")
    assert orz("cloud", "secrets", "create", "db", "--data", "DB_PASSWORD=pw").returncode == 0
    assert orz("cloud", "secrets", "create", "other", "--data", "OTHER=x").returncode == 0

    unchecked = orz("cloud", "validate", str(repo))
    assert unchecked.returncode == 0
    assert "uses ${DB_PASSWORD}" in unchecked.stderr and "--secrets" in unchecked.stderr

    good = orz("cloud", "validate", str(repo), "--secrets", "db")
    assert good.returncode == 0 and good.stderr == "", good.stderr

    bad = orz("cloud", "validate", str(repo), "--secrets", "other")
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    assert len(lines) == 2  # env.DATABASE_URL and services.postgres.env.POSTGRES_PASSWORD
    file = repo / ".orz" / "cloud.yaml"
    assert lines[0].startswith(f"orz: {file}:24: env.DATABASE_URL: ${{DB_PASSWORD}} is not one of this session's")
    assert lines[1].startswith(f"orz: {file}:12: services.postgres.env.POSTGRES_PASSWORD: ${{DB_PASSWORD}}")
    assert all("orz cloud secrets create NAME --data DB_PASSWORD=..." in line
               and "orz cloud new --secrets NAME" in line for line in lines)

    unknown = orz("cloud", "validate", str(repo), "--secrets", "nope")
    assert unknown.returncode == 3 and "no secret named nope" in unknown.stderr  # 3: not found


def test_new_takes_t_for_tier(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    done = orz("cloud", "new", "-t", "medium", "--no-attach", "--no-wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "medium tier" in done.stdout


def test_attach_names_what_is_wrong_with_an_attach_url_without_showing_its_token(orz: Orz, home: Path) -> None:
    bad_scheme = orz("cloud", "attach", "ftp://h/v1/instances/abc/attach?token=SECRETTOKEN")
    assert bad_scheme.returncode != 0 and "not an attach URL: ftp://h/v1/instances/abc/attach" in bad_scheme.stderr
    bad_path = orz("cloud", "attach", "https://h/v1/other?token=SECRETTOKEN")
    assert bad_path.returncode != 0 and "not an attach URL" in bad_path.stderr
    bad_id = orz("cloud", "attach", "https://h/v1/instances/Not_An_Id/attach?token=SECRETTOKEN")
    assert bad_id.returncode != 0 and "not a session id: 'Not_An_Id'" in bad_id.stderr
    assert "SECRETTOKEN" not in bad_scheme.stderr + bad_path.stderr + bad_id.stderr
    # A good URL gets as far as the login, like an id would.
    good = orz("cloud", "attach", "https://h/v1/instances/abc-123/attach?token=SECRETTOKEN")
    assert good.returncode != 0 and "not logged in" in good.stderr


def test_validate_refuses_a_port_two_services_take_or_the_runners(orz: Orz, home: Path, tmp_path: Path) -> None:
    # The Go version accepted these; the second service (or the Pod) could never start.
    file = tmp_path / "cloud.yaml"
    file.write_text("services:\n  My_DB:\n    image: postgres:16\n    ports: [5432]\n"
                    "  cache:\n    image: redis:7\n    ports:\n      - 6379\n      - 5432\n"
                    "  web:\n    image: nginx\n    ports: [2222]\n")
    done = orz("cloud", "validate", str(file))
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.splitlines() == [
        f"orz: {file}:9: services.cache.ports[1]: port 5432 is taken by service My_DB; pick another",
        f"orz: {file}:12: services.web.ports[0]: port 2222 is taken by the session's runner; pick another",
    ], done.stderr


def test_validate_says_which_service_images_a_local_provider_server_refuses(orz: Orz, home: Path,
                                                                           tmp_path: Path) -> None:
    """validate cannot know where the server runs sessions: a mysql:8 that Kubernetes runs but a local-provider
    server refuses at start gets a note (exit 0) in the very words the runner's refusal uses."""
    from runner import cloud_config

    file = tmp_path / "cloud.yaml"
    file.write_text("services:\n  db:\n    image: postgres:16\n  mysql:\n    image: mysql:8\n    ports: [3306]\n")
    done = orz("cloud", "validate", str(file))
    assert done.returncode == 0 and done.stdout == f"{file}: ok (2 services)\n", (done.stdout, done.stderr)
    (refusal,) = cloud_config.local_provider_problems(cloud_config.validate_file(file))
    assert done.stderr.splitlines() == [f"orz: note: {refusal}"]
    assert refusal.startswith(f"{file}:5: services.mysql.image: mysql:8 cannot run on the local provider")
