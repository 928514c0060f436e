"""What the host and the runner read from the agent, fuzzed with hypothesis (issue 20,
item 6): an `ncl` request's arguments (cli/agent_args.py), the model's tool calls as the
runner's Toolbox takes them (container/agent_runner/tools), and the `messages_out` rows
the delivery worker reads from a session's `outbound.db` (the container is untrusted:
any kind, channel, ids and content, stored with any SQLite type).

Everything runs on a real world: the central DB with the default group, one live session
with its folder and databases, the runner's toolbox pointed at it, the host's Delivery
(test_agent_cli.World). What must hold: a request is parsed or refused in one line; a
tool call answers (an error is one line, never a programming error); every row the
agent wrote ends queued for its channel, or recorded delivered or failed with a one-line
reason, in the same pass, and the delivery worker carries on. Derandomized, so CI runs
the same cases every time; seeds that once failed are kept as `@example`s."""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from typing import Any

import pytest

from nanoclaw.cli import admin, agent_args, ops
from nanoclaw.db import session as sessiondb
from test_agent_cli import World

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

fuzz = hsettings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])

texts = st.text(max_size=16) | st.sampled_from(
    ["", " ", "\n", "a\nb", "\x00", "\ud800", "-", "--", "-5", "main", "🙂", "x" * 1200])
nums = st.integers() | st.sampled_from([0, -1, 2**63, 2**70, -2**70]) | st.floats()
scalars = st.none() | st.booleans() | nums | texts
anything = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    texts, kids, max_size=3), max_leaves=10)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """`good` `odds` times as often as `bad` (one_of alone favours neither reliably)."""
    return st.sampled_from([good] * odds + [bad]).flatmap(lambda s: s)


def one_line(msg: Any) -> None:
    text = str(msg)
    assert text.strip() and "\n" not in text and "\r" not in text, repr(text)


@pytest.fixture
def w(tmp_path, monkeypatch) -> World:
    return World(tmp_path, monkeypatch)


# ---- ncl: the agent's admin-command arguments ----------------------------------------------
VERBS = sorted(ops.VERBS)
NAMES = sorted({o.name for o in admin.OPS.values() if o.name})
FLAGS = sorted({f for o in admin.OPS.values() for a in o.args for f in a.flags
                if f.startswith("-")})
words = st.sampled_from(VERBS + NAMES + FLAGS + ["help", "-h", "--help", "main", "ag-none",
                                                 "telegram:42", "cli:local", "global",
                                                 "disabled", "anthropic", "--x=1"])
word_lists = st.lists(words | texts, max_size=7)
ncl_args = st.one_of(
    st.tuples(st.sampled_from(VERBS), st.sampled_from(NAMES), word_lists).map(
        lambda t: [t[0], t[1], *t[2]]),
    word_lists, st.lists(anything, max_size=4), anything)


def test_ncl_arguments_parse_to_a_command_or_one_refusal_line(w):
    scopes = {}

    @fuzz
    @given(raw=ncl_args, scope=st.sampled_from(["group", "global", "disabled"]))
    @example(raw=["groups", "update", "--name", "\ud800"], scope="global")
    @example(raw=["members", "add", "-"], scope="group")
    def prop(raw: Any, scope: str) -> None:
        try:
            cmd = agent_args.parse(w.store, w.ag, scope, raw)
        except agent_args.Refused as e:
            one_line(e)
            return
        scopes[scope] = scopes.get(scope, 0) + 1
        if cmd.op is None:
            assert cmd.help
            return
        one_line(cmd.line)
        again = agent_args.parse(w.store, w.ag, scope, cmd.args)  # what runs once approved
        assert again.args == cmd.args and again.op is cmd.op

    prop()
    assert scopes.get("global") and scopes.get("group")  # the fuzz reached real commands


# ---- the model's tool calls, as the runner's Toolbox runs them -----------------------------
PATHS = st.sampled_from(["notes.txt", "sub/a.md", "CLAUDE.md", "/etc/passwd", "../x", ".",
                         "inbound.db", "outbox", "a" * 300, "x\x00y", "\ud800.txt"])


