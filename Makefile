# Two commands on a fresh machine:
#   make demo   runs examples/ against the embedded simulator and prints the report
#   make test   runs the test suite
# Both create .venv and install the package (editable) with its test extras first;
# `make test` also installs the `integration` extra (CPU torch from this machine's disk,
# transformers[serving]: about a minute once) for the third-party server test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INTEGRATION_STAMP := $(VENV)/.installed-integration

.PHONY: demo test install clean chromium

$(STAMP): pyproject.toml setup.py pytest_infmax/_lane.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(INTEGRATION_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,integration]'
	touch $(INTEGRATION_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pytest examples -p no:cacheprovider -v --infmax-json results/examples.json \
		--infmax-plots on --infmax-html results/report.html --infmax-markdown results/summary.md

# Headless Chromium for tests/test_html_report.py's browser test (it is skipped, with
# the reason, where none can run): installed with apt-get when root or passwordless sudo.
CHROMIUM_BINS := chromium chromium-browser google-chrome google-chrome-stable

chromium:
	@for b in $(CHROMIUM_BINS); do command -v $$b >/dev/null 2>&1 && exit 0; done; \
	if ! command -v apt-get >/dev/null 2>&1; then sudo=none; \
	elif [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if [ "$$sudo" = none ]; then echo "make: no Chromium and no way to install it: the HTML browser test will be skipped"; \
	else $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null \
	|| echo "make: installing Chromium failed: the HTML browser test will be skipped"; fi

test: $(INTEGRATION_STAMP) chromium
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) .infmax results .pytest_cache
