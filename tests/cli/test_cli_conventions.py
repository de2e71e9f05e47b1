"""gh/coder conventions of `orz cloud`: ORZBOB_TOKEN, --json, exit codes, completion, ssh-config --remove and
--dry-run, login --with-token (the real `orz` subprocess against a real API server)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from api import admin
from tests.cli.conftest import ROOT, LiveApi, Orz
from tests.cli.test_cloud_commands import create
from tests.conftest import Tenant


def test_orzbob_token_works_for_every_command_without_a_saved_login(orz: Orz, live_api: LiveApi,
                                                                     tmp_path: Path, home: Path) -> None:
    tenant = live_api.tenant("acme")
    env = {"ORZBOB_TOKEN": tenant.token, "ORZBOB_API_URL": live_api.url}
    whoami = orz("cloud", "whoami", **env)
    assert whoami.returncode == 0 and tenant.email in whoami.stdout, whoami.stderr
    made = orz("cloud", "new", "--no-attach", cwd=tmp_path, **env)
    assert made.returncode == 0, made.stderr
    sid = made.stdout.split()[1]
    assert sid in orz("cloud", "list", **env).stdout
    assert orz("cloud", "status", sid, **env).returncode == 0
    assert orz("cloud", "token", sid, **env).returncode == 0
    assert not (home / ".config" / "orzbob" / "token.json").exists()  # nothing was saved
    bad = orz("cloud", "list", ORZBOB_TOKEN="orz_nottherighttoken0000000000", ORZBOB_API_URL=live_api.url)
    assert bad.returncode == 4
    assert "the API refused the token in ORZBOB_TOKEN" in bad.stderr and "orz_nottherighttoken" not in bad.stderr


def test_login_with_token_reads_stdin(orz: Orz, live_api: LiveApi, home: Path) -> None:
    tenant = live_api.tenant("acme")
    done = orz("cloud", "login", "--with-token", "--api-url", live_api.url, input=tenant.token + "\n")
    assert done.returncode == 0, done.stderr
    assert f"as {tenant.email}" in done.stdout and tenant.token not in done.stdout + done.stderr
    saved = home / ".config" / "orzbob" / "token.json"
    assert json.loads(saved.read_text())["api_token"] == tenant.token
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    empty = orz("cloud", "login", "--with-token", "--api-url", live_api.url, input="")
    assert empty.returncode == 2 and empty.stderr.strip() == "orz: --with-token read no token from standard input"


def test_exit_codes_tell_usage_not_found_auth_and_forbidden_apart(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                                  tmp_path: Path) -> None:
    assert orz("cloud", "list", "--bogus").returncode == 2  # usage
    assert orz("cloud", "status", "no-such-session").returncode == 3  # not found
    assert orz("cloud", "secrets", "delete", "nope").returncode == 3
    assert orz("cloud", "list", HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg")).returncode == 4  # no login
    assert orz("cloud", "list", ORZBOB_TOKEN="orz_bad0000000000000000000", ORZBOB_API_URL=live_api.url
               ).returncode == 4
    sid = create(orz, cwd=tmp_path)
    sessions = live_api.app.ctx.state.sessions
    live_api.call(admin.create_user(sessions, "bob@acme.example", "acme"))
    bob = live_api.call(admin.create_token(sessions, "bob@acme.example"))
    forbidden = orz("cloud", "kill", sid, ORZBOB_TOKEN=bob, ORZBOB_API_URL=live_api.url)
    assert forbidden.returncode == 5 and "belongs to someone else" in forbidden.stderr
    assert orz("cloud", "status", sid).returncode == 0


def test_every_read_command_has_json(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    for args, key in ((["list"], "instances"), (["status", sid], "instance"), (["whoami"], "user"),
                      (["secrets", "list"], "secrets"), (["logs", sid], "init_log")):
        done = orz("cloud", *args, "--json")
        assert done.returncode == 0, (args, done.stderr)
        assert key in json.loads(done.stdout), args
    assert orz("cloud", "logs", sid, "--json", "-f").returncode == 2


def test_completion_offers_session_ids(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    for command in ("attach", "status", "kill", "logs", "token", "web"):
        done = orz("cloud", command, "", _ORZ_COMPLETE="bash_complete", COMP_WORDS=f"orz cloud {command} ",
                   COMP_CWORD="3")
        assert done.returncode == 0, done.stderr
        assert f"plain,{sid}" in done.stdout.splitlines(), (command, done.stdout)
    prefix = orz("cloud", "attach", _ORZ_COMPLETE="bash_complete", COMP_WORDS="orz cloud attach zzz", COMP_CWORD="3")
    assert prefix.stdout.strip() == ""
    # Not logged in / API down: no ids and no error in the middle of a command line.
    quiet = orz("cloud", "attach", _ORZ_COMPLETE="bash_complete", COMP_WORDS="orz cloud attach ", COMP_CWORD="3",
                ORZBOB_API_URL="http://127.0.0.1:9")
    assert quiet.returncode == 0 and quiet.stdout.strip() == "" and quiet.stderr == ""


def test_ssh_config_dry_run_then_write_then_remove(orz: Orz, home: Path, logged_in: Tenant) -> None:
    user_config = home / ".ssh" / "config"
    user_config.parent.mkdir(mode=0o700)
    mine = "Host work\n    HostName work.example\n"
    user_config.write_text(mine)
    user_config.chmod(0o600)
    generated = home / ".config" / "orzbob" / "ssh_config"

    dry = orz("cloud", "ssh-config", "--write", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would write {generated}:" in dry.stdout and f"would add at the top of {user_config}:" in dry.stdout
    assert user_config.read_text() == mine and not generated.exists()  # nothing changed

    assert orz("cloud", "ssh-config", "--write").returncode == 0
    assert generated.exists() and user_config.read_text().startswith("# >>> orzbob cloud >>>")
    (home / ".config" / "orzbob" / "hosts" / "demo-1.conf").write_text("Host demo-1.orz\n")

    dry = orz("cloud", "ssh-config", "--remove", "--dry-run")
    assert f"would remove the Orzbob Cloud Include block from {user_config}" in dry.stdout
    assert f"would delete {generated}" in dry.stdout and "demo-1.conf" in dry.stdout
    assert generated.exists() and "orzbob" in user_config.read_text()

    removed = orz("cloud", "ssh-config", "--remove")
    assert removed.returncode == 0, removed.stderr
    assert user_config.read_text() == mine  # exactly what the user had
    assert stat.S_IMODE(user_config.stat().st_mode) == 0o600
    assert not generated.exists() and not (home / ".config" / "orzbob" / "hosts" / "demo-1.conf").exists()
    assert "nothing to remove" in orz("cloud", "ssh-config", "--remove").stdout
    assert orz("cloud", "ssh-config", "--write", "--remove").returncode == 2
    assert orz("cloud", "ssh-config", "--dry-run").returncode == 2


def test_output_piped_into_a_reader_that_stopped_ends_quietly(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                              tmp_path: Path) -> None:
    """`orz cloud list | head -1`: head exits after its line and the rest of the table meets a closed pipe.
    That is the reader's choice, not an error to report (it printed "orz: [Errno 32] Broken pipe")."""
    assert orz("cloud", "new", "--no-attach", cwd=tmp_path).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as head is after its first line
    try:
        done = subprocess.run([sys.executable, "-m", "cli", "cloud", "list"], cwd=ROOT, env=orz.env(),
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30, check=False)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode != 0  # the table was not all written; a script checking it may know