def from_schema(schema: dict[str, Any], key: str = "", wild: bool = True) -> st.SearchStrategy:
    """Values for a JSON schema as a model sends them: the right type (numbers as strings
    too); `wild`: also odd strings and, now and then, anything at all."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    words = texts if wild else st.text(min_size=1, max_size=12) | st.sampled_from(
        ["hello", "0 9 * * 1-5", "2030-01-01T09:00", "task-1", "q", "vim", "http://127.0.0.1:9/x"])
    alts: list[st.SearchStrategy] = []
    for k in kinds:
        if "enum" in schema:
            alts.append(st.sampled_from(schema["enum"]) | (texts if wild else st.nothing()))
        elif k == "string":
            alts.append(PATHS if key == "path" else words)
        elif k in ("integer", "number"):
            alts.append(st.integers(-3, 3) | st.integers(1000, 5000) | (
                nums | st.sampled_from(["12", " 3 ", "1e3"]) if wild else st.nothing()))
        elif k == "boolean":
            alts.append(st.booleans())
        elif k == "array":
            alts.append(st.lists(from_schema(schema.get("items", {}), key, wild),
                                 min_size=0 if wild else schema.get("minItems", 0),
                                 max_size=min(4, schema.get("maxItems", 4))))
        elif k == "object":
            alts.append(object_args(schema, wild))
    if not alts:
        return anything
    return mostly(st.one_of(*alts), anything) if wild else st.one_of(*alts)


def object_args(schema: dict[str, Any], wild: bool = True) -> st.SearchStrategy:
    props = schema.get("properties")
    if props is None:
        extra = schema.get("additionalProperties")
        return st.dictionaries(texts, from_schema(extra, "", wild) if isinstance(extra, dict)
                               else anything, max_size=3)
    required = schema.get("required", [])
    good = st.fixed_dictionaries(
        {k: from_schema(props[k], k, wild) for k in required},
        optional={k: from_schema(v, k, wild) for k, v in props.items() if k not in required})
    return mostly(good, good.map(lambda d: {**d, "bogus\n": 1}), 6) if wild else good


def tool_calls() -> st.SearchStrategy:
    import sys

    from nanoclaw.devtools.runner_harness import ROOT

    sys.path.insert(0, str(ROOT / "container"))
    from agent_runner.tools import REGISTRY

    # never bash: a generated command would run on this machine
    tools = [t for t in REGISTRY.tools.values() if t.name != "bash"]
    return st.sampled_from(tools).flatmap(lambda t: st.tuples(st.just(t.name), st.one_of(
        object_args(t.schema, wild=False), object_args(t.schema), anything)))


def test_tool_calls_answer_with_a_result_or_one_clear_error(w):
    """Any arguments, for every tool but bash: the Toolbox answers; an error is one line
    and a refusal, never a programming error (TypeError, KeyError, …) caught at the end.
    Tools that wait for a person or the host see the agent stopping, so they return."""
    from agent_runner.providers import ToolOutcome

    w.tools.ctx.should_stop = lambda: True
    (w.settings.group_dir("main") / "notes.txt").write_text("one\ntwo\n")
    answered: dict[str, set[bool]] = {}

    @fuzz
    @given(call=tool_calls())
    @example(call=("edit_message", {"messageId": 2**70, "text": "x"}))
    @example(call=("add_reaction", {"messageId": -(2**70), "emoji": "👍"}))
    @example(call=("schedule_task", {"prompt": "p", "processAfter": "0001-01-01T00:00+14:00"}))
    @example(call=("schedule_task", {"prompt": "p", "processAfter": "9999-12-31T23:59-12:00"}))
    def prop(call: tuple[str, Any]) -> None:
        name, args = call
        timeout = w.tools.timeout_ms(name, args if isinstance(args, dict) else {})
        assert timeout is None or isinstance(timeout, int)
        out = w.tools.run(name, args)
        assert isinstance(out, ToolOutcome) and isinstance(out.text, str)
        answered.setdefault(name, set()).add(out.is_error)
        if out.is_error:
            assert out.text.startswith("Error: ")
            one_line(out.text)
            assert not out.text.startswith(("Error: TypeError", "Error: KeyError")), out.text

    prop()
    # the fuzz reached the tools themselves, not only the schema check
    assert len(answered) > 15 and sum(False in v for v in answered.values()) >= 3, answered


@fuzz
@given(name=st.sampled_from(["bash", "ask_user_question", "ncl", "read"]),
       args=st.dictionaries(st.sampled_from(["timeout", "command", "args"]), anything,
                            max_size=3))
@example(name="bash", args={"timeout": float("inf")})
@example(name="ask_user_question", args={"timeout": float("nan")})
def test_a_tools_declared_timeout_is_a_number_or_none(name, args):
    """`timeout_ms` runs on the model's raw arguments, before any schema check (the
    provider records the tool as started with it): never an exception."""
    import sys

    from nanoclaw.devtools.runner_harness import ROOT

    sys.path.insert(0, str(ROOT / "container"))
    from agent_runner.tools import Toolbox

    box = Toolbox.__new__(Toolbox)
    from agent_runner.tools import REGISTRY

    box.registry = REGISTRY
    ms = box.timeout_ms(name, args)
    assert ms is None or isinstance(ms, int)


# ---- the rows the agent writes to outbound.db ----------------------------------------------
_ids = itertools.count(1)
ACTIONS = ["schedule_task", "cancel_task", "update_task", "pause_task", "resume_task",
           "create_agent", "install_packages", "add_mcp_server", "cli", "bogus"]
def _bindable(v: Any) -> bool:
    """What an agent's sqlite3 can INSERT at all (a 64-bit integer, UTF-8 text)."""
    try:
        sqlite3.connect(":memory:").execute("SELECT ?", (v,))
        return v == v  # not NaN (stored as NULL)
    except (OverflowError, UnicodeEncodeError):
        return False


