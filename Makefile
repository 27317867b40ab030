# `make test` and `make demo` each create .venv when missing and install the project first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data/lfw_112_centercrop)
PYTEST_ARGS ?=

.PHONY: test demo install clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh "$(VENV)"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	MINUSFED_DATA="$(DATA)" $(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	MINUSFED_DATA="$(DATA)" $(PY) -m minusface.demo --data "$(DATA)"

clean:
	rm -rf $(VENV) .pytest_cache
