"""The OpenAPI document matches the routes: a property-based run (schemathesis) finds no 5xx and no
response that breaks the documented schema, status codes or content types."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.app import create_app
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from tests.conftest import make_tenant

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


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
    # Every route the app serves under /v1 or /internal is documented (metrics and the document itself aside).
    served = {r.path.replace(":str>", ">") for r in app.router.routes if r.path.startswith(("v1/", "internal/"))}
    documented = {p.strip("/").replace("{", "<").replace("}", ">") for p in paths}
    assert served - {"v1/openapi.json"} <= documented


@pytest.mark.timeout(300)
async def test_property_based_run_finds_no_server_errors_or_schema_violations(settings, sessions, tmp_path):
    team = await make_tenant(sessions, "fuzz", plan="team")
    # An over-long string (negative data) can make the body larger than max_request_bytes: the documented
    # 413 rejects it as surely as a 422, so it counts as a rejection too.
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", "403", "404", "405", '
                      '"406", "409", "413", "415", "422", "428", "429", "5xx"]\n')
    server = await ApiServer.start(create_app(settings, provider=FakeProvider()), "127.0.0.1", 0)
    try:
        cmd = [
            str(SCHEMATHESIS), "--config-file", str(config), "run", f"http://127.0.0.1:{server.port}/v1/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                        "response_schema_conformance,negative_data_rejection",
            "--max-examples", "40", "--workers", "1", "--seed", "20261127",
            "-H", f"Authorization: Bearer {team.token}",
            "--report", "json", "--report-json-path", str(tmp_path / "report.json"),
            "--suppress-health-check", "all",
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=280)
    finally:
        await server.stop()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "No issues found" in text or "passed" in text.lower(), text[-3000:]
    if (tmp_path / "report.json").exists():
        json.loads((tmp_path / "report.json").read_text())
