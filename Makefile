# Everything a newcomer needs starts here: `make run` and `make test` work from a fresh clone
# with only Python 3.11+ and make on the machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test lint bench sandbox clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEVSTAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

## run: start the service on http://127.0.0.1:8000 wired to the local sandbox (SQLite store in ./data,
## the owner emails in ./data/mail); move the ports with e.g. `make run ARGS="--port 9000 --smtp-port 9104"`
run: $(STAMP)
	$(BIN)/leak-responder dev $(ARGS)

## test: the whole suite (unit and integration); installs PostgreSQL's server binaries and Chromium
## (with its chromedriver, for the console's browser tests) first if missing
test: $(DEVSTAMP)
	scripts/ensure-postgres
	scripts/ensure-chromium
	$(BIN)/python -m pytest

## lint: ruff over the code, the tests and the benchmarks; mypy (strict) over the service
lint: $(DEVSTAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy

## bench: the benchmarks of BENCHMARKS.md (`make bench ARGS=ack` for one), ratios against a baseline in the same run
bench: $(DEVSTAMP)
	scripts/ensure-wrk
	scripts/ensure-postgres
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
