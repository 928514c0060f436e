"""Supply chain: a fresh clone installs only hashed, locked packages.

requirements.lock (the host and its tests) and container/requirements.txt (the agent
image) are compiled by `make lock` with a sha256 hash for every package; `make install`,
container/build.sh and the Dockerfile install them with --require-hashes. These checks
read files only (no network): every pin is hashed, every declared dependency is locked
at a version its specifier allows, and each lock was compiled from its inputs as they
are now (the digest on its first line; the recipe is the Makefile's LOCK_STAMP)."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
HOST_LOCK = ROOT / "requirements.lock"
IMAGE_IN = ROOT / "container" / "requirements.in"
IMAGE_LOCK = ROOT / "container" / "requirements.txt"
SYNAPSE_LOCK = ROOT / "tests" / "servers" / "synapse.lock"  # the matrix tests' homeserver
LOCKS = [HOST_LOCK, IMAGE_LOCK, SYNAPSE_LOCK]
SOURCES = {IMAGE_LOCK: IMAGE_IN, SYNAPSE_LOCK: ROOT / "tests" / "servers" / "synapse.in"}
# What the locks are compiled for (the Makefile's UV_COMPILE): CPython 3.11, x86_64 Linux.
ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
STALE = "{} was compiled from another {}: run make lock"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def inputs_digest(lock: Path) -> str:
    """What `make lock` writes on the lock's first line (the Makefile's LOCK_STAMP)."""
    if lock == HOST_LOCK:
        p = tomllib.loads((ROOT / "pyproject.toml").read_text())
        return _digest({"build-system.requires": p["build-system"]["requires"],
                        "dependencies": p["project"]["dependencies"],
                        "optional-dependencies": p["project"].get("optional-dependencies", {})})
    return _digest(sorted(declared(lock)))


def entries(lock: Path) -> list[str]:
    """The lock's requirements, each with its continuation lines joined."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def pins(lock: Path) -> dict[str, str]:
    out = {}
    for entry in entries(lock):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", entry)
        assert m, f"{lock.name}: not a pin: {entry[:80]}"
        out[canonicalize_name(m[1])] = m[2]
    return out


def declared(lock: Path) -> list[str]:
    if lock == HOST_LOCK:
        p = tomllib.loads((ROOT / "pyproject.toml").read_text())
        return [*p["build-system"]["requires"], *p["project"]["dependencies"],
                *(r for extra in p["project"].get("optional-dependencies", {}).values()
                  for r in extra), "pip"]
    lines = (line.split("#")[0].strip() for line in SOURCES[lock].read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_lock_is_compiled_from_the_inputs_as_they_are(lock):
    first = lock.read_text().splitlines()[0]
    src = "pyproject.toml" if lock == HOST_LOCK else SOURCES[lock].relative_to(ROOT).as_posix()
    assert first.startswith(f"# inputs-sha256: {inputs_digest(lock)} "), \
        STALE.format(lock.relative_to(ROOT), src)


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_pin_is_exact_and_hashed(lock):
    found = entries(lock)
    assert found
    for entry in found:
        assert re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;]+ ", entry), entry[:80]
        assert re.search(r"--hash=sha256:[0-9a-f]{64}\b", entry), \
            f"{lock.name}: no sha256 hash for {entry.split()[0]}"
        assert not re.search(r"--hash=(?!sha256:)", entry), entry[:80]
    # No options that widen what may be installed (another index, a local folder, a URL).
    for line in lock.read_text().splitlines():
        assert not re.match(r"\s*(-i|--index-url|--extra-index-url|-f|--find-links|-e|"
                            r"--editable|-r|-c)\b", line), line
        assert "://" not in line.split("#")[0], line


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_declared_dependency_is_locked_where_its_specifier_allows(lock):
    have = pins(lock)
    for line in declared(lock):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        name = canonicalize_name(req.name)
        assert name in have, f"{lock.name} has no {req.name}: run make lock"
        assert req.specifier.contains(have[name], prereleases=True), \
            f"{lock.name}: {req.name}=={have[name]} does not satisfy {line!r}: run make lock"


def test_the_pins_the_brief_names():
    """neonize (WhatsApp Web) is pinned exactly in pyproject and locked at that pin; the
    tests' own packages are in the host lock."""
    have = pins(HOST_LOCK)
    assert have["neonize"] == "0.5.2"
    for name in ("segno", "pytest", "hypothesis", "playwright", "setuptools", "pip"):
        assert name in have, name
    assert {"anthropic", "claude-agent-sdk", "pip"} <= pins(IMAGE_LOCK).keys()


def _recipe(makefile: str, target: str) -> list[str]:
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert m, f"no recipe for {target} in the Makefile"
    return [line.strip() for line in m[1].splitlines()]


def test_make_install_installs_only_the_hashed_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(BIN\)/\.installed:.*\brequirements\.lock\b", makefile, re.M), \
        "the install stamp must depend on requirements.lock (reinstall when it changes)"
    installs = [line for line in _recipe(makefile, "$(BIN)/.installed") if "pip install" in line]
    assert installs, "make install runs no pip install"
    locked = [line for line in installs if "--require-hashes" in line]
    assert any("-r requirements.lock" in line and "--only-binary :all:" in line
               for line in locked), installs
    for line in installs:
        if line in locked:
            continue
        # The project itself: local, so unhashed, but nothing else comes with it.
        assert "--no-deps" in line and "--no-build-isolation" in line and line.endswith("-e ."), line


def test_the_image_installs_only_the_hashed_lock():
    build = (ROOT / "container" / "build.sh").read_text()
    docker = (ROOT / "container" / "Dockerfile").read_text()
    download = build[build.index("-m pip download"):]
    download = download[:download.index("2>&1)")]
    assert "--require-hashes" in download and '-r "$lock"' in download, download
    assert 'lock="$here/requirements.txt"' in build
    assert re.search(r'grep -q -- "--hash=sha256:\$sum" "\$lock"', build), \
        "build.sh must put only wheels whose hash is in the lock into the build context"
    assert "cp \"$wheels\"/*.whl" not in build
    run = docker[docker.index('"$1/pip" install'):]
    run = run[:run.index("\n\n")]
    for flag in ("--no-index", "--require-hashes", "-r /tmp/requirements.txt"):
        assert flag in run, flag


def test_nothing_in_the_image_comes_from_npm():
    """The Claude Code CLI comes inside claude-agent-sdk's wheel (hashed in the lock);
    if an npm install appears, it needs a package-lock.json and `npm ci`."""
    for name in ("Dockerfile", "build.sh"):
        text = (ROOT / "container" / name).read_text()
        assert not re.search(r"\bnpm (install|i)\b|\bnpx\b|\byarn\b|\bpnpm\b", text), name
