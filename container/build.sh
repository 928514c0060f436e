#!/usr/bin/env bash
# Build the agent image from container/Dockerfile — also on a machine where no container
# registry is reachable:
#   1. base: debian:bookworm-slim if present or pullable, else made here with debootstrap
#      (minbase + python3) and `docker import`ed as nanoclaw-base:bookworm (kept);
#   2. wheels: `pip download`ed on the host for the image's Python (cp311, manylinux),
#      because pip over TLS inside a build fails here: exactly the lock
#      container/requirements.txt, every file checked against its sha256 hashes
#      (--require-hashes); only wheels whose hash is in the lock go into the build
#      context, where they are installed with --no-index --require-hashes in a build
#      stage, so the wheels never reach the final image;
#   3. the pinned OpenCode CLI (the `opencode` provider): nanoclaw/runtime/opencode.py
#      (`install`, the same code the process and bwrap runtimes use) fetches its npm
#      registry tarball at the pinned version into the host's cache (once), refused
#      unless it matches the registry integrity hash pinned there; its one binary goes
#      into the build context;
#   3b. the pinned agent-browser CLI (agents' browser tool) the same way:
#      nanoclaw/runtime/agent_browser.py; Debian's chromium is installed in the image by
#      apt (the build has the host's network: --network host);
#   4. `docker build`, labelled with a hash of what it is built from (the OpenCode and
#      agent-browser pins too) and whether it carries CJK fonts. An image with the same
#      hash and fonts is up to date and is not rebuilt (--force rebuilds).
# Settings: NANOCLAW_IMAGE (tag), NANOCLAW_BASE_IMAGE (skip step 1), DEBIAN_MIRROR,
# NANOCLAW_CJK_FONTS=1 (Chinese, Japanese and Korean fonts for the browser's screenshots
# and PDFs: fonts-noto-cjk, about 100 MB more; `make image CJK_FONTS=1`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
image=${NANOCLAW_IMAGE:-nanoclaw-agent:latest}
base=${NANOCLAW_BASE_IMAGE:-}
force=0
[ "${1:-}" = "--force" ] && force=1

say() { printf '==> %s\n' "$*"; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "no docker command (apt-get install docker.io)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "no Docker engine answers${DOCKER_HOST:+ at $DOCKER_HOST}; start one (see .ci/run)"

if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
# "<version> <package> <integrity>" of the OpenCode CLI this machine gets (step 3)
# (run as a script, -I: it needs only the standard library, not the host's packages)
oc_py=("$py" -I "$root/nanoclaw/runtime/opencode.py")
pin=$("${oc_py[@]}" pin) \
  || die "cannot read the OpenCode pin (nanoclaw/runtime/opencode.py)"
ab_py=("$py" -I "$root/nanoclaw/runtime/agent_browser.py")
ab_pin=$("${ab_py[@]}" pin) \
  || die "cannot read the agent-browser pin (nanoclaw/runtime/agent_browser.py)"
case "${NANOCLAW_CJK_FONTS:-0}" in
  1|true|yes|on) cjk=1 ;; 0|false|no|off|"") cjk=0 ;;
  *) die "NANOCLAW_CJK_FONTS must be 1 or 0, not ${NANOCLAW_CJK_FONTS}" ;;
esac

# Same recipe as nanoclaw.runtime.sandbox.image_hash.
hash=$( (cd "$here" && for n in Dockerfile requirements.txt build.sh; do
           printf '%s\0' "$n"; cat "$n" 2>/dev/null || true; printf '\0'; done
         printf 'opencode\0%s\0' "$pin"; printf 'agent-browser\0%s\0' "$ab_pin") \
       | sha256sum | cut -c1-16)
have=$(docker image inspect --format \
         '{{ index .Config.Labels "nanoclaw.image-hash" }} {{ index .Config.Labels "nanoclaw.cjk-fonts" }}' \
         "$image" 2>/dev/null || true)
if [ "$force" = 0 ] && [ "$have" = "$hash $cjk" ]; then
  say "image $image is up to date ($hash$([ $cjk = 1 ] && echo ', with CJK fonts'))"
  exit 0
fi

