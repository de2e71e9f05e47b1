"""attach, new (attaching) and ssh-config through the real `orz`, with `ssh` itself checked by `ssh -G`.

A fake `ssh` on PATH records the argv `orz` execs; the real OpenSSH client resolves the generated
config (running its `Match exec` refresh) so `ssh <id>.orz` is shown to get user, port and certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cli.keys import cert_seconds_left
from tests import certmint
from tests.cli.conftest import GATEWAY_PORT, LiveApi, Orz
from tests.cli.test_cloud_commands import create
from tests.conftest import Tenant

FAKE_SSH = """#!{python}
import json, sys
with open({out!r}, "w") as fh:
    json.dump(sys.argv, fh)
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """A directory with an `ssh` that writes its argv to a file, and that file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "ssh-argv.json"
    script = bin_dir / "ssh"
    import sys

    script.write_text(FAKE_SSH.format(python=sys.executable, out=str(out)))
    script.chmod(0o755)
    return bin_dir, out


def config_dir(home: Path) -> Path:
    return home / ".config" / "orzbob"


def test_attach_execs_ssh_with_a_fresh_certificate(orz: Orz, live_api: LiveApi, logged_in: Tenant, home: Path,
                                                   fake_ssh: tuple[Path, Path]) -> None:
    sid = create(orz, "--repo", "https://example.com/r.git")
    bin_dir, out = fake_ssh
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    done = orz("cloud", "attach", sid, PATH=path)
    assert done.returncode == 0, done.stderr
    argv = json.loads(out.read_text())
    conf = config_dir(home)
    cert = conf / "certs" / f"{sid}-cert.pub"
    assert argv == [
        str(bin_dir / "ssh"), "-i", str(conf / "id_ed25519"),
        "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no", "-o", f"UserKnownHostsFile={conf / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=accept-new", "-p", str(GATEWAY_PORT), "-t", f"{sid}@127.0.0.1",
    ]
    assert stat.S_IMODE((conf / "id_ed25519").stat().st_mode) == 0o600
    public = (conf / "id_ed25519.pub").read_text()
    assert public.startswith("ssh-ed25519 ")
    assert (cert_seconds_left(cert, sid, public) or 0) > 200

    out.unlink()
    assert orz("cloud", "attach", "--readonly", sid, PATH=path).returncode == 0
    argv = json.loads(out.read_text())
    assert f"CertificateFile={conf / 'certs' / (sid + '.ro-cert.pub')}" in argv


def test_new_waits_then_attaches(orz: Orz, live_api: LiveApi, logged_in: Tenant, home: Path,
                                 fake_ssh: tuple[Path, Path]) -> None:
    import sys

    import pexpect

    bin_dir, out = fake_ssh
    with live_api.runners_heartbeating():  # from a terminal, as a person types it
        child = pexpect.spawn(sys.executable, ["-m", "cli", "cloud", "new", "--repo", "https://example.com/r.git",
                                               "do it"],
                              env=orz.env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), encoding="utf-8",
                              timeout=20, dimensions=(24, 200))
        child.expect(r"session (\S+) created")
        sid = child.match.group(1)
        child.expect("-> running")
        child.expect(f"attaching to {sid}")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0
    assert json.loads(out.read_text())[-1] == f"{sid}@127.0.0.1"


def test_new_in_a_script_waits_and_says_how_to_attach_instead_of_attaching(
        orz: Orz, live_api: LiveApi, logged_in: Tenant, fake_ssh: tuple[Path, Path]) -> None:
    """No terminal on stdin (CI, a pipe, `while read` loops): ssh would get none and read the script's input."""
    bin_dir, out = fake_ssh
    with live_api.runners_heartbeating():
        done = orz("cloud", "new", "--repo", "https://example.com/r.git", "do it", input="echo not for ssh\n",
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    sid = done.stdout.split()[1]
    assert "-> running" in done.stderr and f"session {sid} is running" in done.stdout
    assert "not attaching: standard input is not a terminal" in done.stderr
    assert f"attach with: orz cloud attach {sid}" in done.stdout
    assert not out.exists()  # ssh never ran


def test_new_json_prints_the_running_session_alone_on_stdout(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                             fake_ssh: tuple[Path, Path]) -> None:
    bin_dir, out = fake_ssh
    with live_api.runners_heartbeating():
        done = orz("cloud", "new", "--json", "--repo", "https://example.com/r.git", "--branch", "dev", input="",
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    inst = json.loads(done.stdout)  # nothing else on stdout
    assert inst["status"] == "running" and inst["branch"] == "dev"
    assert f"session {inst['id']} created" in done.stderr and "not attaching" not in done.stderr
    assert "token=" not in done.stdout  # the create answer's one-time attach token stays out of CI logs
    assert inst["attach_url"].endswith(f"/v1/instances/{inst['id']}/attach")
    assert not out.exists()
    # --no-attach: the session as created, without waiting.
    made = orz("cloud", "new", "--json", "--no-attach", "--repo", "https://example.com/r.git", input="")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["status"] == "starting"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_ssh_config_makes_plain_ssh_work_and_refreshes_expired_certs(orz: Orz, live_api: LiveApi,
                                                                      logged_in: Tenant, home: Path) -> None:
    user_config = home / ".ssh" / "config"
    user_config.parent.mkdir(mode=0o700)
    user_config.write_text("Host example\n    User someone\n")
    user_config.chmod(0o600)

    done = orz("cloud", "ssh-config", "--write")
    assert done.returncode == 0, done.stderr
    again = orz("cloud", "ssh-config", "--write")
    assert "already included" in again.stdout
    text = user_config.read_text()
    orz_config = config_dir(home) / "ssh_config"
    assert text.startswith("# >>> orzbob cloud >>>\nInclude " + str(orz_config) + "\n")
    assert text.count("Include ") == 1 and text.endswith("Host example\n    User someone\n")
    generated = orz_config.read_text()
    assert "Host *.orz" in generated and "Match host *.orz exec" in generated and "_refresh-cert %n" in generated

    sid = create(orz, "--repo", "https://example.com/r.git")
    cert = config_dir(home) / "certs" / f"{sid}-cert.pub"

    def resolve() -> dict[str, str]:
        done = subprocess.run(["ssh", "-F", str(user_config), "-G", f"{sid}.orz"], env=orz.env(),
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert "orz:" not in done.stderr, done.stderr
        pairs = (line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
        return {k: v for k, v in pairs if k in ("user", "hostname", "port", "certificatefile", "identityfile",
                                                "userknownhostsfile", "stricthostkeychecking")}

    first = resolve()
    assert first == {
        "user": sid, "hostname": "127.0.0.1", "port": str(GATEWAY_PORT), "certificatefile": str(cert),
        "identityfile": str(config_dir(home) / "id_ed25519"),
        "userknownhostsfile": str(config_dir(home) / "known_hosts"), "stricthostkeychecking": "accept-new",
    }
    public = (config_dir(home) / "id_ed25519.pub").read_text()
    issued = cert.read_text()
    assert (cert_seconds_left(cert, sid, public) or 0) > 200

    resolve()  # still fresh: no new certificate
    assert cert.read_text() == issued

    expired = certmint.issued(public, sid, -5)
    cert.write_text(expired + "\n")
    assert cert_seconds_left(cert, sid, public) is not None and cert_seconds_left(cert, sid, public) < 0
    assert resolve()["certificatefile"] == str(cert)
    assert (cert_seconds_left(cert, sid, public) or 0) > 200

    short = certmint.issued(public, sid, 30)  # < 60 s left: refreshed before it can die mid-handshake
    cert.write_text(short + "\n")
    resolve()
    assert (cert_seconds_left(cert, sid, public) or 0) > 200


def test_refresh_cert_failure_is_one_line(orz: Orz, live_api: LiveApi, logged_in: Tenant) -> None:
    done = orz("cloud", "_refresh-cert", "nosuch.orz")
    assert done.returncode == 3  # 3: not found
    assert done.stderr.strip() == "orz: no such session: nosuch; you have no sessions; start one with: orz cloud new"
    bad = orz("cloud", "_refresh-cert", "x;rm -rf.orz")
    assert bad.returncode == 2 and "not a session id" in bad.stderr  # 2: bad input
