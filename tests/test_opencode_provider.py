"""The `opencode` provider with the real pinned OpenCode binary (`opencode serve`),
offline, against the fake OpenAI-compatible server: the runner alone (an answer, a
nanoclaw tool called through our MCP server, our permission rules, a killed server
started again and the message answered once), then a real host whose broker holds the
key: in the process runtime, and the same answer and nanoclaw tool call in the docker
runtime (the agent image's own binary) and in bwrap (the host's cached binary bound
read-only into the sandbox). Last, the installer: a tarball is kept only when it matches
its pinned integrity (a fake registry on 127.0.0.1).

The binary comes from the host's cache (`python -m nanoclaw.runtime.opencode install`,
which needs the npm registry; `make image` runs it too); the tests never download it and
skip, saying so, when it is missing (under .ci/run, NANOCLAW_REQUIRE_SANDBOXES=1, they
fail instead), as they do without a Docker engine or bubblewrap."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, _absent, clean_env, containers_of, wait_for
from nanoclaw.devtools.fake_openai import FakeOpenAI
from nanoclaw.devtools.runner_harness import Runner, Session
from nanoclaw.runtime import opencode

SECRET = "sk-openai-opencode-secret"
DEADLINE = 120.0  # a first turn starts opencode (a few seconds) on a busy machine


@pytest.fixture(scope="module")
def binary() -> str:
    path = opencode.binary()
    if path is None:
        _absent(f"opencode {opencode.VERSION} is not installed: python -m"
                " nanoclaw.runtime.opencode install")
    return str(path)


@pytest.fixture
def oai():
    fake = FakeOpenAI(port=0).start()
    yield fake
    fake.stop()


@pytest.fixture
def run(tmp_path, oai, binary):
    made: list[Runner] = []

    def start(**config) -> tuple[Session, Runner]:
        s = Session(tmp_path / f"s{len(made)}", provider="opencode", model="gpt-fake-1",
                    opencode_bin=binary, **config)
        r = Runner(s, oai.root, {"NANOCLAW_MODEL_RETRIES": "1"})
        made.append(r)
        return s, r

    yield start
    for r in made:
        assert r.stop() == 0, r.text()[-3000:]
    for r in made:  # no opencode serve outlives its runner
        assert not serve_pids(r.proc.pid), r.text()[-2000:]


def serve_pids(runner_pid: int) -> list[int]:
    """`opencode serve` processes started by this runner (alive, by parent pid)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == runner_pid and b"serve" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append(int(entry))
    return out


def chats(fake) -> list[dict]:
    return [r for r in list(fake.requests) if r["path"].endswith("/chat/completions")]


def test_opencode_answers_through_the_upstream_path_offline(run, oai):
    s, r = run()
    mid = s.chat("hello opencode")
    assert s.reply_to(mid, DEADLINE)["text"] == "echo: hello opencode"
    s.completed(mid, DEADLINE)
    assert chats(oai) and {c["path"] for c in chats(oai)} == {"/up/openai/chat/completions"}
    assert {c["headers"]["authorization"] for c in chats(oai)} == {"Bearer session-token"}
    main = chats(oai)[-1]["body"]
    assert "You are Andy" in main["messages"][0]["content"]  # our system prompt
    names = {t["function"]["name"] for t in main["tools"]}
    assert "nanoclaw_send_message" in names and "nanoclaw_schedule_task" in names
    home = Path(s.paths.work) / ".provider" / "opencode"
    assert (home / "data" / "opencode" / "opencode.db").exists()  # its state stays here
    # a second turn continues the same opencode session
    again = s.chat("still there?")
    assert s.reply_to(again, DEADLINE)["text"] == "echo: still there?"
    last = [m.get("content") for m in chats(oai)[-1]["body"]["messages"]]
    assert any("hello opencode" in str(t) for t in last)


def test_opencode_calls_a_nanoclaw_tool_through_our_mcp_server(run, oai):
    s, r = run()
    mid = s.chat('[[tool:nanoclaw_send_message {"text": "sent from opencode"}]]')
    s.completed(mid, DEADLINE)
    assert [x["text"] for x in s.out()] == ["sent from opencode"]
    result = chats(oai)[-1]["body"]["messages"][-1]
    assert result["role"] == "tool" and "Message sent" in str(result["content"])
    assert "tool start name=send_message" in r.text()


