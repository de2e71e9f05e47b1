"""A runner that cannot start says why: the session fails on the API with the reason and frees its quota
(issue 17 item 3: a runner that died on `embedded null byte` used to hold quota for 20 minutes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.instances.providers.fake import FakeProvider
from api.schemas import STATE_FATAL_FILE as FATAL_FILE
from api.serve import ApiServer
from api.settings import Settings
from tests.conftest import make_tenant
from tests.runner.conftest import StartRunner
from tests.runner.fake_api import FakeApi
from tests.support import ROOT, orz_env

pytestmark = pytest.mark.timeout(60)


async def test_a_spec_the_api_refuses_fails_the_session_with_the_reason(settings: Settings, sessions,
                                                                        tmp_path: Path) -> None:
    provider = FakeProvider()
    server = await ApiServer.start(create_app(settings, provider=provider), "127.0.0.1", 0)
    api_url = f"http://127.0.0.1:{server.port}"
    try:
        t = await make_tenant(sessions, "acme")
        async with httpx.AsyncClient(base_url=api_url, headers=t.headers) as http:
            created = await http.post("/v1/instances", json={})
            sid = created.json()["id"]
            assert (await http.get("/v1/instances")).json()["quota"]["active"] == 1
            # Injected directly, as old data or a hand-edited spec would reach it: NUL in the task.
            spec = {"session_id": sid, "api_url": api_url, "task": "fix\x00this", "program": "sh",
                    "gateway_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample gw",
                    "workspace": str(tmp_path / "ws"), "state_dir": str(tmp_path / "state")}
            env = orz_env(tmp_path / "home", ORZ_RUNNER_SPEC=json.dumps(spec),
                          ORZ_RUNNER_TOKEN=provider.specs[sid].runner_token, ORZ_LOG_JSON="false")
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "runner", env=env, cwd=ROOT,
                                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 2, out.decode(errors="replace")
            got = (await http.get(f"/v1/instances/{sid}")).json()
            assert got["status"] == "failed"
            assert got["reason"].startswith("the runner spec is not valid: task: contains U+0000"), got["reason"]
            assert (await http.get("/v1/instances")).json()["quota"]["active"] == 0
    finally:
        await server.stop()
    # Where the provider looks when the API could not be told (the reconciler reads it).
    assert (tmp_path / "state" / FATAL_FILE).read_text().startswith("the runner spec is not valid: task:")
    assert "fix" not in out.decode(errors="replace").split("task:")[-1]  # the value is never logged


async def test_an_unexpected_start_error_is_reported_not_swallowed(start_runner: StartRunner, fake_api: FakeApi,
                                                                  short_tmp: Path) -> None:
    """Not a RunnerError (here an OSError: the workspace path is a file): still a fatal report."""
    (short_tmp / "s1").mkdir()
    (short_tmp / "s1" / "workspace").write_text("not a directory")
    handle = await start_runner(None)
    assert await asyncio.wait_for(handle.task, 15) == 2
    fatal = fake_api.bodies()[-1]["fatal_error"]
    assert fatal.startswith("the runner failed: FileExistsError"), fatal


async def test_a_fatal_report_with_nul_in_the_init_log_still_lands(start_runner: StartRunner, fake_api: FakeApi,
                                                                   make_repo) -> None:
    config = "version: '1.0'\nsetup:\n  init: printf 'bad\\000byte'; exit 3\n"
    handle = await start_runner(make_repo({".orz/cloud.yaml": config}))
    assert await asyncio.wait_for(handle.task, 15) == 2
    last = fake_api.bodies()[-1]
    assert "exit status 3" in last["fatal_error"]
    assert "bad\ufffdbyte" in last["init_log_tail"]
