# Two commands on a fresh machine:
#   make demo   runs examples/ against the embedded simulator and prints the report
#   make test   runs the test suite
# Both create .venv and install the package (editable) with its test extras first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pytest examples -p no:cacheprovider -v --infmax-json results/examples.json

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .infmax results .pytest_cache
