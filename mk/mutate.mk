# Mutation testing of the trust boundary with mutmut (config: [tool.mutmut] in pyproject.toml).
# `make mutate` mutates the credential checks (gateway/auth.py, api/auth.py, api/credentials/), the
# authorize and quota parts of InstanceService (api/instances/gateway_side.py, user_side.py and
# service_base.py), and runs for each mutant only the fast tests
# that reach the mutated function. It takes minutes, so it is not part of `make test` or CI.
# Survivors and why each one may live: tests/MUTATION.md.

MUTATE_TIMEOUT_S ?= 1500
# mutmut names a method's mutants <module>.xǁ<Class>ǁ<method>__mutmut_<n>; these are fnmatch patterns.
MUTATE_SCOPE := 'gateway.auth.*' 'api.auth.*' 'api.credentials.*' \
	'api.instances.gateway_side.*authorize__mutmut_*' 'api.instances.user_side.*quota__mutmut_*' \
	'api.instances.service_base.*quota__mutmut_*' 'api.instances.service_base.*_count_active__mutmut_*' \
	'api.instances.service_base.*_spend_jti__mutmut_*'

.PHONY: mutate mutate-report

## mutate: mutation testing of the trust boundary (minutes, see tests/MUTATION.md)
mutate: setup
	rm -rf mutants
	timeout $(MUTATE_TIMEOUT_S) $(VENV)/mutmut run $(MUTATE_SCOPE) > mutants.log 2>&1 \
		|| { tail -c 2000 mutants.log; exit 1; }
	@$(MAKE) --no-print-directory mutate-report

## mutate-report: per module, how many mutants were killed and which survived (after `make mutate`)
mutate-report:
	@$(VENV)/mutmut results --all true 2>/dev/null | $(VENV)/python hack/mutation_report.py $(MUTATE_SCOPE)
