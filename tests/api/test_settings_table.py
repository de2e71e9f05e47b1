"""The configuration table in README.md is generated from api/settings.py and kept current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from api.settings import GROUPS, TABLE_END, TABLE_START, Settings, markdown_table, option, readme_with_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_shows_every_setting_as_the_code_defines_it() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_with_table(readme, markdown_table()) == readme, (
        "README.md's configuration table is stale: run `.venv/bin/python -m api.settings --write-readme`")


def test_every_setting_has_a_help_text_and_a_component() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert isinstance(field.json_schema_extra, dict) and field.json_schema_extra["group"] in GROUPS, name


def test_a_setting_without_help_or_component_is_refused() -> None:
    class Undocumented(Settings):
        new_knob: int = 3

    with pytest.raises(ValueError, match="new_knob needs a help text"):
        markdown_table(Undocumented)


def test_the_table_groups_by_component_with_env_names_and_defaults() -> None:
    table = markdown_table()
    gateway = table.split("#### Gateway\n", 1)[1].split("####", 1)[0]
    assert "| `ORZ_SSH_PORT` | `2222` |" in gateway
    assert "| `ORZ_GATEWAY_DRAIN_S` | `240` (4 min) |" in gateway
    assert "ORZ_API_PORT" not in gateway
    assert "| `ORZ_IDLE_TIMEOUT_S` | unset |" in table
    assert "| `ORZ_PUBLIC_SSH_HOST` | `ORZ_SSH_HOST` |" in table  # derived: says from what
    assert [line[5:] for line in table.splitlines() if line.startswith("#### ")] == list(GROUPS.values())


def test_a_secret_default_is_never_shown() -> None:
    class WithSecret(Settings):
        webhook_key: SecretStr = option("api", SecretStr("hunter2-do-not-print"), "signs webhooks")

    table = markdown_table(WithSecret)
    assert "hunter2" not in table
    assert "| `ORZ_WEBHOOK_KEY` | (secret) | signs webhooks |" in table
    assert "| `ORZ_SERVICE_TOKEN` | generated |" in table


def test_the_command_prints_the_table_and_rewrites_a_stale_readme(tmp_path: Path) -> None:
    printed = subprocess.run([sys.executable, "-m", "api.settings", "--markdown"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    assert printed == markdown_table()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{TABLE_START}\n| `ORZ_GONE` | old |\n{TABLE_END}\n\nAfter.\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "api.settings", "--write-readme", str(readme)], cwd=ROOT, check=True)
    text = readme.read_text(encoding="utf-8")
    assert "ORZ_GONE" not in text
    assert f"{TABLE_START}\n\n{markdown_table()}\n{TABLE_END}\n\nAfter.\n" in text
    assert text.startswith("# Title\n\n")


def test_writing_a_readme_without_the_markers_fails_clearly(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# No table here\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "api.settings", "--write-readme", str(readme)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "has no" in run.stderr
    assert readme.read_text(encoding="utf-8") == "# No table here\n"
