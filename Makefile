# authd's developer commands. `make test` is the test command (CI runs it through .ci/run).
#
#   make test    system packages (nginx, wrk, systemd's tools, faketime) if missing, the venv,
#                then every test, the packages on a booted Debian 12 included (root; see tests/system)
#   make lint    ruff check and mypy
#   make demo    authd behind a private nginx on loopback, with a few requests explained
#   make soak    authd behind nginx at 80% of its capacity for 10 minutes while the key endpoint
#                flaps; every answer checked (not in CI; SOAK_ARGS="--duration 60" for a short run)
#   make bench   authd's speed through real nginx with wrk, as ratios to a zero-cost auth server
#                measured in the same run (~7 minutes; BENCH_ARGS="--smoke" for a quick check)
#   make snippets  re-render nginx/*.conf, the snippets for the default configuration
#   make clean   remove the venv and caches

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's metadata changes; otherwise `make venv` does nothing.
STAMP := $(VENV)/.installed-from-pyproject
NGINX := /usr/sbin/nginx

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
	command -v systemd-socket-activate >/dev/null || missing="$$missing systemd"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	if [ -z "$$missing" ]; then echo "deps: nginx, wrk, systemd-socket-activate and faketime are installed"; exit 0; fi; \
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

# The method and the report: devtools/soak.py (--help for its options).
.PHONY: soak
soak: deps venv
	$(BIN)/python devtools/soak.py $(SOAK_ARGS)

# The method and the report: devtools/bench.py (--help for its options).
.PHONY: bench
bench: deps venv
	$(BIN)/python devtools/bench.py $(BENCH_ARGS)

# Rendered from the built-in defaults, never from a config file that happens to be installed.
snippets: venv
	$(BIN)/authd nginx-snippet --config /dev/null --directory nginx

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# make fuzz: the atheris fuzz target of the token path (fuzz/fuzz_auth.py), for FUZZ_SECONDS
# (an hour by default; 0 runs until stopped). Seeds: fuzz/corpus; what the fuzzer finds goes to
# fuzz/corpus-local, crashes to fuzz/artifacts/ (neither is committed). CI runs a short run
# (tests/unit/test_fuzz.py). More libFuzzer flags: make fuzz FUZZ_ARGS="-fork=4".
FUZZ_SECONDS ?= 3600
.PHONY: fuzz
fuzz: venv
	mkdir -p fuzz/corpus-local fuzz/artifacts
	$(BIN)/python fuzz/fuzz_auth.py fuzz/corpus-local fuzz/corpus \
	    -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/artifacts/ $(FUZZ_ARGS)

# ---------------------------------------------------------------------------------------
# Packages: `make packages` builds dist/authd_<version>-<DEB_REVISION>_<arch>.deb and
# dist/authd-<version>-<RPM_RELEASE>.x86_64.rpm (version: authd.__version__), checks them
# with lintian and rpmlint, and installs the build tools first if any is missing.
#   make deb DEB_REVISION=2 DIST=build/upgrade   # another revision, elsewhere
#   make system-test   # the packages on a booted Debian 12 (debootstrap + systemd-nspawn)
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' authd/__init__.py)
DEB_REVISION ?= 1
RPM_RELEASE ?= 1
DIST ?= dist
PKG := build/pkg
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
RPM_ARCH := $(shell uname -m)
DEB_FILE := $(DIST)/authd_$(VERSION)-$(DEB_REVISION)_$(DEB_ARCH).deb
RPM_FILE := $(DIST)/authd-$(VERSION)-$(RPM_RELEASE).$(RPM_ARCH).rpm
# Everything a package is made of: a change to any of these rebuilds it.
PKG_INPUTS := pyproject.toml README.md LICENSE CHANGELOG.md \
    $(shell find authd systemd packaging -type f -not -path '*/__pycache__/*' 2>/dev/null)
PKG_TOOLS := dpkg-buildpackage:dpkg-dev dh:debhelper lintian:lintian rpmbuild:rpm \
    rpmlint:rpmlint python3.11:python3.11
