# Orzbob Cloud developer tasks. `make dev` runs the platform; `make test` runs the tests.
SHELL := /bin/bash
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup dev test lint fmt bench clean

setup:
	@./hack/setup.sh

dev: setup  ## run the whole platform on the embedded default (SQLite + local sessions)
	$(VENV)/orz server $(ARGS)

test: setup  ## the whole test suite (SQLite and, when reachable, PostgreSQL)
	$(VENV)/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/ruff check .
	$(VENV)/lint-imports

bench: setup
	$(VENV)/python bench/api.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache build *.egg-info

-include mk/*.mk
