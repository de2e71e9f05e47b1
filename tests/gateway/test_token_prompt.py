"""The gateway's Token: prompt, as a person sees it in a real terminal (OpenSSH's ssh in tmux): it names the
command that prints a token for this session, and pasting that token gets in."""

from __future__ import annotations

import asyncio
import shlex
import tempfile
from pathlib import Path

import pytest

from tests.gateway.conftest import SESSION, Env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]


async def tmux(sock: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec("tmux", "-S", str(sock), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode()


async def screen_with(sock: Path, text: str, timeout: float = 10) -> str:
    for _ in range(int(timeout / 0.1)):
        screen = await tmux(sock, "capture-pane", "-p", "-J", "-t", "t")
        if text in screen:
            return screen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not on screen:\n{screen}")


async def test_the_token_prompt_names_a_command_that_prints_one(env: Env) -> None:
    args = [*env.base_args(), *env.token_args("keyboard-interactive"), f"{SESSION}@127.0.0.1", "--", "echo inside"]
    with tempfile.TemporaryDirectory(prefix="orz-") as short:
        sock = Path(short) / "t.sock"
        conf = Path(short) / "t.conf"
        conf.write_text("set-option -g remain-on-exit on\n")
        await tmux(sock, "-f", str(conf), "new-session", "-d", "-s", "t", "-x", "200", "-y", "20",
                   shlex.join(args))
        try:
            screen = await screen_with(sock, "Token:")
            assert f"Paste a one-time attach token from `orz cloud token {SESSION}`" in screen
            assert "orz cloud attach" in screen  # the certificate way, named for what it does
            await tmux(sock, "send-keys", "-t", "t", env.token(), "Enter")
            await screen_with(sock, "inside")
        finally:
            await tmux(sock, "kill-server")
