# The two commands of the README's quick start: `make demo` and `make test`.
# Both create .venv when missing and install the project into it (editable, with test extras).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format clean slurm-deps

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xray-pretrain demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint slurm-deps
	$(VENV)/bin/pytest -q --durations=15

# Debian's Slurm and munge for tests/test_slurm.py, which starts and stops the daemons itself (no
# systemd). Installed when missing; a failed install stops `make test`. Only a machine without apt-get
# goes on without them (those tests then skip and say why).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
slurm-deps:
	@if dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "WARNING: no apt-get: install $(SLURM_PACKAGES) yourself, or the Slurm tests skip"; exit 0; fi; \
	echo "installing $(SLURM_PACKAGES)"; \
	$(SUDO) apt-get update -q && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) \
		|| { echo "ERROR: could not install $(SLURM_PACKAGES) (needed by tests/test_slurm.py)" >&2; exit 1; }

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
