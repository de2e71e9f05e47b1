"""The OpenAPI document matches the routes: a property-based run (schemathesis) finds no 5xx and no
response that breaks the documented schema, status codes or content types."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api import admin, metrics
from api.openapi import build_document
from api.serve import ApiServer
from tests.conftest import POSTGRES_REQUIRED, make_tenant

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
SERVICE_TOKEN = "svc-test-token-0123456789"  # the settings fixture's


async def test_document_lists_every_route_with_its_schemas(app):
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    doc = resp.json
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    assert set(paths["/v1/instances"]) == {"get", "post"}
    assert set(paths["/v1/instances/{id}"]) == {"get", "delete"}
    for action in ("stop", "start"):
        assert "post" in paths[f"/v1/instances/{{id}}/{action}"]
    create = paths["/v1/instances"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InstanceCreate")
    assert "429" in create["responses"] and "201" in create["responses"]
    schema = doc["components"]["schemas"]["InstanceCreate"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) >= {"tier", "program", "repo_url", "branch", "secrets", "task"}
    # Every route the app serves under /v1 or /internal is documented (metrics and the document itself aside):
    # the /v1 ones in the public document, /internal ones (the gateway's and runners') in the full one only.
    served = {r.path.replace(":str>", ">") for r in app.router.routes if r.path.startswith(("v1/", "internal/"))}
    documented = {p.strip("/").replace("{", "<").replace("}", ">") for p in paths}
    assert {p for p in served if p.startswith("v1/")} - {"v1/openapi.json"} <= documented
    full = build_document("test", internal=True)
    assert served - {"v1/openapi.json"} <= {p.strip("/").replace("{", "<").replace("}", ">") for p in full["paths"]}


async def test_the_public_document_leaves_the_internal_routes_out(app):
    """/internal/ is the gateway's and runners' (the ingress never routes it): a user's document neither lists
    those routes nor the schemas and credentials only they use."""
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    doc = resp.json
    assert [p for p in doc["paths"] if p.startswith("/internal")] == []
    assert set(doc["components"]["securitySchemes"]) == {"api_token"}
    full = build_document("test", internal=True)
    internal_only = set(full["components"]["schemas"]) - set(doc["components"]["schemas"])
    assert {"Heartbeat", "HeartbeatReply"} <= internal_only, internal_only
    assert "\"/internal/" not in resp.text


def _server_errors() -> float:
    """5xx answers the API itself counted (its request histogram), whoever asked."""
    return sum(sample.value for family in metrics.HTTP_DURATION.collect() for sample in family.samples
               if sample.name.endswith("_count") and sample.labels.get("status", "").startswith("5"))


# Every string field of the request bodies (where schemathesis finds one, in any operation).
CONTROL_FIELDS = ("task", "program", "repo_url", "branch", "secrets[*]", "name", "public_key", "fatal_error",
                  "init_log_tail", "session_id", "user_id", "source_address", "connection_id")
CONTROL_BINDINGS = "\n".join(f'"body.{f}" = {{ dictionary = "controls", probability = 0.25 }}' for f in CONTROL_FIELDS)


def _schemathesis_config(path: Path, user_token: str, session_id: str, runner_token: str,
                         revoke_token: str, stranger_token: str) -> None:
    """Every operation gets the credential it needs, so none is only ever answered with a 401."""
    path.write_text(f"""
headers = {{ Authorization = "Bearer {user_token}" }}

# Strings with the control characters an audit broke the API with (a NUL byte was a 500 on
# PostgreSQL), mixed into every string the run generates: positive data where the document allows
# them, negative data (which must be refused) where it does not.
[dictionaries.controls]
values = ["fix \\u0000 it", "\\u0000", "red \\u001b[31m", "ma\\u0085in", "two\\nlines", "tab\\there", "\\u007f"]

[parameters]
{CONTROL_BINDINGS}

# An over-long string (negative data) can make the body larger than max_request_bytes: the documented
# 413 rejects it as surely as a 422.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[[operations]]
include-path-regex = "^/internal/v1/(authorize|attach-events|access-check|auth-failures|signin/start|signin/finish)$"
headers = {{ Authorization = "Bearer {SERVICE_TOKEN}" }}

# Logging out revokes the token it presents: a token of its own, so the run's token stays valid.
[[operations]]
include-path = "/v1/auth/revoke"
headers = {{ Authorization = "Bearer {revoke_token}" }}

