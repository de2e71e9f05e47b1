#!/usr/bin/env bash
# A real cluster for people with Docker: kind + our images + the chart, then tests/e2e (and
# hack/smoke.py when present) against it.
#
#   hack/e2e-kind.sh          up, test, down (the cluster is deleted even when a test fails)
#   hack/e2e-kind.sh up       create the cluster, build and load images, install the chart; keep it
#   hack/e2e-kind.sh test     run tests/e2e (and the smoke test) against a cluster made by `up`
#   hack/e2e-kind.sh down     delete the cluster
#
# Environment: KIND_CLUSTER (orz-e2e), RELEASE (orz), RELEASE_NS (orz-system), PYTHON (.venv/bin/python
# or python3), KEEP_CLUSTER=1 to keep the cluster after a full run.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${KIND_CLUSTER:-orz-e2e}"
release="${RELEASE:-orz}"
release_ns="${RELEASE_NS:-orz-system}"
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
helm=".cache/bin/helm"
kubeconfig=".cache/kind-${cluster}.kubeconfig"
api_image="orzbob-cloud:e2e"
runner_image="orzbob-cloud-runner:e2e"

log() { printf '==> %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { echo "e2e-kind: needs $1 on PATH" >&2; exit 2; }; }

up() {
  need docker; need kind; need kubectl
  PYTHON="$python" hack/get-helm.sh "$helm"
  if ! kind get clusters | grep -qx "$cluster"; then
    log "creating kind cluster $cluster"
    kind create cluster --name "$cluster" --wait 180s
  fi
  mkdir -p .cache
  kind get kubeconfig --name "$cluster" >"$kubeconfig"
  log "building images"
  docker build -f docker/api.Dockerfile -t "$api_image" .
  docker build -f docker/runner.Dockerfile -t "$runner_image" .
  log "loading images into kind"
  kind load docker-image --name "$cluster" "$api_image" "$runner_image"
  log "installing the chart"
  KUBECONFIG="$kubeconfig" "$helm" upgrade --install "$release" charts/orzbob-cloud \
    --namespace "$release_ns" --create-namespace -f hack/kind-values.yaml --wait --timeout 10m
}

run_tests() {
  log "running tests/e2e"
  # tests/e2e makes (and deletes) a namespace of its own: in the chart's sessions namespace the
  # scheduler's reconciler would stop the test's Pods as orphans (the API has no rows for them).
  KUBECONFIG="$kubeconfig" ORZ_E2E=1 ORZ_E2E_RUNNER_IMAGE="$runner_image" \
    ORZ_E2E_API_URL="http://${release}-orzbob-cloud-api.${release_ns}.svc:8080" \
    "$python" -m pytest -q -rs tests/e2e
  if [[ -f hack/smoke.py ]]; then
    log "running hack/smoke.py through port-forwards"
    KUBECONFIG="$kubeconfig" kubectl -n "$release_ns" port-forward "svc/${release}-orzbob-cloud-api" 18080:8080 \
      >/dev/null 2>&1 &
    local pf_api=$!
    KUBECONFIG="$kubeconfig" kubectl -n "$release_ns" port-forward "svc/${release}-orzbob-cloud-gateway" 12222:22 \
      >/dev/null 2>&1 &
    local pf_gw=$!
    sleep 3
    local rc=0
    ORZBOB_API_URL=http://127.0.0.1:18080 ORZ_SMOKE_SSH_HOST=127.0.0.1 ORZ_SMOKE_SSH_PORT=12222 \
      "$python" hack/smoke.py || rc=$?
    kill "$pf_api" "$pf_gw" 2>/dev/null || true
    return "$rc"
  fi
}

down() {
  need kind
  log "deleting kind cluster $cluster"
  kind delete cluster --name "$cluster"
  rm -f "$kubeconfig"
}

case "${1:-all}" in
  up) up ;;
  test) run_tests ;;
  down) down ;;
  all)
    if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then trap down EXIT; fi
    up
    run_tests
    ;;
  *) echo "usage: $0 [up|test|down|all]" >&2; exit 2 ;;
esac
