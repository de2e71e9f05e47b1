#!/usr/bin/env bash
# A real cluster for people with Docker: kind + our images, then the rehearsal's user steps (rehearsal/
# steps.py: helm install, a session from a git fixture, ssh through each gateway replica, scp, -L, web
# attach, stop and wake, kill -9 of replicas, the scheduler lease, helm upgrade and rollback, kill) on it,
# then tests/e2e. Users reach the cluster through port-forwards (the steps start them), as on any cluster
# this machine has no route to.
#
#   hack/e2e-kind.sh          up, test, down (the cluster is deleted even when a step fails)
#   hack/e2e-kind.sh up       create the cluster, build and load the images; keep it
#   hack/e2e-kind.sh test     the steps and tests/e2e against a cluster made by `up`
#   hack/e2e-kind.sh down     delete the cluster
#
# Environment: KIND_CLUSTER (orz-e2e), PYTHON (.venv/bin/python or python3), PROFILE (full or ci),
# KEEP_CLUSTER=1 to keep the cluster after a full run.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${KIND_CLUSTER:-orz-e2e}"
profile="${PROFILE:-full}"
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
helm=".cache/bin/helm"
kubeconfig=".cache/kind-${cluster}.kubeconfig"
# Tags as hack/kind-values.yaml names them; the next release's tag is what the upgrade step sets.
api_image="orzbob-cloud:e2e"
next_image="orzbob-cloud:rehearsal-next"
runner_image="orzbob-cloud-runner:e2e"

log() { printf '==> %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { echo "e2e-kind: needs $1 on PATH" >&2; exit 2; }; }

up() {
  need docker; need kind
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
  # The next release: this checkout plus one expand-only migration (rehearsal/versions.py).
  local next_context
  next_context="$("$python" -m rehearsal.versions .cache/next-release-context)"
  docker build -f docker/api.Dockerfile -t "$next_image" "$next_context"
  log "loading images into kind"
  kind load docker-image --name "$cluster" "$api_image" "$next_image" "$runner_image"
}

run_tests() {
  log "the user steps on kind (rehearsal/steps.py, profile $profile)"
  local rc=0
  # The steps install the release themselves: a kept cluster from an earlier run gives it back first.
  KUBECONFIG="$kubeconfig" "$helm" uninstall orz --namespace orz-system --ignore-not-found --wait >/dev/null
  "$python" -m rehearsal --kubeconfig "$kubeconfig" --values hack/kind-values.yaml --helm "$helm" \
    --profile "$profile" --workdir .cache/e2e-kind || rc=$?
  log "running tests/e2e"
  # tests/e2e makes (and deletes) a namespace of its own: in the chart's sessions namespace the
  # scheduler's reconciler would stop the test's Pods as orphans (the API has no rows for them).
  KUBECONFIG="$kubeconfig" ORZ_E2E=1 ORZ_E2E_RUNNER_IMAGE="$runner_image" \
    ORZ_E2E_API_URL="http://orz-orzbob-cloud-api.orz-system.svc:8080" \
    "$python" -m pytest -q -rs tests/e2e || rc=$?
  return "$rc"
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
