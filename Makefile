# The two commands of the README's quick start: `make demo` and `make test`.
# Both create .venv when missing and install the project into it (editable, with test extras).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format clean system-deps

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP) system-deps
	$(VENV)/bin/xray-pretrain demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint system-deps
	$(VENV)/bin/pytest -q --durations=15

# Debian packages the tests and the demo use: Slurm and munge for tests/test_slurm.py (which starts and
# stops the daemons itself, no systemd) and a Java runtime for METEOR (report metrics). Installed when
# missing; a failed install stops the target. Only a machine without apt-get goes on without them
# (the Slurm tests then skip and METEOR is null, each saying why).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
JAVA_PACKAGE := openjdk-17-jre-headless
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
system-deps:
	@missing=""; dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1 || missing="$(SLURM_PACKAGES)"; \
	command -v java >/dev/null || missing="$$missing $(JAVA_PACKAGE)"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "WARNING: no apt-get: install$$missing yourself, or the tests that need them skip"; exit 0; fi; \
	echo "installing$$missing"; \
	$(SUDO) apt-get update -q && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
		|| { echo "ERROR: could not install$$missing" >&2; exit 1; }

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
