# Two commands matter: `make run` (set up, then start the host) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test bench image install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/nanoclaw run

test: install
	$(BIN)/pytest

bench: install
	$(BIN)/python -m bench.run

# The agent image for the docker runtime (needs a Docker engine; see container/build.sh).
image: install
	$(BIN)/nanoclaw image build

clean:
	rm -rf $(VENV) build *.egg-info
