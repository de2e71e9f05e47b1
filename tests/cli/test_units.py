"""Pure pieces of `orz cloud`: table, argv, ssh_config text, keys, error lines, validate, top-level handler."""

from __future__ import annotations

import io
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from api import schemas
from api.client import ApiError, ApiUnreachable
from cli import keys, main, output, ssh_config
from cli.cloud_secrets import parse_pairs
from cli.connect import api_message
from cli.errors import CliError
from cli.repo import as_clone_url, current_repo
from cli.starting import LogFollower
from tests import certmint

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def instance(sid: str, status: str = "running", **extra: object) -> schemas.Instance:
    base = dict(id=sid, status=status, tier="medium", attach_url="ws://x", ssh=f"ssh {sid}@h",
                created_at=NOW - timedelta(days=3), updated_at=NOW)
    return schemas.Instance.model_validate({**base, **extra})


def render(table: object) -> list[str]:
    console = Console(file=io.StringIO(), width=80, no_color=True)
    console.print(table)
    return console.file.getvalue().rstrip("\n").splitlines()  # type: ignore[attr-defined]


def test_table_fits_80_columns_with_the_longest_ids_and_states() -> None:
    rows = [instance("a" * 32, "unhealthy", last_activity_at=NOW - timedelta(minutes=5),
                     agent_state="needs_input", agent_message="a long question " * 10),
            instance("b" * 30 + "-9", "starting")]
    lines = render(output.instances_table(rows, NOW))
    assert max(len(line) for line in lines) <= 80
    assert lines[1].split() == ["a" * 32, "unhealthy", "needs", "input", "medium", "5m", "ago"]
    assert lines[2].split()[-1] == "-"



def test_a_stopped_sessions_agent_is_not_shown_as_waiting() -> None:
    """A stopped session's last report ("needs input") is no longer true: the list shows `-` where it showed
    the state in bold yellow, and status keeps it as history; an exit code stays (it says how it ended)."""
    stopped = instance("s1", "stopped", agent_state="needs_input", agent_message="which database?")
    assert render(output.instances_table([stopped], NOW))[1].split()[:3] == ["s1", "stopped", "-"]
    assert dict(output.describe(stopped))["agent"] == "needs input (before the session stopped): which database?"
    running = instance("s2", agent_state="needs_input", agent_message="which database?")
    assert dict(output.describe(running))["agent"] == "needs input: which database?"
    assert output.agent_label(instance("s3", "stopped", agent_state="exited", agent_exit_code=3)) == "exited 3"

def test_relative_times_and_quota_line() -> None:
    assert output.relative(None) == "-"
    assert output.relative(NOW - timedelta(seconds=5), NOW) == "just now"
    assert output.relative(NOW - timedelta(hours=2, minutes=5), NOW) == "2h ago"
    assert output.relative((NOW - timedelta(days=400)).replace(tzinfo=None), NOW) == "400d ago"
    quota = schemas.Quota(limit=2, active=2, plan="free")
    assert output.quota_line(quota) == "2 of 2 active sessions (free plan)"


def test_attach_argv_quotes_paths_for_ssh_option_parsing(tmp_path: Path) -> None:
    odd = tmp_path / "my dir %h"
    argv = ssh_config.attach_argv("abc", "gw.example", 2222, odd / "id", odd / "abc-cert.pub", odd / "kh")
    assert argv[:3] == ["ssh", "-i", f"{tmp_path}/my dir %%h/id"]
    assert f'CertificateFile="{tmp_path}/my dir %%h/abc-cert.pub"' in argv
    assert argv[-4:] == ["-p", "2222", "-t", "abc@gw.example"]
    with pytest.raises(ValueError, match="containing"):
        ssh_config.config_path_arg('/tmp/a"b')


def test_include_is_added_once_at_the_top_and_keeps_the_mode(tmp_path: Path) -> None:
    user_config = tmp_path / ".ssh" / "config"
    target = tmp_path / "orz config"
    assert ssh_config.install_include(user_config, target)
    assert stat.S_IMODE(user_config.stat().st_mode) == 0o600
    assert user_config.read_text() == f'# >>> orzbob cloud >>>\nInclude "{target}"\n# <<< orzbob cloud <<<\n'
    user_config.write_text("Host x\n" + user_config.read_text())
    user_config.chmod(0o644)
    assert not ssh_config.install_include(user_config, target)
    other = tmp_path / "other"
    other.write_text("Host y\n")
    other.chmod(0o640)
    assert ssh_config.install_include(other, target)
    assert other.read_text().endswith("\nHost y\n") and stat.S_IMODE(other.stat().st_mode) == 0o640