def test_opencode_permissions_follow_our_rules_not_always(run, oai):
    """opencode asks before leaving its folder; we answer by the folders the agent may
    read (here: reject /etc, allow the shared global folder), once each, never always."""
    s, r = run()
    mid = s.chat('[[tool:read {"filePath": "/etc/passwd"}]]')
    s.completed(mid, DEADLINE)
    assert "patterns=['/etc/*'] reply=reject" in r.text()
    assert not any("root:x:0:0" in str(c["body"]) for c in chats(oai))
    shared = s.tmp / "global" / "shared.md"
    shared.write_text("the shared memory")
    mid = s.chat('[[tool:read {"filePath": "%s"}]]' % shared)
    s.completed(mid, DEADLINE)
    assert f"patterns=['{shared.parent}/*'] reply=once" in r.text()
    assert "the shared memory" in str(chats(oai)[-2]["body"]["messages"][-1])
    assert "reply=always" not in r.text()


def test_a_killed_opencode_serve_is_started_again_and_the_message_answered_once(run, oai):
    s, r = run()
    first = s.chat("warm up")
    s.completed(first, DEADLINE)
    (pid,) = serve_pids(r.proc.pid)
    oai.inject(delay_ms=5000)  # the next model call hangs while we kill the server
    before = len(chats(oai))
    mid = s.chat("answer me once")
    wait_for(lambda: len(chats(oai)) > before, DEADLINE, what="the model call under way")
    os.kill(pid, signal.SIGKILL)
    s.completed(mid, DEADLINE)
    replies = [x["text"] for x in s.out() if x["in_reply_to"] == mid]
    assert replies == ["echo: answer me once"]
    (again,) = serve_pids(r.proc.pid)
    assert again != pid and "starting it again" in r.text()


# ---- in a real host ------------------------------------------------------------------------

def test_an_opencode_agent_answers_through_the_broker_with_the_real_key(host_factory, oai,
                                                                        binary):
    h = host_factory(NANOCLAW_PROVIDER="opencode", NANOCLAW_MODEL="gpt-fake-1",
                     OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=SECRET).start()
    r = h.cli("send", "hello through the broker", "--wait", str(int(DEADLINE)),
              timeout=DEADLINE + 30)
    assert r.stdout.strip() == "echo: hello through the broker", (r.stdout, r.stderr)
    assert {c["headers"]["authorization"] for c in chats(oai)} == {f"Bearer {SECRET}"}
    assert {c["path"] for c in chats(oai)} == {"/v1/chat/completions"}
    for f in (h.data / "sessions").rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert SECRET.encode() not in f.read_bytes(), f


def test_an_opencode_group_over_its_budget_is_refused_clearly(host_factory, oai, binary):
    h = host_factory(NANOCLAW_PROVIDER="opencode", NANOCLAW_MODEL="gpt-fake-1",
                     OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=SECRET,
                     NANOCLAW_DAILY_TOKEN_BUDGET="1").start()
    # opencode's first turn makes two model calls (a title, then the answer): the first
    # spends the tiny budget, so already the first message is refused, and the next
    for text in ("spend it", "and more"):
        r = h.cli("send", text, "--wait", str(int(DEADLINE)), timeout=DEADLINE + 30)
        assert r.returncode != 0 and r.stdout == "", (r.stdout, r.stderr)
        assert r.stderr.startswith("nanoclaw: the agent answered with an error: NanoClaw:"
                                   " this agent's daily token budget"), r.stderr


def test_a_binary_that_never_serves_is_a_visible_error(tmp_path, oai):
    """Not opencode at all (a script that prints and exits): the user hears why."""
    fake_bin = tmp_path / "opencode"
    fake_bin.write_text("#!/bin/sh\necho 'Error: cannot open the database' >&2\nexit 3\n")
    fake_bin.chmod(0o755)
    s = Session(tmp_path / "s", provider="opencode", model="gpt-fake-1",
                opencode_bin=str(fake_bin))
    r = Runner(s, oai.root)
    try:
        mid = s.chat("hello")
        text = s.reply_to(mid, DEADLINE)["text"]
        assert text.startswith("Error: opencode serve did not start")
        assert "cannot open the database" in text
    finally:
        assert r.stop() == 0, r.text()


