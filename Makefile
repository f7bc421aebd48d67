# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,serve,train,triton,dev
IMAGES ?= tests/data/cifar10-sample/train
WORKDIR ?= demo-run
BUDGET ?= 180
PORT ?= 8000

.PHONY: demo test venv sysdeps lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

# System packages the tests use: headless Chromium for the page test, docker-compose to
# validate the compose file offline. Installed only when missing and only as root.
sysdeps:
	@if [ "$$(id -u)" = 0 ] && ! { command -v chromedriver >/dev/null && command -v docker-compose >/dev/null; }; then \
	  echo "installing chromium, chromium-driver, docker-compose (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver docker-compose >/dev/null \
	  || echo "sysdeps: apt install failed; the browser and compose tests will skip"; \
	fi

test: venv sysdeps
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/simsearch demo --images '$(IMAGES)' --workdir '$(WORKDIR)' --budget $(BUDGET) --port $(PORT)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(WORKDIR)