# ---- 1. base ---------------------------------------------------------------------------
mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
        grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}') \
       | grep -m1 -E '^http://.*/debian/?$' || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if [ -z "$base" ]; then
  if docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
    base=debian:bookworm-slim
  elif docker image inspect nanoclaw-base:bookworm >/dev/null 2>&1; then
    base=nanoclaw-base:bookworm
  elif say "pulling debian:bookworm-slim" && timeout 120 docker pull debian:bookworm-slim; then
    base=debian:bookworm-slim
  else
    say "no registry: making the base with debootstrap (about a minute)"
    command -v debootstrap >/dev/null || die "no debootstrap (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root (or set NANOCLAW_BASE_IMAGE)"
    rootfs=$(mktemp -d /var/tmp/nanoclaw-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,tzdata,ca-certificates \
      bookworm "$rootfs" "$(mirror)"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
      "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
    say "importing the base as nanoclaw-base:bookworm"
    tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - nanoclaw-base:bookworm
    rm -rf "$rootfs"
    trap - EXIT
    base=nanoclaw-base:bookworm
  fi
fi
say "base image: $base"

# ---- 2. wheels -------------------------------------------------------------------------
"$py" -m pip --version >/dev/null 2>&1 || die "no pip for $py (make install, or python3-pip)"
case "$(uname -m)" in
  x86_64) arch=x86_64 ;; aarch64|arm64) arch=aarch64 ;; *) die "unsupported arch $(uname -m)" ;;
esac
wheels="$root/build/agent-wheels"
mkdir -p "$wheels"
lock="$here/requirements.txt"
say "downloading wheels for cp311/$arch into $wheels"
out=$("$py" -m pip download --disable-pip-version-check --progress-bar off --dest "$wheels" \
  --require-hashes --only-binary=:all: --implementation cp --python-version 3.11 \
  --abi cp311 --abi abi3 --abi none --platform "manylinux_2_36_$arch" \
  --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
  --platform "manylinux2014_$arch" --platform "linux_$arch" -r "$lock" 2>&1) \
  || { printf '%s\n' "$out" >&2; die "pip download failed (a hash that does not match is an error: make lock)"; }
printf '%s\n' "$out" \
  | grep -Ev '^(Collecting|  File was already|  Using cached|Saved|Successfully)' || true

# ---- 3. OpenCode ------------------------------------------------------------------------
# A new download: the OpenCode CLI's platform binary (about 60 MB) from the npm registry,
# at the version pinned in nanoclaw/runtime/opencode.py and refused unless its sha512
# is the registry integrity hash pinned there. Kept in the host's cache, so it is fetched
# once per version (the process and bwrap runtimes use the same file).
say "OpenCode $pin"
out=$("${oc_py[@]}" install 2>&1) || die "$(printf '%s\n' "$out" | tail -1)"
opencode=$(printf '%s\n' "$out" | tail -1)
[ -x "$opencode" ] || die "no OpenCode binary at $opencode"
say "agent-browser $ab_pin"
out=$("${ab_py[@]}" install 2>&1) || die "$(printf '%s\n' "$out" | tail -1)"
browser=$(printf '%s\n' "$out" | tail -1)
[ -x "$browser" ] || die "no agent-browser binary at $browser"

# ---- 4. build --------------------------------------------------------------------------
ctx=$(mktemp -d /var/tmp/nanoclaw-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile" "$here/requirements.txt" "$ctx/"
mkdir "$ctx/wheels"
# Only the locked wheels (older downloads stay in $wheels but are left out): one whose
# sha256 is in the lock, at least one per pinned package.
for w in "$wheels"/*.whl; do
  sum=$(sha256sum "$w" | cut -d' ' -f1)
  if grep -q -- "--hash=sha256:$sum" "$lock"; then cp "$w" "$ctx/wheels/"; fi
done
pins=$(grep -cE '^[A-Za-z0-9]' "$lock")
got=$(find "$ctx/wheels" -name '*.whl' | wc -l)
[ "$got" -ge "$pins" ] || die "$got locked wheels for $pins pins in $lock (see $wheels)"
ln "$opencode" "$ctx/opencode" 2>/dev/null || cp "$opencode" "$ctx/opencode"
ln "$browser" "$ctx/agent-browser" 2>/dev/null || cp "$browser" "$ctx/agent-browser"
say "building $image"
DOCKER_BUILDKIT=0 docker build --network host --build-arg "BASE=$base" \
  --build-arg "CJK_FONTS=$cjk" --label "nanoclaw.cjk-fonts=$cjk" \
  --label "nanoclaw.image-hash=$hash" -t "$image" "$ctx" 2>&1 | grep -v '^DEPRECATED\|legacy builder\|BuildKit is\|buildx\|^ *https://docs.docker.com/go/buildx' || true
docker image inspect "$image" --format '{{ index .Config.Labels "nanoclaw.image-hash" }}' \
  2>/dev/null | grep -qx "$hash" || die "the build failed (see the output above)"
size=$(docker image inspect "$image" --format '{{.Size}}')
say "built $image ($hash$([ $cjk = 1 ] && echo ', with CJK fonts')): $((size / 1000000)) MB"