SYSTEM_TEST_TOOLS := debootstrap:debootstrap systemd-nspawn:systemd-container \
    systemd-analyze:systemd nsenter:util-linux

.PHONY: packages deb rpm packaging-deps system-test-deps system-test

packages: $(DEB_FILE) $(RPM_FILE)
deb: $(DEB_FILE)
rpm: $(RPM_FILE)

# Install what is missing, and only that (CI starts from a fresh machine). A tool is
# COMMAND:DEBIAN-PACKAGE; python3.11-venv is checked by importing ensurepip.
define install_missing
	@missing=""; \
	for t in $(1); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	$(if $(3),/usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null || missing="$$missing $(3)";) \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "$(2): missing$$missing; run 'make $(2)' as root" >&2; exit 1; fi; \
	echo "$(2): installing$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing
endef

packaging-deps:
	$(call install_missing,$(PKG_TOOLS),$@,python3.11-venv)

system-test-deps:
	$(call install_missing,$(SYSTEM_TEST_TOOLS),$@)

# A clean copy of the source tree (no venv, caches or earlier builds): what the packages are
# built from, and where setuptools may write its build/ and *.egg-info.
$(PKG)/src.stamp: $(PKG_INPUTS) | packaging-deps
	rm -rf $(PKG)/src && mkdir -p $(PKG)/src
	tar -c --exclude=__pycache__ --exclude='*.egg-info' $(PKG_INPUTS) | tar -x -C $(PKG)/src
	touch $@

# The one step that uses the network (PyPI): every wheel, for both packages.
$(PKG)/wheels.stamp: $(PKG)/src.stamp packaging/constraints.txt
	packaging/wheelhouse.sh $(PKG)/src $(PKG)
	touch $@

$(DEB_FILE): $(PKG)/wheels.stamp
	rm -rf $(PKG)/deb-$(DEB_REVISION) && mkdir -p $(PKG)/deb-$(DEB_REVISION) $(DIST)
	cp -a $(PKG)/src $(PKG)/deb-$(DEB_REVISION)/authd-$(VERSION)
	cp -a packaging/debian $(PKG)/deb-$(DEB_REVISION)/authd-$(VERSION)/debian
	packaging/debian-changelog.sh $(VERSION)-$(DEB_REVISION) \
	    > $(PKG)/deb-$(DEB_REVISION)/authd-$(VERSION)/debian/changelog
	cd $(PKG)/deb-$(DEB_REVISION)/authd-$(VERSION) && \
	    AUTHD_WHEELHOUSE=$(CURDIR)/$(PKG)/wheels dpkg-buildpackage -b -us -uc
	lintian --fail-on error --info $(PKG)/deb-$(DEB_REVISION)/authd_$(VERSION)-$(DEB_REVISION)_$(DEB_ARCH).deb
	cp $(PKG)/deb-$(DEB_REVISION)/authd_$(VERSION)-$(DEB_REVISION)_$(DEB_ARCH).deb $@

$(RPM_FILE): $(PKG)/wheels.stamp
	rm -rf $(PKG)/rpm && mkdir -p $(PKG)/rpm $(DIST)
	rpmbuild -bb --nodeps --quiet \
	    --define "_topdir $(CURDIR)/$(PKG)/rpm" --define "_sourcedir $(CURDIR)/$(PKG)/src" \
	    --define "authd_version $(VERSION)" --define "authd_release $(RPM_RELEASE)" \
	    --define "authd_wheelhouse $(CURDIR)/$(PKG)/wheels" packaging/rpm/authd.spec
	rpmlint --rpmlintrc packaging/rpm/authd.rpmlintrc \
	    $(PKG)/rpm/RPMS/$(RPM_ARCH)/authd-$(VERSION)-$(RPM_RELEASE).$(RPM_ARCH).rpm
	cp $(PKG)/rpm/RPMS/$(RPM_ARCH)/authd-$(VERSION)-$(RPM_RELEASE).$(RPM_ARCH).rpm $@

system-test: packages system-test-deps venv
	AUTHD_DIST=$(CURDIR)/$(DIST) $(BIN)/pytest -m system tests/system