def test_main_config_and_refresh_line(home: Path) -> None:
    text = ssh_config.render_main_config(["/opt/orz bin/orz"])
    assert "Match host *.orz exec \"'/opt/orz bin/orz' cloud _refresh-cert %n\"" in text
    assert f"    Include {home}/.config/orzbob/hosts/*.conf" in text
    assert ssh_config.orz_command()[-2:] == ["-m", "cli"] or ssh_config.orz_command()[0].endswith("orz")
    block = ssh_config.render_host_block("abc", "gw", 22, Path("/k/abc-cert.pub"))
    assert block.splitlines() == ["Host abc.orz", "    HostName gw", "    Port 22", "    User abc",
                                  "    CertificateFile /k/abc-cert.pub"]
    assert ssh_config.session_from_host("abc.orz") == "abc"


def test_key_pair_and_certificate_checks(home: Path) -> None:
    pair = keys.ensure_key_pair()
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    assert keys.ensure_key_pair().public_line() == pair.public_line()  # kept, not regenerated
    public = pair.public_line()
    assert keys.needs_refresh("abc")
    cert = certmint.issued(public, "abc", 300)
    path = keys.save_certificate("abc", cert)
    assert 250 < (keys.cert_seconds_left(path, "abc", public) or 0) <= 300
    assert not keys.needs_refresh("abc")
    assert keys.cert_seconds_left(path, "other", public) is None  # principal is another session
    import asyncssh

    stranger = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    assert keys.cert_seconds_left(path, "abc", stranger) is None  # certifies another key
    keys.save_certificate("abc", certmint.issued(public, "abc", 30))
    assert keys.needs_refresh("abc")
    path.write_text("garbage")
    assert keys.cert_seconds_left(path, "abc", public) is None
    keys.forget_session("abc")
    assert not path.exists()


def test_api_errors_become_one_actionable_line() -> None:
    quota = ApiError(429, "quota_exceeded", "long detail", {"limit": 5, "current": 5, "plan": "pro"})
    assert api_message(quota) == ("quota reached: 5 of 5 active sessions on the pro plan; stop or kill one first "
                                  "(orz cloud list)")
    assert "run orz cloud login" in api_message(ApiError(401, "unauthorized", "invalid token"))
    unreachable = api_message(ApiUnreachable("http://h:1", OSError("refused")))
    assert unreachable.startswith("cannot reach the Orzbob Cloud API at http://h:1")
    assert api_message(ApiError(404, "not_found", "no such session: x")) == "no such session: x"


def test_secret_pairs() -> None:
    assert parse_pairs(("A=1", "B=x=y", "C="), ()) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(CliError) as err:
        parse_pairs(("hunter2",), ())
    assert "hunter2" not in err.value.format_message()
    with pytest.raises(CliError):
        parse_pairs((), ())


def test_repo_defaults(tmp_path: Path) -> None:
    assert as_clone_url("git@github.com:o/r.git", tmp_path) == "git@github.com:o/r.git"
    assert as_clone_url("https://x/r", tmp_path) == "https://x/r"
    assert as_clone_url("../r.git", tmp_path / "w") == (tmp_path / "r.git").as_uri()
    assert current_repo(tmp_path).url is None


def test_log_follower_prints_only_new_text() -> None:
    seen: list[str] = []
    follower = LogFollower(seen.append)
    for text in ("a\n", "a\nb\n", "a\nb\n", "b\nc\n", "zzz"):
        follower.update(text)
    assert seen == ["a", "b", "c", "zzz"]


def test_log_follower_shows_earlier_starts_under_their_title_and_then_follows_on() -> None:
    # What `orz cloud logs` prints after a restart (its first look), and what -f adds at the next restart.
    seen: list[str] = []
    follower = LogFollower(seen.append)
    follower.update("== init log, earlier starts ==\n[orz] start 1, t1\nbuilt\n\n== init log ==\n[orz] start 2, t2\n")
    assert seen == ["== init log, earlier starts ==", "[orz] start 1, t1\nbuilt", "== init log ==", "[orz] start 2, t2"]
    follower.update("== init log, earlier starts ==\n[orz] start 1, t1\nbuilt\n[orz] start 2, t2\n\n"
                    "== init log ==\n[orz] start 3, t3\n")
    assert seen[4:] == ["[orz] start 3, t3"]


