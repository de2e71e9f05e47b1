"""Run pip-audit on the installed virtualenv and decide pass/fail, telling "no vulnerabilities" apart
from "nothing could be checked".

pip-audit asks a vulnerability service about every installed distribution. When that service cannot
be reached it does not fail: each package is reported as "not found ... could not be audited" and the
run still ends with "No known vulnerabilities found". Taken at face value that is a false green, so
this gate first audits a canary, a release with published advisories (jinja2 2.4.1). If the service
reports them, it answers, and the environment's audit counts: any vulnerability fails the build. If
it does not, the service is unreachable from this machine (the sandbox's registry mirror serves
packages but no vulnerability data, and the OSV service is not reachable): the gate says so loudly
and passes, because the network, not the code, is at fault. ORZ_AUDIT_REQUIRE_SERVICE=1 (set in
GitHub Actions, which can reach the service) turns that case into a failure too.

Known advisories that do not apply can be listed in hack/pip-audit-ignore.txt as `ID  reason`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE_FILE = ROOT / "hack" / "pip-audit-ignore.txt"
# A release with several published advisories (sandbox escapes, cache file permissions).
CANARY = "jinja2==2.4.1"
SERVICES = ("pypi", "osv")
NETWORK_ERRORS = ("ConnectionError", "NameResolutionError", "Max retries exceeded", "timed out",
                  "Temporary failure in name resolution", "503 Server Error", "502 Server Error")
TIMEOUT_S = 600


@dataclass
class Audit:
    ok: bool  # pip-audit produced a report
    vulnerable: dict[str, list[str]] = field(default_factory=dict)  # "name version" -> advisory ids
    audited: int = 0
    unaudited: list[str] = field(default_factory=list)
    error: str = ""


def pip_audit_bin() -> str:
    return str(Path(sys.executable).with_name("pip-audit"))


def ignored_ids() -> list[str]:
    if not IGNORE_FILE.exists():
        return []
    ids = []
    for line in IGNORE_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line.split()[0])
    return ids


def run_audit(service: str, extra: list[str]) -> Audit:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [pip_audit_bin(), "--vulnerability-service", service, "--format", "json", "--output", str(out),
               "--progress-spinner", "off", *extra]
        for vuln_id in ignored_ids():
            cmd += ["--ignore-vuln", vuln_id]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=ROOT)
        if not out.exists() or not out.read_text().strip():
            return Audit(ok=False, error=(proc.stderr or proc.stdout).strip()[-2000:])
        report = json.loads(out.read_text())
    audit = Audit(ok=True)
    for dep in report.get("dependencies", []):
        label = f"{dep['name']} {dep.get('version', '?')}"
        if "skip_reason" in dep:
            audit.unaudited.append(label)
            continue
        audit.audited += 1
        if dep.get("vulns"):
            audit.vulnerable[label] = [v["id"] for v in dep["vulns"]]
    return audit


def probe(service: str) -> tuple[str, str]:
    """Audit the canary: "answers" when the service reports its advisories, "unreachable" when the
    network keeps the answer from us, "broken" for anything else (which must fail the gate)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(CANARY + "\n")
    try:
        audit = run_audit(service, ["--no-deps", "--disable-pip", "--requirement", req.name])
    finally:
        os.unlink(req.name)
    if audit.vulnerable:
        return "answers", ""
    if not audit.ok:
        if any(marker in audit.error for marker in NETWORK_ERRORS):
            return "unreachable", "network error: " + _last_line(audit.error)
        return "broken", _last_line(audit.error)
    if audit.unaudited:
        return "unreachable", "it has no advisory data for any package here (every one 'not found')"
    return "broken", f"no advisory reported for {CANARY}, which has published ones"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def main() -> int:
    require_service = os.environ.get("ORZ_AUDIT_REQUIRE_SERVICE", "") not in ("", "0", "false")
    reasons = []
    for service in SERVICES:
        verdict, why = probe(service)
        if verdict == "broken":
            print(f"pip-audit ({service}) does not work: {why}", file=sys.stderr)
            return 1
        if verdict == "unreachable":
            reasons.append(f"{service}: {why}")
            continue
        audit = run_audit(service, ["--skip-editable"])
        if not audit.ok:
            print(f"pip-audit ({service}) failed:\n{audit.error}", file=sys.stderr)
            return 1
        if audit.vulnerable:
            print(f"pip-audit ({service}): vulnerable packages in the environment:", file=sys.stderr)
            for label, ids in sorted(audit.vulnerable.items()):
                print(f"  {label}: {', '.join(ids)}", file=sys.stderr)
            print("Upgrade them, or list an advisory that does not apply in hack/pip-audit-ignore.txt "
                  "with the reason.", file=sys.stderr)
            return 1
        print(f"pip-audit ({service}): {audit.audited} packages audited, no known vulnerabilities"
              + (f"; not on the index, so not audited: {', '.join(audit.unaudited)}" if audit.unaudited else ""))
        return 0
    print("pip-audit: NOT AUDITED - no vulnerability service answers from this machine:", file=sys.stderr)
    for reason in reasons:
        print(f"  {reason}", file=sys.stderr)
    if require_service:
        print("ORZ_AUDIT_REQUIRE_SERVICE is set: failing.", file=sys.stderr)
        return 1
    print("Not failing the build for this network reason alone (set ORZ_AUDIT_REQUIRE_SERVICE=1 to fail); "
          "the GitHub Actions security job requires the service.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