sql_values = (st.none() | texts | nums | st.binary(max_size=8)).filter(_bindable)
not_null = sql_values.filter(lambda v: v is not None)
contents = st.one_of(
    st.fixed_dictionaries({"text": texts | anything}),
    st.fixed_dictionaries({"text": texts}, optional={"files": anything | st.lists(
        st.sampled_from(["a.txt", "../x", ".", "", "x/y"]) | anything, max_size=2)}),
    st.fixed_dictionaries({"operation": st.sampled_from(["edit", "reaction", "delete", 5]),
                           "messageId": anything}, optional={"text": texts, "emoji": texts}),
    st.fixed_dictionaries({"type": st.just("ask_question"), "questionId": texts | anything,
                           "title": anything, "question": anything,
                           "options": st.lists(texts | anything, max_size=3) | anything}),
    st.fixed_dictionaries({"type": st.just("card"), "card": anything}),
    st.fixed_dictionaries({"action": st.sampled_from(ACTIONS) | anything}, optional={
        "args": st.lists(texts, max_size=3) | anything, "requestId": anything,
        "prompt": texts, "processAfter": texts | anything, "recurrence": texts,
        "taskId": texts, "name": texts, "apt": anything, "npm": anything,
        "command": texts, "env": anything}),
    anything)
content_cells = st.one_of(
    contents.map(lambda c: json.dumps(c)), contents.map(lambda c: json.dumps(c).encode()),
    st.sampled_from(["", "{", "null", "[" * 5000, '{"text": "x"' + " " * (1 << 20) + "}",
                     "NaN", '{"text": NaN}', '{"a": ' * 2000]),
    st.binary(max_size=20), nums).filter(_bindable)
FIELDS = {
    "id": st.sampled_from(["str", "str", "bytes", "int"]),
    "kind": st.sampled_from(["chat", "chat", "chat-sdk", "system", "system"]) | not_null,
    "channel_type": st.sampled_from(["cli", "cli", "agent", "telegram"]) | sql_values,
    "platform_id": st.sampled_from(["local", "local", "main", "42"]) | sql_values,
    "thread_id": st.none() | sql_values,
    "in_reply_to": st.sampled_from([None, None, "note-1", "m0"]) | sql_values,
    "timestamp": st.sampled_from(["2024-01-01T00:00:00.000Z"]) | not_null,
    "deliver_after": st.sampled_from([None, None, "2000-01-01T00:00:00Z", "2999-01-01"]),
    "content": content_cells,
}
SYSTEM = st.sampled_from([
    {"action": "cli", "args": ["groups", "list"], "requestId": "r1"},
    {"action": "cli", "args": ["destinations", "list"]},
    {"action": "schedule_task", "prompt": "p", "processAfter": "2030-01-01T00:00:00Z"},
    {"action": "cancel_task", "taskId": "task-none"},
    {"action": "create_agent", "name": "helper"}]).flatmap(
        lambda c: st.fixed_dictionaries({k: st.just(v) | texts | anything
                                         for k, v in c.items()}) | st.just(c))