def test_validate_needs_the_runner_package(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import orz

    (tmp_path / ".orz").mkdir()
    (tmp_path / ".orz" / "cloud.yaml").write_text('version: "1.0"\n')
    monkeypatch.setitem(sys.modules, "runner.cloud_config", None)
    result = CliRunner().invoke(orz, ["cloud", "validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "needs the runner package" in result.output
    missing = CliRunner().invoke(orz, ["cloud", "validate", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_validate_with_the_runner_validator(home: Path, tmp_path: Path) -> None:
    pytest.importorskip("runner.cloud_config")
    from cli.main import orz

    (tmp_path / ".orz").mkdir()
    config = tmp_path / ".orz" / "cloud.yaml"
    config.write_text('version: "1.0"\nsetup:\n  init: make\n')
    ok = CliRunner().invoke(orz, ["cloud", "validate", str(tmp_path)])
    assert ok.exit_code == 0 and "ok" in ok.output, ok.output
    config.write_text('version: "1.0"\nsetup:\n  init: make\n  bogus: 1\n')
    warned = CliRunner().invoke(orz, ["cloud", "validate", str(config)])
    assert warned.exit_code == 0 and ":4: setup.bogus: unknown key, ignored" in warned.output, warned.output
    config.write_text('version: "1.0"\nsetup:\n  init: make\nresources: {cpu: lots}\n')
    bad = CliRunner().invoke(orz, ["cloud", "validate", str(config)])
    assert bad.exit_code == 1 and ":4:" in bad.output and "resources.cpu" in bad.output


def test_top_level_handler_prints_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    def broken(**_: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.delenv("ORZ_DEBUG", raising=False)
    monkeypatch.setattr(main, "orz", broken)
    with pytest.raises(SystemExit) as exit_info:
        main.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "orz: internal error: RuntimeError: boom second line (ORZ_DEBUG=1 shows more)\n"


def _documented_forms() -> list[tuple[list[str], list[str]]]:
    """(command words, argument words) of each `orz cloud ...` form in a docs/cli.md heading."""
    import re

    forms = []
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        for form in re.findall(r"`orz cloud ([^`]*)`", heading):
            words = form.split()
            command = [w for w in words if re.fullmatch(r"[a-z][a-z-]*", w)]
            forms.append((command, words[len(command):]))
    return forms


def test_help_names_arguments_and_values_as_docs_cli_md_does() -> None:
    # `orz cloud cert --help` said SESSION_ID and --ttl TEXT where docs/cli.md says ID and --ttl DURATION.
    wrong = []
    for command, args in _documented_forms():
        help_text = CliRunner().invoke(main.orz, ["cloud", *command, "--help"]).output
        usage = help_text.splitlines()[0] if help_text else ""
        usage_words = {w.strip("[]").removesuffix("...").strip("[]") for w in usage.split()}
        for i, word in enumerate(args):
            bare = word.strip("[]").removesuffix("...").strip()
            after_option = i > 0 and args[i - 1].lstrip("[").startswith("-")
            if bare.isupper() and not after_option and bare not in usage_words:
                wrong.append(f"{' '.join(command)}: {bare} not in {usage!r}")
            option = word.lstrip("[")
            if option.startswith("--") and option != "--" and i + 1 < len(args):
                value = args[i + 1].strip("[]")
                shown = (f"{option} {value}", f"{option} [")  # a choice lists its values instead
                if value.isupper() and value.isalpha() and not any(form in help_text for form in shown):
                    wrong.append(f"{' '.join(command)}: {option} {value} not in its --help")
    assert not wrong, "\n".join(wrong)


def test_start_help_says_a_failed_setup_picks_up_the_fix_without_pull() -> None:
    # docs/cli.md "Picking up a fix": --help read as if only --pull moved the workspace to the new head.
    help_text = " ".join(CliRunner().invoke(main.orz, ["cloud", "start", "--help"]).output.split())
    assert "setup never finished gets this without --pull" in help_text


def test_list_help_says_what_a_member_sees() -> None:
    """`list` shows a member their own sessions and an admin the org's (tests/api/test_roles.py); its help said
    "your org's sessions" to everyone. The help and docs/cli.md now say the same."""
    help_text = " ".join(CliRunner().invoke(main.orz, ["cloud", "list", "--help"]).output.split())
    assert "Your sessions (an org admin: every session of the org) and the org's quota." in help_text, help_text
    assert "Your org's sessions" not in help_text
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    assert "Your sessions (an org admin sees every session of the org) and the org's quota." in docs
