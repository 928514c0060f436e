"""The pinned agent-browser CLI: the browser tool agents drive (container/skills/agent-browser).

agent-browser is a native CLI that runs Chromium over the DevTools protocol; agents call
it from Bash (`agent-browser open URL`, `snapshot`, `click @e1`, `screenshot x.png`). It
browses through the egress door like everything else in a sandbox (HTTP(S)_PROXY), and
uses Debian's Chromium (`CHROMIUM`), never a browser it downloads.

Where it comes from (`install`, run by container/build.sh): the npm registry's tarball of
`agent-browser` at `VERSION`, refused unless it matches the integrity hash pinned here
(`INTEGRITY`, as `npm view agent-browser@VERSION dist.integrity` shows it); only its one
file for this platform (`MEMBER`) is kept, in `$XDG_CACHE_HOME/nanoclaw/agent-browser/
<VERSION>`. No npm, no install scripts. The agent image copies it to `IN_SANDBOX`, with
Debian's chromium beside it; `pin()` is part of the image's recipe hash. The bwrap
runtime binds the host's cached copy at the same path and sees the host's Chromium
through its read-only `/usr`; the process runtime puts the cache on the agent's PATH.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

try:
    from nanoclaw.runtime.opencode import REGISTRY, fetch_member
except ImportError:  # run as a script by container/build.sh (python -I: no package)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from opencode import REGISTRY, fetch_member  # type: ignore[no-redef]

VERSION = "0.41.2"
INTEGRITY = ("sha512-/agCKB5rw1EEK8SKWo4zid7a5kOwlclqALC0P3c69buJvKdhrl/dJkKdfLqGGaiNIbWzRdqqT0P"
             "xZVkwVEf2fg==")
MEMBER = "package/bin/agent-browser-linux-x64"  # a glibc x86-64 binary (libc, libm only)
IN_SANDBOX = "/opt/agent-browser/bin/agent-browser"
# Debian's Chromium, in the image (and on the host for bwrap): the binary itself, not the
# /usr/bin wrapper, which sources /etc/chromium.d (not in a bwrap sandbox's /etc).
CHROMIUM = "/usr/lib/chromium/chromium"
# Chromium's own sandbox cannot start inside ours (no user namespaces there): ours is it.
# /dev/shm is small or absent in a sandbox: shared memory goes to /tmp instead. Loopback
# goes through the egress door too (Chromium would skip the proxy for it), which refuses
# it: a page cannot reach the sandbox's own relays through the browser.
CHROMIUM_ARGS = "--no-sandbox,--disable-dev-shm-usage,--proxy-bypass-list=<-loopback>"
IN_SANDBOX_DIR = IN_SANDBOX.rsplit("/", 1)[0]


def environment() -> dict[str, str]:
    """What agent-browser needs in an agent's environment (every runtime)."""
    return {"AGENT_BROWSER_EXECUTABLE_PATH": CHROMIUM, "AGENT_BROWSER_ARGS": CHROMIUM_ARGS}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nanoclaw" / "agent-browser" / VERSION


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ("x86_64", "amd64")


def binary(root: Path | None = None) -> Path | None:
    path = (root or cache_dir()) / "agent-browser"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def pin() -> str:
    return f"{VERSION} {MEMBER.rsplit('/', 1)[1]} {INTEGRITY}" if supported() \
        else f"{VERSION} none"


def install(root: Path | None = None) -> Path:
    """The pinned binary in the cache (downloaded once); RuntimeError (one line) when it
    cannot be fetched or does not match its pin."""
    root = root or cache_dir()
    found = binary(root)
    if found is not None:
        return found
    if not supported():
        raise RuntimeError(f"agent-browser {VERSION} has no binary for {sys.platform}/"
                           f"{platform.machine()} pinned here")
    registry = (os.environ.get("NANOCLAW_NPM_REGISTRY") or REGISTRY).rstrip("/")
    url = f"{registry}/agent-browser/-/agent-browser-{VERSION}.tgz"
    return fetch_member(f"agent-browser {VERSION}", url, INTEGRITY, MEMBER,
                        root / "agent-browser", root)


def main(argv: list[str]) -> int:
    if argv[:1] == ["pin"]:
        print(pin())
        return 0
    if argv[:1] == ["install"]:
        try:
            print(install())
        except RuntimeError as exc:
            print(f"agent-browser: {exc}", file=sys.stderr)
            return 1
        return 0
    path = binary()
    print(path or f"agent-browser {VERSION} is not installed (container/build.sh installs it)")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
