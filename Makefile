# solapi-gateway — every command does its own set-up on a fresh machine (python3 only).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test setup lint unit e2e bench soak lock clean docs dist

run: $(STAMP)  ## the demo: sandbox upstream + gateway, prints curl lines
	$(BIN)/solapi-gateway demo

test: $(STAMP) lint  ## every test (unit, property, end-to-end)
	$(BIN)/pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

e2e: $(STAMP)
	$(BIN)/pytest -q -m e2e

bench: $(STAMP)  ## load benchmark against baselines (about 25 minutes); writes docs/performance.md
	@command -v wrk >/dev/null && command -v nginx >/dev/null && command -v redis-server >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq wrk nginx-light redis-server; }
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e '.[test,bench]'
	$(BIN)/pytest -q -p no:randomly bench/test_micro.py --benchmark-only --benchmark-columns=min,median,mean,rounds --benchmark-json=$(VENV)/bench-micro.json
	$(BIN)/python bench/run.py --micro-json $(VENV)/bench-micro.json
	$(BIN)/python bench/limits.py  # rate limits and shared state; writes docs/state.md
	$(BIN)/python bench/tls.py

soak: $(STAMP)  ## 60 s under 200 clients: no errors, one salt per request, flat RSS; writes docs/soak.md
	$(BIN)/python bench/soak.py

docs: $(STAMP)  ## regenerate the key tables of docs/config.md from the schema
	$(BIN)/python -m gateway.report docs/config.md

dist: $(STAMP)  ## the wheel and sdist of this version, into dist/ (python -m build)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

lock:  ## re-pin every dependency after changing pyproject.toml
	rm -rf /tmp/sgw-lock && $(PYTHON) -m venv /tmp/sgw-lock
	/tmp/sgw-lock/bin/pip install -q -e '.[test,bench]'
	/tmp/sgw-lock/bin/pip freeze --exclude-editable | grep -v '^solapi-gateway' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis dist