# ---- in a sandbox: docker (the image's binary) and bwrap (the host's, bound in) -----------

@pytest.fixture(params=["docker", "bwrap", "bwrap-cold"])
def sandboxed(request, host_factory):
    """A host factory for the runtime; docker needs the engine and the image (built from
    container/, so it carries the pinned binary), bwrap bubblewrap and the host's cache
    (`bwrap`: the default warm pool, a spare handed the session when the host can;
    `bwrap-cold`: no pool, a sandbox started for the session)."""
    runtime, client = request.param.removesuffix("-cold"), None
    pool = {"NANOCLAW_WARM_POOL": "0"} if request.param.endswith("-cold") else {}
    if runtime == "docker":
        client = request.getfixturevalue("docker_client")
        request.getfixturevalue("agent_image")
    else:
        request.getfixturevalue("bwrap_works")
        request.getfixturevalue("binary")
    made = []

    def make(**env: str):
        h = host_factory(f"oc-{runtime}", NANOCLAW_RUNTIME=runtime, **pool, **env)
        made.append(h)
        return h

    yield runtime, make, client
    if client is not None:
        for h in made:
            h.cleanup()
            for c in containers_of(client, h.data, all=True):
                c.remove(force=True)


def test_an_opencode_agent_in_a_sandbox_answers_and_calls_a_nanoclaw_tool(sandboxed, oai):
    runtime, make, client = sandboxed
    h = make(NANOCLAW_PROVIDER="opencode", NANOCLAW_MODEL="gpt-fake-1",
             OPENAI_BASE_URL=oai.url, OPENAI_API_KEY=SECRET).start()
    chat = h.client()
    mid = chat.send("hello from the sandbox")
    assert chat.wait_reply(mid, DEADLINE)["text"] == "echo: hello from the sandbox"
    # a nanoclaw tool, called by opencode through the runner's MCP server inside
    mid = chat.send('[[tool:nanoclaw_send_message {"text": "sent by opencode in %s"}]]' % runtime)
    sent = wait_for(lambda: [f for f in chat.snapshot() if f.get("type") == "reply"
                             and f.get("text") == f"sent by opencode in {runtime}"],
                    DEADLINE, what="the message the tool sent")
    assert len(sent) == 1
    # the tool's result goes back to the model (the call after the message was sent)
    wait_for(lambda: any(m["role"] == "tool" and "Message sent" in str(m["content"])
                         for ch in chats(oai) for m in ch["body"]["messages"]),
             DEADLINE, what="the tool result in a model call")
    # through the broker, with the real key only there
    assert {c["headers"]["authorization"] for c in chats(oai)} == {f"Bearer {SECRET}"}
    assert {c["path"] for c in chats(oai)} == {"/v1/chat/completions"}
    # the binary the agent was told to run is the sandbox's own path, not the host's
    (cfg,) = (h.data / "sessions").rglob("container.json")
    assert json.loads(cfg.read_text())["opencode_bin"] == opencode.IN_SANDBOX
    assert not Path(opencode.IN_SANDBOX).exists()  # so it is not the host's /opt
    logs = "".join(p.read_text(errors="replace")
                   for p in (h.base / "logs" / "containers").rglob("*.log"))
    assert "opencode serve up" in logs and "tool start name=send_message" in logs
    if client is not None:  # the image's binary: nothing of the host's cache is mounted
        (ctr,) = containers_of(client, h.data, spares=False)
        cache = str(opencode.cache_dir().parent)
        assert not any(m["Destination"].startswith("/opt") or m["Source"].startswith(cache)
                       for m in ctr.attrs["Mounts"]), ctr.attrs["Mounts"]
    for f in (h.data / "sessions").rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert SECRET.encode() not in f.read_bytes(), f


