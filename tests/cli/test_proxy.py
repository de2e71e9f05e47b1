"""SSH over the WebSocket door: `ssh` with `ProxyCommand orz cloud proxy` attaches while the SSH port is
unreachable (a bogus host name and a closed port), and `orz cloud ssh-config --websocket` sets that up."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Iterator

import pexpect
import pytest

from cli.cloud_proxy import session_from_target, tunnel_url
from cli.errors import CliError
from tests.support import ROOT, free_port, orz
from tests.web_platform import NEEDS, WebPlatform, start_platform

pytestmark = [pytest.mark.integration, NEEDS]
ORZ = f"env PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m cli"
BOGUS_HOST = "ssh-port-unreachable.invalid"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebPlatform]:
    yield from start_platform(tmp_path_factory.mktemp("proxy"))


def test_targets_and_urls() -> None:
    assert session_from_target("abc-1.orz") == "abc-1"
    assert session_from_target("abc-1@example.org") == "abc-1"
    assert session_from_target("abc-1") == "abc-1"
    assert tunnel_url("wss://gw.example/v1/instances/abc/attach?token=t") == "wss://gw.example/v1/instances/abc/ssh?token=t"
    with pytest.raises(CliError):
        tunnel_url("https://gw.example/v1/instances/abc/attach?token=t")


def test_proxycommand_with_no_tcp_path_to_the_ssh_port(platform: WebPlatform) -> None:
    sid = platform.new_session("bash --norc --noprofile")
    # A certificate for the user's key, as `orz cloud attach` gets it; the connection goes through the proxy.
    got = orz("cloud", "_refresh-cert", sid, env=platform.env)
    assert got.returncode == 0, got.stderr
    conf = platform.home / ".config" / "orzbob"
    closed = free_port()
    options = ["-F", "/dev/null", "-p", str(closed), "-i", str(conf / "id_ed25519"),
               "-o", f"CertificateFile={conf / 'certs' / (sid + '-cert.pub')}", "-o", "IdentitiesOnly=yes",
               "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={platform.home / 'known_hosts'}",
               "-o", "StrictHostKeyChecking=accept-new"]
    target = [f"{sid}@{BOGUS_HOST}", "echo", "over-wss"]
    proxied = ["ssh", *options, "-o", f"ProxyCommand={ORZ} cloud proxy %r@%h", *target]
    done = subprocess.run(proxied, env=platform.env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "over-wss" in done.stdout
    # Without the proxy the same target is unreachable: the only path was the WebSocket.
    direct = subprocess.run(["ssh", *options, *target], env=platform.env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert direct.returncode == 255
    platform.kill(sid)


def test_the_documented_one_off_asks_for_a_token_not_to_trust_the_host_key(platform: WebPlatform) -> None:
    # docs/web.md's one-off: ssh looks the key up as the host it was given (port 22); the CLI had pinned it
    # only as [gateway host]:ssh port, so ssh asked "authenticity of host ... can't be established".
    sid = platform.new_session("bash --norc --noprofile")
    known_hosts = platform.home / ".config" / "orzbob" / "known_hosts"
    known_hosts.unlink(missing_ok=True)  # as on a machine that never attached
    token = orz("cloud", "token", sid, env=platform.env)
    assert token.returncode == 0, token.stderr
    child = pexpect.spawn("ssh", ["-F", "/dev/null", "-o", f"ProxyCommand={ORZ} cloud proxy %r@%h",
                                  "-o", f"UserKnownHostsFile={known_hosts}", f"{sid}@gateway.example",
                                  "echo", "one-off-over-wss"],
                          env=platform.env, encoding="utf-8", timeout=30)
    try:
        assert child.expect(["Token:", "authenticity of host", pexpect.EOF]) == 0, child.before
        child.sendline(token.stdout.strip())
        child.expect("one-off-over-wss")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "gateway.example " in known_hosts.read_text()
    platform.kill(sid)


def test_ssh_config_websocket_attaches_to_tmux(platform: WebPlatform) -> None:
    sid = platform.new_session("bash --norc --noprofile")
    written = orz("cloud", "ssh-config", "--websocket", "--write", env=platform.env)
    assert written.returncode == 0, written.stderr
    text = (platform.home / ".config" / "orzbob" / "ssh_config").read_text()
    assert "ProxyCommand" in text and "cloud proxy %n" in text
    user_config = platform.home / ".ssh" / "config"
    # Port: a closed one (the command line beats the config). HostName stays: `Match host` matches on it.
    child = pexpect.spawn("ssh", ["-F", str(user_config), "-o", f"Port={free_port()}", f"{sid}.orz"],
                          env=platform.env, encoding="utf-8", timeout=20, dimensions=(24, 80))
    try:
        child.expect(r"\[main\]")
        time.sleep(0.3)
        child.sendline("echo over''-websocket")
        child.expect("over-websocket")
        child.send("\x02d")  # tmux detach
        child.expect("detached")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    platform.kill(sid)
