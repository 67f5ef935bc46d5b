# Two entry points for people (see README): `make demo` and `make test`. Everything else is plumbing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint pytest plugin bench stop clean help

help:
	@echo "make demo   - start a local Kafka, ingest, enrich and rule evaluation; send sample GitLab events; show alerts"
	@echo "make test   - lint (ruff, mypy) and run the whole test suite against a real local Kafka"
	@echo "make plugin - build the Falco plugin shared library (build/plugin/libgitlabkafka.so)"
	@echo "make bench  - run every benchmark under bench/"
	@echo "make stop   - stop whatever the demo and the local Kafka left running"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	@touch $@

demo: $(STAMP)
	$(BIN)/falco-gitlab demo

test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy falco_gitlab ingest enrich falco_source replay

pytest: $(STAMP)
	$(BIN)/pytest

plugin: $(STAMP)
	$(BIN)/falco-gitlab plugin build

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

stop:
	-$(BIN)/falco-gitlab demo --stop
	-$(BIN)/falco-gitlab kafka stop

clean: stop
	rm -rf build .kafka .pytest_cache .mypy_cache .ruff_cache
