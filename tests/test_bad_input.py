"""Bad input from the owner's channels and from agents (security review L3, L4):
deeply nested JSON gets a one-line refusal on the terminal socket (the connection
stays) and HTTP 400 from the web API (not a RecursionError); the depth bound
(nanoclaw/jsonin.py) is fuzzed against json.loads; text with newlines and control
characters stays on one log line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from fakes.hosts import inbound_events, worker
from nanoclaw import jsonin

try:
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st
except ImportError:  # not a dependency of the project yet: those tests say so and skip
    given = None

DEEP = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[{" * 50_000,  # unterminated: still refused for depth, before the parser runs
    b'{"text": "x", "chat": "local", "more": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
]


def web_address(host) -> tuple[str, str]:
    rows = wait_for(lambda: host.q("SELECT value FROM host_state WHERE key='web_url'"), 30,
                    what="web chat address")
    return rows[0]["value"], (host.data / "web-token").read_text().strip()


def post(url: str, path: str, body: bytes, token: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + path, data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---- the terminal socket and the web API, on a real host -----------------------------
def test_deep_json_on_the_terminal_socket_gets_one_error_line_and_keeps_the_connection(host):
    c = host.client()
    pid = host.worker_pid("channel:cli")
    for bad in DEEP:
        c.raw(bad + b"\n")

    def errors() -> list[str]:
        return [f["error"] for f in c.snapshot() if f.get("type") == "error"]

    wait_for(lambda: len(errors()) >= len(DEEP), 20, what="an error frame per deep frame")
    errors = errors()
    assert all("nested deeper than 64" in e and "\n" not in e for e in errors), errors
    # brackets inside a string are text, not nesting: such a message is accepted
    mid = c.send("[[[[{{{{" * 100)  # acked: stored
    assert [e["payload"]["text"] for e in inbound_events(host, "cli")
            if e["message_id"] == mid] == ["[[[[{{{{" * 100]
    assert host.worker_pid("channel:cli") == pid  # the same worker, the same connection
    assert all(w["restarts"] == 0 for w in host.workers())
    out = host.output() + (host.base / "logs" / "nanoclaw.error.log").read_text()
    assert "RecursionError" not in out and "Traceback" not in out


def test_deep_json_on_the_web_api_is_a_400_with_a_one_line_error(host):
    url, token = web_address(host)
    for path in ("/api/send", "/api/answer", "/api/chats"):
        for bad in DEEP:
            code, raw = post(url, path, bad, token)
            assert code == 400, (path, code, raw[:200])
            assert b"\n" not in raw.strip()
            assert "nested deeper than 64" in json.loads(raw)["error"]
    code, raw = post(url, "/api/send", b'{"text": "[[[[ fine ]]]]", "id": "deep-ok"}', token)
    assert code == 200, raw
    assert worker(host, "channel:web")["restarts"] == 0
    assert "RecursionError" not in host.output()


# ---- the depth bound -----------------------------------------------------------------
def _depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    return 0


def _outcome(fn, data):
    """What a parser made of `data`: ("ok", repr) or ("bad",); repr so that NaN equals."""
    try:
        return ("ok", repr(fn(data)))
    except ValueError:
        return ("bad",)


def test_depth_limit_edges():
    assert jsonin.loads("[" * 64 + "]" * 64) == eval("[" * 64 + "]" * 64)
    with pytest.raises(jsonin.TooDeep):
        jsonin.loads("[" * 65 + "]" * 65)
    assert jsonin.loads(json.dumps({"t": "[" * 10_000})) == {"t": "[" * 10_000}
    assert jsonin.loads(json.dumps({"t": '\\"[' * 10_000})) == {"t": '\\"[' * 10_000}
    for bad in (b"\xff[", b"{", b"", "\"\\", b'["\\', 5):  # every failure is BadJSON
        with pytest.raises(jsonin.BadJSON):
            jsonin.loads(bad)  # type: ignore[arg-type]
    for deep in DEEP:
        with pytest.raises(jsonin.TooDeep):
            jsonin.check_depth(deep)
        with pytest.raises(jsonin.TooDeep):
            jsonin.check_depth(deep.decode().encode("utf-16"))


needs_hypothesis = pytest.mark.skipif(
    given is None, reason="hypothesis is not installed (pip install hypothesis)")

if given is not None:
    JSON_CHARS = st.sampled_from('[]{}",:\\ 0123456789.-+eEtrufalsn\n\x00é\u2028')
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(alphabet=st.characters(codec="utf-8") | JSON_CHARS),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet=JSON_CHARS, max_size=4), inner, max_size=4),
        max_leaves=40)
    fuzz = hsettings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

    @needs_hypothesis
    @fuzz
    @given(st.one_of(st.text(alphabet=JSON_CHARS, max_size=300), st.text(max_size=200),
                     st.binary(max_size=300)), st.integers(0, 70))
    def test_depth_check_raises_only_its_own_error(data, limit):
        try:
            jsonin.check_depth(data, limit)
        except jsonin.TooDeep:
            pass
        try:
            jsonin.loads(data, limit)
        except jsonin.BadJSON:
            pass

    @needs_hypothesis
    @fuzz
    @given(st.one_of(st.text(alphabet=JSON_CHARS, max_size=300), st.binary(max_size=200)),
           st.integers(0, 6))
    def test_shallow_input_parses_as_json_loads_does(data, limit):
        """Below the limit the outcome is json.loads's; TooDeep only where json.loads
        fails too or gives a value deeper than the limit (small limits, so the scan
        runs: the bracket-count shortcut alone would pass anything)."""
        expected = _outcome(json.loads, data)
        try:
            got = ("ok", repr(jsonin.loads(data, limit)))
        except jsonin.TooDeep:
            assert expected == ("bad",) or _depth(json.loads(data)) > limit
            return
        except jsonin.BadJSON:
            got = ("bad",)
        assert got == expected

    @needs_hypothesis
    @fuzz
    @given(json_values, st.integers(0, 8), st.sampled_from(["str", "utf-8", "utf-16"]))
    def test_the_bound_is_the_true_depth(value, limit, form):
        text = json.dumps(value, ensure_ascii=False)
        data = text if form == "str" else text.encode(form)
        if _depth(value) > limit:
            with pytest.raises(jsonin.TooDeep):
                jsonin.loads(data, limit)
        else:
            assert jsonin.loads(data, limit) == value
else:
    @needs_hypothesis
    def test_depth_fuzz():
        pass


# ---- one log line per call -----------------------------------------------------------
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| ")


def test_log_lines_cannot_be_forged(tmp_path: Path):
    """In a real process, with the host's own log setup: newlines, carriage returns,
    escapes and line separators in a message (as an agent's refused package name
    `x\\ny` was, L4) are escaped, so each call is one line in both files; a
    terminal-only line reaches stderr and neither file."""
    logs = tmp_path / "logs"
    script = (
        "import sys\nfrom pathlib import Path\nfrom nanoclaw import log\n"
        f"log.setup('router', Path({str(logs)!r}), 'INFO', stderr=True)\n"
        "log.logger.info('plain')\n"
        "log.logger.warning('refused apt package {}', 'x\\ny')\n"
        "log.logger.warning('refused: {}', "
        "'x\\n2030-01-01 00:00:00.000 | ERROR   | host           | forged\\r\\x1b[2K\\u2028z')\n"
        "log.logger.error('a\\x00b\\x85c\\td')\n"
        "log.terminal('secret {}', 'tok-123')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    main = (logs / "nanoclaw.log").read_text().split("\n")
    errors = (logs / "nanoclaw.error.log").read_text().split("\n")
    assert main[-1] == "" and errors[-1] == ""
    assert len(main[:-1]) == 4 and len(errors[:-1]) == 3, main
    assert all(LINE.match(line) for line in main[:-1] + errors[:-1])
    assert main[0].endswith("| router         | plain")  # the format itself is unchanged
    assert main[1].endswith("refused apt package x\\ny")
    assert "forged\\r\\x1b[2K\\u2028z" in main[2] and "\\n2030-01-01" in main[2]
    assert main[3].endswith("a\\x00b\\x85c\\td")
    assert "tok-123" not in "\n".join(main + errors)
    assert "secret tok-123" in r.stderr
    assert len(r.stderr.splitlines()) == 5
