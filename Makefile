# SO8T /think pipeline. `make test` sets up .venv from nothing and runs the suite (what .ci/run calls).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export PYTHONUNBUFFERED := 1

.PHONY: test venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install-llama-cpp.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	scripts/install-llama-cpp.sh $(PY)
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest
