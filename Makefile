# megatron-stag: `make quickstart` (tiny StagFormer pretraining + staggered generation on CPU) and
# `make test`. Both create .venv with python3.12 on first use and reinstall only when setup.py or
# constraints.txt change.

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# python3.12: on PATH, or from pyenv's versions folder when its shim does not expose it.
PY312 := $(shell for c in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	$$c -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $$c && break; done)

.PHONY: venv quickstart lint test test-slow clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -n "$(PY312)" || { echo "python3.12 not found: install Python 3.12 (megatron-core 0.19 needs it)"; exit 1; }
	@test -x $(BIN)/python || $(PY312) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,deepspeed,eval]'
	@touch $@

quickstart: $(STAMP)
	$(BIN)/megatron-stag quickstart --out runs/quickstart

lint: $(STAMP)
	$(BIN)/ruff check megatron_stag tests setup.py

test: lint
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --run-slow tests

clean:
	rm -rf $(VENV) runs .pytest_cache
