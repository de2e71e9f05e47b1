"""sftp and scp (SFTP mode and legacy -O exec mode) both ways through the gateway."""

from __future__ import annotations

import os

import pytest

from tests.gateway.conftest import SESSION, Env, run


def _client_opts(env: Env) -> list[str]:
    return [a for a in env.base_args()[1:] if a != "-p" and a != str(env.port)] + env.cert_args()


async def test_sftp_both_ways(env: Env) -> None:
    data = os.urandom(300_000)
    (env.tmp / "up.bin").write_bytes(data)
    (env.runner.workspace / "down.bin").write_bytes(data[::-1])
    batch = env.tmp / "batch"
    batch.write_text(f"put {env.tmp / 'up.bin'} up.bin\nget down.bin {env.tmp / 'down.bin'}\n")
    result = await run("sftp", "-P", str(env.port), "-b", str(batch), *_client_opts(env),
                       target=f"{SESSION}@127.0.0.1")
    assert result.returncode == 0, result
    assert (env.runner.workspace / "up.bin").read_bytes() == data
    assert (env.tmp / "down.bin").read_bytes() == data[::-1]


@pytest.mark.parametrize("legacy", [False, True], ids=["scp-sftp", "scp-legacy-exec"])
async def test_scp_both_ways(env: Env, legacy: bool) -> None:
    data = os.urandom(200_000)
    (env.tmp / "a.bin").write_bytes(data)
    mode = ["-O"] if legacy else []
    up = await run("scp", *mode, "-P", str(env.port), *_client_opts(env), str(env.tmp / "a.bin"),
                   f"{SESSION}@127.0.0.1:a.bin")
    assert up.returncode == 0, up
    assert (env.runner.workspace / "a.bin").read_bytes() == data
    (env.runner.workspace / "b.bin").write_bytes(data[::-1])
    down = await run("scp", *mode, "-P", str(env.port), *_client_opts(env), f"{SESSION}@127.0.0.1:b.bin",
                     str(env.tmp / "b.bin"))
    assert down.returncode == 0, down
    assert (env.tmp / "b.bin").read_bytes() == data[::-1]
