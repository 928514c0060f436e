"""The pinned OpenCode CLI (`opencode` provider): where agents find it, how it gets there.

One version, `VERSION`: OpenCode's server API changes between releases (the original's
notes: "1.14.x has a completely different API"), and the runner's client is written
against this one's OpenAPI document (`GET /doc`).

Where it comes from (`install`, `python -m nanoclaw.runtime.opencode install`): the npm
registry's tarball of the platform package (`opencode-linux-x64`, or `-baseline` on a
CPU without AVX2 — the same choice the `opencode-ai` package's postinstall makes),
fetched over HTTPS at `VERSION` and checked against the registry's integrity hash pinned
in `PACKAGES` before anything is unpacked; only its one file, `package/bin/opencode`, is
kept. No npm, no install scripts, nothing fetched when it runs. It lands in a cache on
the host, `$XDG_CACHE_HOME/nanoclaw/opencode/<VERSION>` (the layout `npm install` makes,
so an earlier npm-made cache is still found).

Where agents find it (`agent_path`, written into `container.json` as `opencode_bin`):
- process: the host's cache, at its own path;
- bwrap: the host's cached binary, bound read-only at `IN_SANDBOX` (`bwrap.py`);
- docker: the agent image's copy at `IN_SANDBOX` (container/build.sh runs `install`
  and the Dockerfile copies that file in; `pin()` is part of the image's recipe hash).
"""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "1.18.33"
# The platform packages of VERSION we use, with the npm registry's `dist.integrity` for
# each (sha512 of the tarball, as `npm view opencode-linux-x64@1.18.33 dist.integrity`
# shows it and npm's package-lock.json records it). A download that does not match is
# refused. The registry has no linux-arm64 package at this version.
PACKAGES = {
    "opencode-linux-x64":  # x86-64 with AVX2
        "sha512-q/t/3p2CTxOT9y2kvjesb/LZab2+1eqlhhWA02Be6mjTtmYtNBcBsrI5yDo4Fw7ZSPBW2oyMIGMN"
        "RqiKQjiAWw==",
    "opencode-linux-x64-baseline":  # any x86-64
        "sha512-1KQGBiiDDeL/VHHbHkOvvFo8Jr97WT5+C1tear+p7IcDTnXgVHXqIjU4O4jM4mHQzykTP2i884F"
        "CnW5LDa+zCA==",
}
REGISTRY = "https://registry.npmjs.org"  # NANOCLAW_NPM_REGISTRY: a mirror (same hashes)
IN_SANDBOX = "/opt/opencode/bin/opencode"  # docker (the image) and bwrap (a bind)
TIMEOUT_S = 60.0  # per network operation, not for the whole download


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/nanoclaw/opencode/<VERSION>` (default `~/.cache/...`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanoclaw" / "opencode" / VERSION


def _avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def platform_packages() -> list[str]:
    """The packages that run here, best first (empty: no OpenCode for this machine)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "amd64"):
        return []
    if _avx2():
        return ["opencode-linux-x64", "opencode-linux-x64-baseline"]
    return ["opencode-linux-x64-baseline"]


def binary(root: Path | None = None) -> Path | None:
    """The installed binary of the pinned version, or None."""
    modules = (root or cache_dir()) / "node_modules"
    for pkg in platform_packages():
        path = modules / pkg / "bin" / "opencode"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def pin() -> str:
    """What is installed for this machine: version, package and integrity (one line)."""
    pkgs = platform_packages()
    return f"{VERSION} {pkgs[0]} {PACKAGES[pkgs[0]]}" if pkgs else f"{VERSION} none"


def agent_path(runtime: str) -> str | None:
    """`opencode_bin` for an agent of this runtime: where the binary is as it sees it."""
    if runtime == "docker":
        return IN_SANDBOX  # the agent image carries it (container/Dockerfile)
    found = binary()
    if found is None:
        return None
    return IN_SANDBOX if runtime == "bwrap" else str(found)


def tarball_url(pkg: str) -> str:
    registry = (os.environ.get("NANOCLAW_NPM_REGISTRY") or REGISTRY).rstrip("/")
    return f"{registry}/{pkg}/-/{pkg}-{VERSION}.tgz"


def install(root: Path | None = None) -> Path:
    """Install the pinned version into the cache (from the npm registry); its binary.
    Raises RuntimeError (one line) when it cannot be fetched or does not match its pin."""
    root = root or cache_dir()
    found = binary(root)
    if found is not None:
        return found
    pkgs = platform_packages()
    if not pkgs:
        raise RuntimeError(f"OpenCode {VERSION} has no package for {sys.platform}/"
                           f"{platform.machine()} pinned here")
    pkg, url = pkgs[0], tarball_url(pkgs[0])
    fetch_member(f"OpenCode {VERSION}", url, PACKAGES[pkg], "package/bin/opencode",
                 root / "node_modules" / pkg / "bin" / "opencode", root)
    found = binary(root)
    if found is None:
        raise RuntimeError(f"OpenCode {VERSION} was unpacked but {root} holds no binary")
    return found


def fetch_member(what: str, url: str, integrity: str, member: str, dest: Path,
                 cache: Path) -> Path:
    """Download `what`: the npm tarball at `url` (into a temporary folder in `cache`),
    refuse it unless its digest is `integrity` (npm's `dist.integrity`,
    `sha512-<base64>`), and write its one file `member` to `dest` (0755, replaced whole;
    nothing else is made when it fails). Raises RuntimeError (one line). Also used for
    the agent-browser CLI (`agent_browser.py`)."""
    algo, _, want = integrity.partition("-")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        tgz = Path(tmp) / "package.tgz"
        digest = hashlib.new(algo)
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(tgz, "wb") as f:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise RuntimeError(f"cannot download {what} from {url}: {reason}") from None
        got = base64.b64encode(digest.digest()).decode()
        if got != want:
            raise RuntimeError(f"{url} does not match its pinned integrity"
                               f" ({algo}-{want[:16]}…, got {algo}-{got[:16]}…): refused")
        # only the one file we need, checked to be a plain file, written by us
        part = Path(tmp) / "member.part"
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                info = tar.getmember(member)
                src = tar.extractfile(info) if info.isfile() else None
                if src is None:
                    raise KeyError(f"{member} is not a file")
                with src, open(part, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        except (tarfile.TarError, KeyError, OSError) as exc:
            raise RuntimeError(f"{url}: not the expected package ({exc})") from None
        part.chmod(0o755)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
    return dest


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        try:
            print(install())
        except RuntimeError as exc:
            print(f"opencode: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["pin"]:
        print(pin())
        return 0
    path = binary()
    print(path or f"opencode {VERSION} is not installed (python -m nanoclaw.runtime.opencode"
                  " install)")
    return 0 if path else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
