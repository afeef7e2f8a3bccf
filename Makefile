# authd's developer commands. `make test` is the test command (CI runs it through .ci/run).
#
#   make test    system packages (nginx, wrk) if missing, the venv, then every test
#   make lint    ruff check and mypy
#   make demo    authd behind a private nginx on loopback, with a few requests explained
#   make snippets  re-render nginx/*.conf, the snippets for the default configuration
#   make clean   remove the venv and caches

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's metadata changes; otherwise `make venv` does nothing.
STAMP := $(VENV)/.installed-from-pyproject
NGINX := /usr/sbin/nginx
SNIPPET_CONTEXTS := http server location location-fastcgi location-uwsgi
RENDER_SNIPPET := import sys; from authd import config, snippets; \
    sys.stdout.write(snippets.render(sys.argv[1], config.Config()))

.PHONY: venv deps test lint demo snippets clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $@

# System packages: only what is missing, so a machine that has them needs no root and no network.
deps:
	@missing=""; \
	[ -x $(NGINX) ] || missing="$$missing nginx"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -z "$$missing" ]; then echo "deps: nginx and wrk are installed"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "deps: missing$$missing; run 'make deps' as root" >&2; exit 1; fi; \
	echo "deps: installing$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing

test: deps venv
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: deps venv
	$(BIN)/python devtools/demo.py

# Rendered from the built-in defaults, never from a config file that happens to be installed.
snippets: venv
	for context in $(SNIPPET_CONTEXTS); do \
	    $(BIN)/python -c '$(RENDER_SNIPPET)' $$context > nginx/authd-$$context.conf; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
