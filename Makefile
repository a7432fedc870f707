# Quickstart: `make serve` and `make test` install whatever is missing first.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3
TEST_WORKERS ?= 2
UI := critique_local/ui
UI_STAMP := $(UI)/node_modules/.installed-stamp

.PHONY: serve test setup deps docker image lint typecheck unit e2e bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# the web page's pinned assets (diff, prismjs) from the npm registry; served by the Python process
$(UI_STAMP): $(UI)/package.json $(UI)/package-lock.json
	@command -v npm >/dev/null 2>&1 || bash scripts/ensure-system.sh
	@npm ci --prefix $(UI) --no-audit --no-fund --silent
	@touch $@

deps: $(STAMP) $(UI_STAMP)

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
	$(BIN)/pytest -m "not e2e" -q -n $(TEST_WORKERS) --dist loadfile

e2e: setup
	$(BIN)/pytest -m "e2e and not exclusive" -q -n $(TEST_WORKERS) --dist loadfile
	$(BIN)/pytest -m "e2e and exclusive" -q

# Test files run on $(TEST_WORKERS) workers, each with its own servers (servers on one host never
# touch each other's sandboxes); tests that change the host for everyone run alone, last.
test: setup lint typecheck
	$(BIN)/pytest -q -rs -n $(TEST_WORKERS) --dist loadfile -m "not exclusive"
	$(BIN)/pytest -q -rs -m exclusive

# every bench/*.py but the _helpers, each with its defaults (make test runs them with --smoke)
bench: setup
	@command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null || \
		echo "wrk unavailable: polling load falls back to the (slower) httpx client"
	@for b in $(sort $(filter-out bench/_%,$(wildcard bench/*.py))); do \
		echo "==> $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
