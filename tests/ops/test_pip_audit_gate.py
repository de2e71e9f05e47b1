"""hack/pip_audit_gate.py: a real audit passes or fails on findings; an unreachable service is
reported and passes only when the service is not required."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

# hack/ is scripts, not a package: load the gate from its file.
_spec = importlib.util.spec_from_file_location("pip_audit_gate", ROOT / "hack" / "pip_audit_gate.py")
assert _spec and _spec.loader
pip_audit_gate = importlib.util.module_from_spec(_spec)
sys.modules["pip_audit_gate"] = pip_audit_gate  # dataclasses look their module up there
_spec.loader.exec_module(pip_audit_gate)

# A stand-in for pip-audit: reads the scenario from the environment, writes the JSON report that the
# real tool would write to --output.
FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--output") + 1]
service = args[args.index("--vulnerability-service") + 1]
canary = "--requirement" in args
scenario = json.loads(os.environ["FAKE_AUDIT"])[service]
if scenario == "network":
    sys.stderr.write("requests.exceptions.ConnectionError: Max retries exceeded\\n")
    sys.exit(1)
if scenario == "empty":
    deps = [{{"name": "jinja2", "skip_reason": "Dependency not found on PyPI and could not be audited"}}]
elif canary:
    deps = [{{"name": "jinja2", "version": "2.4.1", "vulns": [{{"id": "PYSEC-2014-8"}}]}}]
elif scenario == "vulnerable":
    deps = [{{"name": "sanic", "version": "1.0", "vulns": [{{"id": "GHSA-xxxx"}}]}},
            {{"name": "rich", "version": "13", "vulns": []}}]
else:
    deps = [{{"name": "rich", "version": "13", "vulns": []}}]
open(out, "w").write(json.dumps({{"dependencies": deps, "fixes": []}}))
"""


@pytest.fixture
def fake_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = tmp_path / "pip-audit"
    script.write_text(FAKE.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(pip_audit_gate, "pip_audit_bin", lambda: str(script))
    monkeypatch.delenv("ORZ_AUDIT_REQUIRE_SERVICE", raising=False)

    def scenario(pypi: str, osv: str) -> None:
        monkeypatch.setenv("FAKE_AUDIT", json.dumps({"pypi": pypi, "osv": osv}))

    return scenario


def test_clean_environment_passes(fake_audit, capsys):
    fake_audit("clean", "clean")
    assert pip_audit_gate.main() == 0
    assert "1 packages audited, no known vulnerabilities" in capsys.readouterr().out


def test_a_vulnerable_package_fails(fake_audit, capsys):
    fake_audit("vulnerable", "clean")
    assert pip_audit_gate.main() == 1
    assert "sanic 1.0: GHSA-xxxx" in capsys.readouterr().err


def test_falls_back_to_the_second_service(fake_audit, capsys):
    fake_audit("empty", "vulnerable")
    assert pip_audit_gate.main() == 1


def test_unreachable_service_is_reported_and_passes_unless_required(fake_audit, capsys, monkeypatch):
    fake_audit("empty", "network")
    assert pip_audit_gate.main() == 0
    err = capsys.readouterr().err
    assert "NOT AUDITED" in err and "network error" in err
    monkeypatch.setenv("ORZ_AUDIT_REQUIRE_SERVICE", "1")
    assert pip_audit_gate.main() == 1