# Revoking a token by id: as another user of the org, whose revocations find none of the run's tokens
# (the run's own token among them, which a link from GET /v1/tokens could otherwise name).
[[operations]]
include-path = "/v1/tokens/{{id}}"
headers = {{ Authorization = "Bearer {stranger_token}" }}

[[operations]]
include-path = "/internal/v1/instances/{{id}}/heartbeat"
headers = {{ Authorization = "Bearer {runner_token}" }}
parameters = {{ id = "{session_id}" }}
""")


# One database: PostgreSQL where the suite requires it (CI), since that is where a NUL byte in a string used
# to become a 500; SQLite elsewhere. About 50 s alone, and CPU-bound: the budget leaves room for a loaded
# machine (122 s at load average 11; over 170 s beside `make test`'s other xdist workers and other sessions).
@pytest.mark.parametrize("empty_database_url", ["postgres" if POSTGRES_REQUIRED else "sqlite"], indirect=True)
@pytest.mark.timeout(420)
async def test_property_based_run_finds_no_server_errors_or_schema_violations(app, sessions, provider, tmp_path):
    """Positive and negative data for every operation (schemathesis' coverage, fuzzing and stateful
    phases) against the real API over HTTP: no 5xx, no answer outside the documented contract."""
    team = await make_tenant(sessions, "fuzz", plan="team")
    server = await ApiServer.start(app, "127.0.0.1", 0)
    errors_before = _server_errors()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=team.headers) as http:
            sid = (await http.post("/v1/instances", json={})).json()["id"]
        config = tmp_path / "schemathesis.toml"
        revoke_token = await admin.create_token(sessions, team.email, "fuzz-revoke")
        stranger = await admin.create_user(sessions, "stranger@fuzz.example", "fuzz")
        stranger_token = await admin.create_token(sessions, stranger.email, "fuzz-stranger")
        _schemathesis_config(config, team.token, sid, provider.specs[sid].runner_token, revoke_token,
                             stranger_token)
        report = tmp_path / "report.json"
        # The full document (the public one leaves out /internal/, whose routes are fuzzed too).
        document = tmp_path / "openapi.json"
        document.write_text(json.dumps(build_document("test", internal=True)))
        cmd = [
            str(SCHEMATHESIS), "--config-file", str(config), "run", str(document),
            "--url", f"http://127.0.0.1:{server.port}", "--mode", "all",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                        "response_schema_conformance,negative_data_rejection",
            "--max-examples", "15", "--workers", "2", "--seed", "20261205", "--generation-database", "none",
            "--report", "json", "--report-json-path", str(report), "--suppress-health-check", "all",
        ]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    cwd=tmp_path)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=400)
        finally:
            if proc.returncode is None:  # timed out: leave no fuzzer behind
                proc.kill()
                await proc.wait()
    finally:
        await server.stop()
    text = out.decode(errors="replace")
    assert report.exists(), text[-4000:]
    run = json.loads(report.read_text())
    # Not one failed check (a 5xx, an undocumented status, content type or body) and no errored case.
    assert run["failures"] == [] and run["errors"] == [], text[-8000:]
    cases = run["test_cases"]
    assert cases["with_failures"] == 0 and cases["errored"] == 0 and cases["generated"] >= 400, cases
    assert run["complete"] is True and run["exit_code"] == 0 and proc.returncode == 0, text[-4000:]
    # Every documented operation was exercised, through every phase, with credentials it accepts and
    # with every pattern of the document usable for generation.
    documented = sum(len(item) for item in build_document("test", internal=True)["paths"].values())
    assert run["operations"]["tested"] == run["operations"]["selected"] == documented, run["operations"]
    assert {name: p["status"] for name, p in run["phases"].items() if name != "examples"} == {
        "coverage": "success", "fuzzing": "success", "stateful": "success"}, run["phases"]
    assert run["warnings"]["missing_auth"] == [] and run["warnings"]["unsupported_regex"] == [], run["warnings"]
    # Both kinds of data reached the API: some requests were accepted, some rejected.
    rates = [r for phases in run["valid_rates"].values() for r in phases.values()]
    assert sum(r["accepted"] for r in rates) > 0 and sum(r["rejected"] for r in rates) > 0, run["valid_rates"]
    # The API's own count agrees: it answered no request with a 5xx.
    assert _server_errors() == errors_before
