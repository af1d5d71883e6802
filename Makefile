# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup demo test lint sglang-env bench-env clean

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

# The `bench` extra (TRL, datasets, py-spy) for bench/e2e_*.py: not part of setup, since only
# the benchmarks against TRL need it. constraints.txt keeps torch at the CPU wheel.
bench-env: setup
	$(PY) -m pip --disable-pip-version-check install -q -c constraints.txt -e ".[bench]"

clean:
	rm -rf runs .pytest_cache .ruff_cache
