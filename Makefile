# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup demo test lint sglang-env bench clean

setup:
	@scripts/setup.sh

demo: setup
	@$(PY) -m physarum.demo

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

sglang-env:
	@scripts/sglang_env.sh

clean:
	rm -rf runs .pytest_cache .ruff_cache