# ---- the installer: pinned version, pinned integrity ----------------------------------------

def test_the_image_gets_the_binary_from_the_same_installer():
    build = (ROOT / "container" / "build.sh").read_text()
    docker = (ROOT / "container" / "Dockerfile").read_text()
    assert '-I "$root/nanoclaw/runtime/opencode.py")' in build
    assert '"${oc_py[@]}" install' in build and "printf 'opencode\\0%s\\0' \"$pin\"" in build
    assert f"COPY opencode {opencode.IN_SANDBOX}\n" in docker
    for pkg, integrity in opencode.PACKAGES.items():
        assert integrity.startswith("sha512-") and len(base64.b64decode(integrity[7:])) == 64


class FakeRegistry:
    """`GET /<pkg>/-/<pkg>-<version>.tgz` on 127.0.0.1, serving `tarballs[pkg]`."""

    def __init__(self) -> None:
        self.tarballs: dict[str, bytes] = {}
        self.paths: list[str] = []
        reg = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                reg.paths.append(self.path)
                pkg = self.path.split("/")[1]
                body = reg.tarballs.get(pkg)
                if body is None or self.path != f"/{pkg}/-/{pkg}-{opencode.VERSION}.tgz":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def registry(monkeypatch):
    if not opencode.platform_packages():
        pytest.skip(f"OpenCode {opencode.VERSION} has no package for this machine")
    reg = FakeRegistry()
    monkeypatch.setenv("NANOCLAW_NPM_REGISTRY", reg.url)
    yield reg
    reg.stop()


def test_install_keeps_a_tarball_only_when_it_matches_its_pinned_integrity(registry,
                                                                        monkeypatch,
                                                                        tmp_path):
    pkg = opencode.platform_packages()[0]
    good = tarball({"package/package.json": b"{}",
                    "package/bin/opencode": b"#!/bin/sh\necho fake opencode\n"})
    monkeypatch.setitem(opencode.PACKAGES, pkg, integrity(good))
    # one byte off: refused, nothing left in the cache
    registry.tarballs[pkg] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(RuntimeError, match="does not match its pinned integrity"):
        opencode.install(tmp_path / "c")
    assert opencode.binary(tmp_path / "c") is None
    assert [p for p in (tmp_path / "c").rglob("*") if p.is_file()] == []
    # missing from the registry: one clear line
    del registry.tarballs[pkg]
    with pytest.raises(RuntimeError, match=f"cannot download OpenCode {opencode.VERSION}"):
        opencode.install(tmp_path / "c")
    # the pinned one: its binary, and only it, where binary() finds it
    registry.tarballs[pkg] = good
    path = opencode.install(tmp_path / "c")
    assert path == opencode.binary(tmp_path / "c") and os.access(path, os.X_OK)
    assert path.read_bytes() == b"#!/bin/sh\necho fake opencode\n"
    assert sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*")
                  if p.is_file()) == [f"node_modules/{pkg}/bin/opencode"]
    assert registry.paths[-1] == f"/{pkg}/-/{pkg}-{opencode.VERSION}.tgz"
    n = len(registry.paths)
    assert opencode.install(tmp_path / "c") == path and len(registry.paths) == n  # cached


def test_a_failed_download_is_one_clear_line_as_build_sh_runs_it(registry, tmp_path):
    """container/build.sh runs the installer as a script (-I, the standard library only)
    and stops the image build with its last line: that line must say what failed."""
    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "cache"),
                    NANOCLAW_NPM_REGISTRY=registry.url)  # it has nothing: 404
    r = subprocess.run([sys.executable, "-I", str(ROOT / "nanoclaw" / "runtime" / "opencode.py"),
                        "install"], capture_output=True, text=True, env=env, timeout=60)
    pkg = opencode.platform_packages()[0]
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr == (f"opencode: cannot download OpenCode {opencode.VERSION} from"
                        f" {registry.url}/{pkg}/-/{pkg}-{opencode.VERSION}.tgz: Not Found\n")
    assert not (tmp_path / "cache" / "nanoclaw" / "opencode" / opencode.VERSION
                / "node_modules").exists()
