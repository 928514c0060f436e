# Two commands matter: `make run` (set up, then start the host) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run demo test test-servers bench chaos image install lock clean

# Only hashed, locked packages: requirements.lock pins every package of the host and its
# tests (pip and setuptools too) with its sha256 hashes; wheels only, so nothing is built
# and no unpinned build tool is fetched. The project itself is local, so unhashed.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --only-binary :all: -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/nanoclaw run

# Everything offline, before you have a key: a fake model with canned answers beside the
# host, a dummy key, the web chat's address printed (nanoclaw/devtools/demo.py).
demo: install
	$(BIN)/python -m nanoclaw.devtools.demo

# The real servers the tests run offline that are not Debian packages: a Synapse homeserver
# in its own venv, from its own hashed lock (tests/servers/synapse.lock).
SYNAPSE_VENV ?= .venv-synapse
$(SYNAPSE_VENV)/bin/.installed: tests/servers/synapse.lock
	$(PYTHON) -m venv $(SYNAPSE_VENV)
	$(SYNAPSE_VENV)/bin/python -m pip install -q --require-hashes --only-binary :all: \
	  -r tests/servers/synapse.lock
	touch $@

test-servers: $(SYNAPSE_VENV)/bin/.installed

test: install test-servers
	$(BIN)/pytest

bench: install
	$(BIN)/python -m bench.run

# A soak under kill -9 (workers, agents, the whole host) against the fake model; writes
# bench/chaos.json. Options: make chaos CHAOS_ARGS='--runtime bwrap --messages 300'.
CHAOS_ARGS ?=
chaos: install
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

# The agent image for the docker runtime (needs a Docker engine; see container/build.sh).
# It also puts the pinned OpenCode CLI into the host's cache (from the npm registry,
# integrity-checked: nanoclaw/runtime/opencode.py), which the process and bwrap runtimes use.
# CJK_FONTS=1: Chinese, Japanese and Korean fonts in the image (NANOCLAW_CJK_FONTS)
image: install
	$(if $(CJK_FONTS),NANOCLAW_CJK_FONTS=$(CJK_FONTS) )$(BIN)/nanoclaw image build

# Recompile the locks after a change to pyproject.toml or container/requirements.in (the
# tests say "run make lock" until then): requirements.lock from pyproject.toml (runtime,
# [dev], build-system.requires, pip) and container/requirements.txt (the agent image)
# from container/requirements.in, for CPython 3.11 on x86_64 Linux. Existing pins are
# kept; `make lock LOCK_ARGS=--upgrade` (or `--upgrade-package NAME`) moves them. uv runs
# from a throwaway venv, never the project's.
LOCK_TOOLS ?= /tmp/nanoclaw-lock-tools
UV_VERSION ?= 0.13.9
LOCK_ARGS ?=
UV_COMPILE = $(LOCK_TOOLS)/bin/uv pip compile --no-config --quiet --generate-hashes --only-binary :all: \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command 'make lock' $(LOCK_ARGS)

# The first line of each lock: a digest of what it was compiled from. The same recipe is
# in tests/test_supply_chain.py (inputs_digest), which fails when the two disagree.
define LOCK_STAMP
import hashlib, json, sys, tomllib
def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
p = tomllib.load(open("pyproject.toml", "rb"))
host = digest({"build-system.requires": p["build-system"]["requires"],
               "dependencies": p["project"]["dependencies"],
               "optional-dependencies": p["project"].get("optional-dependencies", {})})
def listed(src):
    lines = (l.split("#")[0].strip() for l in open(src))
    return digest(sorted(l for l in lines if l))
for path, d, src in (("requirements.lock", host, "pyproject.toml"),
                     ("container/requirements.txt", listed("container/requirements.in"),
                      "container/requirements.in"),
                     ("tests/servers/synapse.lock", listed("tests/servers/synapse.in"),
                      "tests/servers/synapse.in")):
    text = open(path).read()
    open(path, "w").write(f"# inputs-sha256: {d} ({src}; after a change there: make lock)\n" + text)
endef

lock: export LOCK_STAMP := $(LOCK_STAMP)
lock:
	@$(LOCK_TOOLS)/bin/uv --version 2>/dev/null | grep -q '^uv $(UV_VERSION) ' \
	  || { $(PYTHON) -m venv --clear $(LOCK_TOOLS) \
	       && $(LOCK_TOOLS)/bin/python -m pip install -q 'uv==$(UV_VERSION)'; }
	$(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], "pip", sep="\n")' \
	  | $(UV_COMPILE) --extra dev -o requirements.lock pyproject.toml -
	$(UV_COMPILE) -o container/requirements.txt container/requirements.in
	$(UV_COMPILE) -o tests/servers/synapse.lock tests/servers/synapse.in
	$(PYTHON) -c "$$LOCK_STAMP"

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) build *.egg-info
