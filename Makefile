# Orzbob Cloud developer tasks. `make dev` runs the platform; `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv/bin
# The suite runs on PYTEST_WORKERS pytest-xdist workers (most tests wait on ssh, tmux, git and servers, so
# 4 beat the 2 cores' `-n auto`); `make test PYTEST_WORKERS=0` runs it in one process, in order. Each test
# file runs on one worker (--dist loadfile): a module-scoped fixture (a platform, a browser, a rendered chart)
# starts once, as in a serial run. (--dist loadgroup's xdist_group marks do nothing with pytest 9.)
PYTEST_WORKERS ?= 4
PYTEST_ARGS ?=

.PHONY: setup dev test lint fmt bench bench-gateway bench-real-path clean

setup:
	@./hack/setup.sh

dev: setup  ## run the whole platform on the embedded default (SQLite + local sessions)
	$(VENV)/orz server $(ARGS)

test: setup  ## the whole test suite (SQLite and, when reachable, PostgreSQL)
	$(VENV)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup  ## ruff, import contracts, then actionlint, bandit and pip-audit (hack/lint.sh)
	$(VENV)/ruff check .
	$(VENV)/lint-imports
	./hack/lint.sh

bench: setup  ## API load on PostgreSQL (the production database) and on SQLite (the embedded default)
	$(VENV)/python bench/api.py --database postgres
	$(VENV)/python bench/api.py --database sqlite

bench-gateway: setup  ## the SSH gateway against direct OpenSSH (needs sshd: apt-get install openssh-server)
	$(VENV)/python -m bench.gateway

bench-real-path: setup  ## ssh -> gateway -> runner endpoint -> tmux against ssh -> sshd -> tmux (needs sshd, tmux)
	$(VENV)/python -m bench.real_path

clean:
	rm -rf .venv .pytest_cache .ruff_cache build *.egg-info

-include mk/*.mk
