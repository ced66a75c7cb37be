# kktd — set-up, run, test, benchmark. Everything a target needs is installed by the target itself.
# The venv is built from Debian's interpreter, not the first python3 on PATH: a service user must be
# able to execute it (an interpreter under /root is not reachable for the unprivileged kktd user).
PYTHON      ?= /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
RUN_STAMP   := $(VENV)/.installed-run
STAMP       := $(VENV)/.installed
STATE_DIR   ?= $(CURDIR)/state
PYTEST_ARGS ?=
BENCH_ARGS  ?=

# System packages: what `make run` needs, and what the test suite and the benchmark need on top.
# python3-yaml: the build step that turns kktd/openapi.yaml into the kktd/openapi.json kktd serves.
# prometheus: promtool checks and unit-tests the shipped alert rules; the server scrapes kktd in a test.
RUN_PACKAGES   := python3-venv python3-yaml
# gcc and libc6-dev build bench/slowsync.c, the slow-flush (SD card) shim that the bench and its test use.
TEST_PACKAGES  := $(RUN_PACKAGES) sqlite3 fuse3 systemd util-linux wrk prometheus gcc libc6-dev
BENCH_PACKAGES := $(RUN_PACKAGES) wrk gcc libc6-dev
SLOWSYNC       := build/slowsync.so
OPENAPI_JSON   := kktd/openapi.json
# The fast tier (`make check`): unit and in-process tests. Tests that start kktd or a mock as a process, boot
# systemd, cut power or build the package are the rest of `make test` (tests/README.md lists both tiers).
CHECK_PYTEST   := -m "not process and not systemd and not powercut and not slow" -p no:cacheprovider
# `make deb` (dpkg-buildpackage; the build dependencies of packaging/debian/control) and lintian, which the
# package tests run on what they build.
DEB_PACKAGES   := dpkg-dev debhelper python3 python3-venv python3-pip python3-setuptools python3-wheel lintian

.PHONY: slowsync
.PHONY: run ctl check lint test fuzz typecheck bench powercut verify-units deb clean distclean prereqs-run \
        prereqs-test prereqs-bench prereqs-deb

define ensure_packages
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "error: missing system packages:$$missing (as root: apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	fi
endef

prereqs-run:
	$(call ensure_packages,$(RUN_PACKAGES))

prereqs-test:
	$(call ensure_packages,$(TEST_PACKAGES))

prereqs-bench:
	$(call ensure_packages,$(BENCH_PACKAGES))

prereqs-deb:
	$(call ensure_packages,$(DEB_PACKAGES))

# `make run` installs what the daemon needs; the test and benchmark tools come with the targets that use them.
$(RUN_STAMP): setup.cfg pyproject.toml constraints.txt $(OPENAPI_JSON) | prereqs-run
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt -e .
	touch $@

$(STAMP): $(RUN_STAMP)
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	touch $@

# Built with Debian's python3 and python3-yaml (RUN_PACKAGES), so kktd itself needs no YAML parser.
$(OPENAPI_JSON): kktd/openapi.yaml packaging/openapi_json.py | prereqs-run
	$(PYTHON) packaging/openapi_json.py kktd/openapi.yaml $@

run: $(RUN_STAMP)
	mkdir -p $(STATE_DIR)
	$(VENV)/bin/kktd serve --embedded-mock --db $(STATE_DIR)/buffer.db

# The CLI against the daemon `make run` started (the same KKTD_LISTEN): make ctl ARGS='receipt ID'.
ARGS ?= status
ctl: $(RUN_STAMP)
	$(VENV)/bin/kktd $(ARGS)

# The fast tier a developer runs on every change: lint and format check, types, unit and in-process tests.
check: $(STAMP) prereqs-test lint typecheck
	KKTD_FUZZ_QUICK=1 $(VPY) -m pytest -q -n auto $(CHECK_PYTEST) $(PYTEST_ARGS)

# ruff (ruff.toml): lint, then the format check (`.venv/bin/ruff format` applies it).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite, what CI runs (.ci/run).
test: $(STAMP) prereqs-test prereqs-deb lint verify-units typecheck $(SLOWSYNC)
	$(VPY) -m pytest $(PYTEST_ARGS)

# The long fuzz run: every fuzzer of the suite with KKTD_FUZZ_EXAMPLES cases per test (make test runs a
# fixed, derandomized few thousand). Randomized; a failure prints its seed, KKTD_FUZZ_SEED=N repeats it.
FUZZ_TESTS        := tests/test_fuzz_receipt.py tests/test_fuzz_live.py tests/test_schemathesis.py
KKTD_FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP) prereqs-test
	KKTD_FUZZ_EXAMPLES=$(KKTD_FUZZ_EXAMPLES) $(VPY) -m pytest $(FUZZ_TESTS) \
	  $(if $(KKTD_FUZZ_SEED),--hypothesis-seed=$(KKTD_FUZZ_SEED)) $(PYTEST_ARGS)

# The file list is setup.cfg's [mypy] files: kktd, kktd_mocks, tests, bench.
typecheck: $(STAMP)
	$(VPY) -m mypy

verify-units: $(STAMP) prereqs-test
	systemd/verify-units.sh

powercut: $(STAMP) prereqs-test
	KKTD_POWERCUT_CYCLES=$${KKTD_POWERCUT_CYCLES:-200} $(VPY) -m pytest tests/powercut $(PYTEST_ARGS)

bench: $(STAMP) prereqs-bench $(SLOWSYNC)
	$(VPY) bench/run.py $(BENCH_ARGS)

# The slow-flush shim (LD_PRELOAD): every fsync/fdatasync waits KKTD_SLOW_FSYNC_MS first (see the source).
slowsync: $(SLOWSYNC)

$(SLOWSYNC): bench/slowsync.c | prereqs-bench
	mkdir -p $(dir $@)
	gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o $@ $< -ldl

deb: prereqs-deb
	packaging/build-deb.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache packaging/out bench/results $(OPENAPI_JSON)
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(STATE_DIR)