def _row(**over: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({**FIELDS, **over})


rows = st.one_of(
    _row(kind=st.just("chat"), channel_type=st.just("cli"), platform_id=st.just("local"),
         thread_id=st.none(), in_reply_to=st.sampled_from([None, "m0"]),
         content=contents.map(json.dumps)),
    _row(kind=st.just("system"), content=SYSTEM.map(json.dumps)),
    _row())


def _write(w: World, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """INSERT the rows as the agent could (any SQLite type in any column); returns
    them with their ids as SQLite keeps them."""
    out = []
    conn = sqlite3.connect(w.paths.outbound)
    try:
        for r in batch:
            n = next(_ids)
            rid = {"str": f"fz-{n}", "bytes": f"fz-{n}".encode(), "int": 10**6 + n}[r["id"]]
            conn.execute(
                "INSERT INTO messages_out (id, seq, in_reply_to, timestamp, deliver_after,"
                " recurrence, kind, platform_id, channel_type, thread_id, content) VALUES"
                " (?,?,?,?,?,NULL,?,?,?,?,?)",
                (rid, 2 * 10**6 + 2 * n + 1, r["in_reply_to"], r["timestamp"],
                 r["deliver_after"], r["kind"], r["platform_id"], r["channel_type"],
                 r["thread_id"], r["content"]))
            out.append({**r, "id": str(rid) if r["id"] == "int" else rid})
        conn.commit()
    finally:
        conn.close()
    return out


def test_every_row_the_agent_writes_is_queued_or_ends_with_one_line(w):
    from nanoclaw.db.outbound import HostileDB

    sid = w.sid
    inbound = sessiondb.SessionInbound(w.paths)
    seen: dict[str, int] = {}

    def outcome(rid: Any) -> tuple[str, Any]:
        conn = sqlite3.connect(inbound.paths.inbound)
        try:
            done = conn.execute("SELECT status, error FROM delivered WHERE message_out_id=?",
                                (rid,)).fetchone()
        finally:
            conn.close()
        queued = w.store.conn.execute("SELECT 1 FROM channel_outbox WHERE idem_key=?",
                                      (f"{sid}:{rid}",)).fetchone()
        if done and queued:
            return "both", done
        return ("queued", None) if queued else ("done", done) if done else ("none", None)

    @fuzz
    @given(batch=st.lists(rows, min_size=1, max_size=3))
    @example(batch=[{"id": "bytes", "kind": "chat", "channel_type": "cli",
                     "platform_id": "local", "thread_id": None, "in_reply_to": b"note-1",
                     "timestamp": "t", "deliver_after": None, "content": '{"text": "x"}'}])
    def prop(batch: list[dict[str, Any]]) -> None:
        written = _write(w, batch)
        w.delivery.signals.clear()
        try:
            w.delivery.pass_once(time.time())
        except HostileDB:
            pytest.fail("a row's content quarantined the session")
        assert w.delivery.errors == {}, w.delivery.errors  # no row stalled the session
        for r in written:
            state, done = outcome(r["id"])
            if r["deliver_after"] == "2999-01-01":
                assert state == "none", (r, state)
                continue
            assert state in ("queued", "done"), (r, state)
            seen[state if state == "queued" else done[0]] = seen.get(
                state if state == "queued" else done[0], 0) + 1
            if state == "done":
                status, error = done
                assert status in ("delivered", "failed"), done
                if status == "failed":
                    one_line(error)

    prop()
    assert set(seen) == {"queued", "delivered", "failed"}, seen  # every fate was reached
