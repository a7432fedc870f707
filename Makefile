# Quickstart: `make serve` and `make test` install whatever is missing first.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: serve test setup deps docker image lint typecheck unit e2e bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

deps: $(STAMP)

docker:
	@bash scripts/ensure-system.sh

image: docker
	@bash sandboxes/docker/build.sh

setup: deps image

serve: setup
	@bash scripts/serve.sh

lint: deps
	$(BIN)/ruff check critique_local tests bench

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest -m "not e2e" -q

e2e: setup
	$(BIN)/pytest -m e2e -q

test: setup lint typecheck
	$(BIN)/pytest -q -rs

# every bench/*.py but the _helpers, each with its defaults (make test runs them with --smoke)
bench: setup
	@command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null || \
		echo "wrk unavailable: polling load falls back to the (slower) httpx client"
	@for b in $(sort $(filter-out bench/_%,$(wildcard bench/*.py))); do \
		echo "==> $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
