# Soak and chaos (hack/soak.py): users on the whole platform, faults on a schedule, a report with figures.
# The main Makefile includes this file. SOAK_ARGS passes more flags (e.g. --database postgres --users 5).

SOAK_S ?= 1800
SOAK_REHEARSAL_S ?= 150
SOAK_REHEARSAL_ACCESS ?= direct
SOAK_ARGS ?=

.PHONY: soak soak-ci soak-rehearsal soak-setup

soak-setup:
	@ORZ_SETUP_EXTRAS=soak ./hack/setup.sh

## soak: SOAK_S seconds (default 1800) of 20 simulated users and every fault; report under the data dir
soak: soak-setup
	.venv/bin/python hack/soak.py --seconds $(SOAK_S) $(SOAK_ARGS)

## soak-ci: the CI profile (120 s, 3 ssh users, one REST and one browser user, every fault)
soak-ci: soak-setup
	.venv/bin/python hack/soak.py --profile ci $(SOAK_ARGS)

## soak-rehearsal: the CI profile on Kubernetes: the chart helm-installed on the rehearsal's one-node
## cluster (rehearsal/; root, one per machine), the same users, the faults Kubernetes has (SOAK_REHEARSAL_S s).
## SOAK_REHEARSAL_ACCESS=api (or SOAK_ARGS='--access api') has users reach it only by port-forward, as on kind
soak-rehearsal: soak-setup $(HELM)
	.venv/bin/python hack/soak.py --target rehearsal --profile ci --seconds $(SOAK_REHEARSAL_S) --helm $(HELM) \
		--access $(SOAK_REHEARSAL_ACCESS) $(SOAK_ARGS)
