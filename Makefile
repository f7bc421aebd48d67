# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What each command installs (pyproject.toml's extras). The demo pretrains, exports, indexes and
# serves in one process on the CPU: nothing from `triton` (nvidia-pytriton, whose bundled
# tritonserver needs glibc >= 2.35) nor `dev`, so it installs on older Linux too.
DEMO_EXTRAS ?= cpu,serve,train
# The tests add the local Triton server, the test tools, Ray (`index build --ray`) and pyarrow
# (`index export` to Parquet).
TEST_EXTRAS ?= triton,dev,ray,export
IMAGES ?= tests/data/cifar10-sample/train
WORKDIR ?= demo-run
BUDGET ?= 180
PORT ?= 8000
INIT ?=

.PHONY: demo test venv sysdeps lint clean

# One stamp per command, so `make demo` then `make test` installs only the rest, and `make test`
# then `make demo` installs nothing more. Editing pyproject.toml redoes both.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(DEMO_EXTRAS)]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-demo
	$(PY) -m pip install -q -e '.[$(DEMO_EXTRAS),$(TEST_EXTRAS)]'
	touch $@

# a development environment: everything the tests use
venv: $(VENV)/.installed-test

# System packages the tests use: headless Chromium for the page test, docker-compose to
# validate the compose file offline. Installed only when missing and only as root; elsewhere
# this says what to install, because `make test` fails when any test cannot run.
SYSDEPS := chromium chromium-driver docker-compose
sysdeps:
	@if command -v chromedriver >/dev/null && command -v docker-compose >/dev/null \
	    && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing $(SYSDEPS) (apt)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS) >/dev/null; } \
	  || { echo "sysdeps: apt-get install $(SYSDEPS) failed; the browser and compose tests cannot run" >&2; exit 1; }; \
	else \
	  echo "sysdeps: install $(SYSDEPS) (e.g. sudo apt-get install $(SYSDEPS)); the browser and compose tests need them" >&2; \
	fi

# Lint first (seconds), then every test; FAIL_ON_SKIP makes a skipped test fail the run
# (tests/skipguard.py), so a green `make test` means every test ran.
test: $(VENV)/.installed-test sysdeps
	$(PY) -m ruff check .
	FAIL_ON_SKIP=1 $(PY) -m pytest -q

demo: $(VENV)/.installed-demo
	$(VENV)/bin/simsearch demo --images '$(IMAGES)' --workdir '$(WORKDIR)' --budget $(BUDGET) --port $(PORT) $(if $(INIT),--init '$(INIT)')

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(WORKDIR)
