# `make test` and `make demo` each create .venv when missing and install the project first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data/lfw_112_centercrop)
PYTEST_ARGS ?=

.PHONY: test test-slow lint demo install clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh "$(VENV)"
	touch $@

install: $(VENV)/.installed

# The import layering (pyproject [tool.importlinter]) and ruff; both fail the build.
lint: $(VENV)/.installed
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .

# Fast suite (unit tests, direct ClientApp calls, an in-process federation), after lint.
test: lint
	MINUSFED_DATA="$(DATA)" $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# End-to-end runs (flwr run on Ray, a 2-node Ray cluster, a TLS deployment): minutes each; CI runs them.
test-slow: $(VENV)/.installed
	MINUSFED_DATA="$(DATA)" $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: $(VENV)/.installed
	MINUSFED_DATA="$(DATA)" $(PY) -m minusfed.demo --data "$(DATA)" $(if $(BUNDLE),--bundle "$(BUNDLE)")

clean:
	rm -rf $(VENV) .pytest_cache
