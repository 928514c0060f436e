"""What the approver sees is what runs (security review M3, L5): agent requests go through
the host's real delivery pass (`ncl` in `agent_cli`, `add_mcp_server` and
`install_packages` in `actions`) on real databases, and the approval card they queue
in `channel_outbox` is read back. The card shows the whole request, one visible form
per argument (no padding, newline or Markdown can hide or fake a part), whole on every
platform; a request too long for that is refused up front and nothing is queued."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest

from dbread import db_row, db_rows
from nanoclaw import config
from nanoclaw.agents.groups import ensure_defaults
from nanoclaw.approvals import requests as approvals
from nanoclaw.channels.markdown import discord_markdown, slack_mrkdwn, telegram_html
from nanoclaw.cli import agent as agent_cli
from nanoclaw.db import session as sessiondb
from nanoclaw.db.store import Store
from nanoclaw.delivery import actions
from nanoclaw.delivery.delivery import Delivery
from nanoclaw.routing.router import Event, Router
from nanoclaw.util import local_user_id

try:
    from hypothesis import HealthCheck, event, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st
except ImportError:  # not in pyproject's dev extras; only the property test then skips
    given = None

OWNER = local_user_id()
ATTACK_NAME = "Friendly Helper\n\n(this only renames the agent)" + " " * 560
FENCE = re.compile(r"```\n(.*)\n```", re.S)


class Host:
    """Central DB with the default group `main`, one live session of its terminal chat,
    and the delivery worker's pass; the agent's side is raw rows in outbound.db."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        for k, v in {"NANOCLAW_DATA_DIR": tmp_path / "data",
                     "NANOCLAW_LOGS_DIR": tmp_path / "logs",
                     "NANOCLAW_GROUPS_DIR": tmp_path / "groups"}.items():
            monkeypatch.setenv(k, str(v))
        self.settings = s = config.load()
        self.store = Store.open(s.data_dir)
        ensure_defaults(self.store, s)
        self.ag = db_row(self.store, "SELECT id FROM agent_groups")["id"]
        (self.sid,) = Router(self.store, s).route(Event(
            "cli", "local", "m0", text="hi", sender_id=OWNER.split(":", 1)[1], is_mention=True))
        self.paths = sessiondb.of(s, self.store.session(self.sid))
        self.delivery = Delivery(self.store, s)
        self.n = 0

    def agent_writes(self, content: dict) -> str:
        """A system row in outbound.db, written as the runner (or a hostile agent) would."""
        self.n += 1
        c = sqlite3.connect(self.paths.outbound)
        i = sqlite3.connect(self.paths.inbound)
        try:
            top = max(c.execute("SELECT COALESCE(MAX(seq),0) FROM messages_out").fetchone()[0],
                      i.execute("SELECT COALESCE(MAX(seq),0) FROM messages_in").fetchone()[0])
            mid = f"out-{self.n}-{time.time_ns()}"
            c.execute("INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind,"
                      " platform_id, channel_type, content) VALUES (?,?,?,?,?,?,?,?)",
                      (mid, top + 1 if top % 2 == 0 else top + 2, None,
                       "2026-01-01T00:00:00.000Z", "system", None, None, json.dumps(content)))
            c.commit()
        finally:
            c.close()
            i.close()
        return mid

    def run_host(self, until, timeout: float = 15.0):
        end = time.monotonic() + timeout
        while not (got := until()):
            assert time.monotonic() < end, "the host never answered"
            self.delivery.pass_once(time.time())
            time.sleep(0.002)
        return got

    def inbound(self) -> list[dict]:
        c = sqlite3.connect(self.paths.inbound)
        c.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in c.execute("SELECT * FROM messages_in ORDER BY seq")]
        finally:
            c.close()

    def ncl(self, args) -> dict:
        """An `ncl` request; the host's cli_response to it."""
        rid = f"req-{self.n + 1}"
        self.agent_writes({"action": "cli", "args": args, "requestId": rid})
        return self.run_host(lambda: next(
            (c for c in (json.loads(r["content"]) for r in self.inbound() if r["kind"] == "system")
             if c.get("requestId") == rid), None))

    def action(self, content: dict) -> str:
        """A system action; the note the agent hears back (its refusal, or that an admin
        was asked)."""
        before = len(self.notes())
        self.agent_writes(content)
        self.run_host(lambda: len(self.notes()) > before)
        return self.notes()[-1]

    def notes(self) -> list[str]:
        return [json.loads(r["content"])["text"] for r in self.inbound()
                if r["channel_type"] == "agent"]

    def approvals(self) -> list[dict]:
        return db_rows(self.store, "SELECT * FROM pending_approvals ORDER BY created_at")

    def cards(self) -> list[dict]:
        return [json.loads(r["content"]) for r in db_rows(self.store, 
            "SELECT * FROM channel_outbox WHERE idem_key LIKE 'card:appr-%' ORDER BY id")]


@pytest.fixture
def host(tmp_path, monkeypatch) -> Host:
    return Host(tmp_path, monkeypatch)


def card_text(card: dict) -> str:
    """What a channel shows: title, a blank line, the question (channels/text.Question)."""
    return f"{card['title']}\n\n{card['question']}"


def block(card: dict) -> str:
    """The code block of a card: the request, exactly."""
    m = FENCE.search(card["question"])
    assert m, card["question"]
    return m.group(1)


def read_back(shown: str) -> list[str]:
    """The values a line of visible forms stands for (an independent reader of
    `actions.shown`): bare words, or '…' with \\-escapes and ⟨N spaces⟩."""
    out, i = [], 0
    while i < len(shown):
        if shown[i] != "'":
            j = shown.find(" ", i)
            j = len(shown) if j < 0 else j
            out.append(shown[i:j])
            i = j + 1
            continue
        i += 1
        buf = []
        while shown[i] != "'":
            ch = shown[i]
            if ch == "\\":
                e = shown[i + 1]
                if e in "\\'":
                    buf.append(e)
                    i += 2
                elif e in "ntr":
                    buf.append({"n": "\n", "t": "\t", "r": "\r"}[e])
                    i += 2
                else:
                    width = {"x": 2, "u": 4, "U": 8}[e]
                    buf.append(chr(int(shown[i + 2:i + 2 + width], 16)))
                    i += 2 + width
            elif ch == "⟨":
                end = shown.index("⟩", i)
                count, word = shown[i + 1:end].split(" ")
                assert word == "spaces" and int(count) >= 2
                buf.append(" " * int(count))
                i = end + 1
            else:
                buf.append(ch)
                i += 1
        out.append("".join(buf))
        i += 1
        assert i >= len(shown) or shown[i] == " ", shown
        i += 1
    return out


def plainly_visible(line: str) -> bool:
    """One line, no backquote, no run of spaces, nothing invisible."""
    return ("`" not in line and "  " not in line
            and all(ch == " " or ch.isprintable() for ch in line)
            and not any(ch in actions.BLANK for ch in line))


def fits_every_platform(text: str) -> None:
    """Whole in one piece on Discord, in one Slack section block, in one Telegram message."""
    assert len(discord_markdown(text, 2000)) == 1
    assert len(slack_mrkdwn(text, 3000)) == 1
    assert len(telegram_html(text, 4096)) == 1


# ---- M3: the padded --name ------------------------------------------------------------------
def test_the_padded_name_attack_shows_the_budget_and_the_model(host):
    args = ["groups", "update", "--name", ATTACK_NAME, "--daily-token-budget", "0",
            "--model", "claude-opus-4-1"]
    resp = host.ncl(args)
    assert resp["status"] == "approval-pending", resp
    (card,) = host.cards()
    text = card_text(card)
    assert "--daily-token-budget 0" in text and "--model claude-opus-4-1" in text
    line = block(card)
    assert line.endswith(" --daily-token-budget 0 --model claude-opus-4-1"), line
    assert "⟨560 spaces⟩" in line and "'Friendly Helper\\n\\n(this only" in line
    # the newlines in --name do not make the card look like prose, the padding is gone
    assert "\n\n(this" not in card["question"] and "   " not in text
    assert plainly_visible(line)
    # what is shown reads back to exactly what is stored and will run
    (appr,) = host.approvals()
    stored = json.loads(appr["payload"])["args"]
    assert read_back(line) == ["ncl", *stored]
    assert stored == ["groups", "update", host.ag, *args[2:]]
    # every platform shows all of it (nothing cut at 600, nor at a platform limit)
    fits_every_platform(text)
    for piece in (discord_markdown(text, 2000)[0], slack_mrkdwn(text, 3000)[0],
                  telegram_html(text, 4096)[0].markup):
        assert "--daily-token-budget 0 --model claude-opus-4-1" in piece
    # and on approval exactly that runs
    approvals.decide(host.store, host.settings, appr["approval_id"], "approve", OWNER)
    cfg = host.store.container_config(host.ag)
    assert cfg["model"] == "claude-opus-4-1"
    assert host.store.agent_group(host.ag)["name"] == ATTACK_NAME


def test_control_and_invisible_characters_are_escaped_on_the_card(host):
    name = "a\tb\rc\x1b[2Jd\u202ee\u200bf\u3164g`h'i\\j⟨k"
    assert host.ncl(["groups", "update", "--name", name])["status"] == "approval-pending"
    (card,) = host.cards()
    line = block(card)
    assert plainly_visible(line)
    assert "'a\\tb\\rc\\x1b[2Jd\\u202ee\\u200bf\\u3164g\\x60h\\'i\\\\j\\u27e8k'" in line
    assert read_back(line)[-1] == name
    # the agent's own (approved) name is shown in its visible form too
    host.store.conn.execute("UPDATE agent_groups SET name=? WHERE id=?", ("x\n\n```y", host.ag))
    assert host.ncl(["groups", "update", "--name", "z"])["status"] == "approval-pending"
    assert host.cards()[-1]["question"].startswith("Agent 'x\\n\\n\\x60\\x60\\x60y' asks")


def test_an_over_long_request_is_refused_and_nothing_is_queued(host):
    before = db_rows(host.store, "SELECT * FROM container_configs")
    resp = host.ncl(["groups", "update", "--name", "x" * 999, "--model", "y" * 999])
    assert resp["status"] == "error"
    out = resp["output"]
    assert "too long to show whole on an approval card" in out and "nothing was asked" in out
    assert "\n" not in out and len(out) < 300
    # short as plain text, yet too long once escaped for Telegram's HTML and Slack's mrkdwn
    resp = host.ncl(["groups", "update", "--name", "&" * 999])
    assert resp["status"] == "error" and "once formatted for chat" in resp["output"]
    assert host.approvals() == [] and host.cards() == []
    assert db_rows(host.store, "SELECT * FROM container_configs") == before


def test_the_longest_request_that_fits_is_shown_whole(host):
    value = "v" * 1000
    args = ["groups", "update", "--name", value, "--model", "m" * 700]
    assert host.ncl(args)["status"] == "approval-pending"
    (card,) = host.cards()
    assert value in block(card) and block(card).endswith("m" * 700)
    fits_every_platform(card_text(card))


# ---- L5: MCP servers and package names -----------------------------------------------------
def test_an_mcp_servers_env_and_args_are_on_the_card(host):
    host.action({"action": "add_mcp_server", "name": "weather", "command": "npx",
                 "args": ["-y", "@modelcontextprotocol/server-weather"],
                 "env": {"LD_PRELOAD": "/tmp/evil.so", "NODE_OPTIONS": "--require /tmp/x.js"}})
    (card,) = host.cards()
    lines = block(card).split("\n")
    assert lines == ["command: npx",
                     "args: -y @modelcontextprotocol/server-weather",
                     "env: LD_PRELOAD=/tmp/evil.so NODE_OPTIONS='--require /tmp/x.js'"]
    assert all(plainly_visible(x) for x in lines)
    fits_every_platform(card_text(card))
    (appr,) = host.approvals()
    assert json.loads(appr["payload"])["env"] == {"LD_PRELOAD": "/tmp/evil.so",
                                                  "NODE_OPTIONS": "--require /tmp/x.js"}


def test_an_mcp_request_too_long_to_show_is_refused(host):
    note = host.action({"action": "add_mcp_server", "name": "big", "command": "x",
                        "args": ["a" * 100] * 30, "env": {}})
    assert "too long to show whole on an approval card" in note
    note = host.action({"action": "add_mcp_server", "name": "e", "command": "x",
                        "env": {"A B": "1"}})
    assert "invalid variable names" in note
    note = host.action({"action": "add_mcp_server", "name": "x\n", "command": "x"})
    assert "name must be" in note
    assert host.approvals() == [] and host.cards() == []


@pytest.mark.parametrize("key", ["apt", "npm"])
def test_a_trailing_newline_is_not_a_package_name(host, key):
    assert actions.APT_NAME.fullmatch("x\n") is None and actions.NPM_NAME.fullmatch("x\n") is None
    note = host.action({"action": "install_packages", key: ["curl\n"]})
    assert "invalid package names" in note
    assert host.approvals() == [] and host.cards() == []
    host.action({"action": "install_packages", key: ["curl"], "reason": "fetch\n\nAlso: ok"})
    (card,) = host.cards()
    assert f"{key}: curl" in block(card)
    assert "Its reason: 'fetch\\n\\nAlso: ok'" in card["question"]


# ---- property: every argument shown, or refused ---------------------------------------------
if given is not None:
    VALUE = st.text(st.characters(exclude_categories=("Cs",)), max_size=400) | st.text(
        st.sampled_from(" \n\t\r\u200b\u202e`'\\⟨⟩&<>*_[]()"), max_size=400)
    REQUEST = (st.builds(lambda name, rest: ["groups", "update", "--name", name, *rest],
                         VALUE, st.lists(st.sampled_from(["--model", "opus", "--provider",
                                                          "claude", "--daily-token-budget",
                                                          "0"]), max_size=4))
               | st.builds(lambda user: ["members", "add", user], VALUE)
               | st.lists(VALUE, max_size=6))

    @hsettings(max_examples=150, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])
    @given(args=REQUEST)
    def test_every_argument_is_on_the_card_or_the_request_is_refused(host, args):
        cards, appr = len(host.cards()), len(host.approvals())
        resp = host.ncl(args)
        event(resp["status"])
        if resp["status"] != "approval-pending":
            assert len(host.cards()) == cards and len(host.approvals()) == appr
            assert "\n" not in resp["output"] or resp["status"] == "ok"
            return
        card = host.cards()[-1]
        line = block(card)
        for a in args:
            assert actions.shown(a) in line
        stored = json.loads(host.approvals()[-1]["payload"])["args"]
        assert read_back(line) == ["ncl", *stored]
        assert plainly_visible(line)
        fits_every_platform(card_text(card))
else:
    def test_every_argument_is_on_the_card_or_the_request_is_refused():
        pytest.skip("hypothesis is not installed")


def test_shown_reads_back_exactly():
    for v in ["", " ", "a b", "a  b", "x" + " " * 9, "'", "\\", "\\x41", "⟨2 spaces⟩",
              "\x00\x7f\xa0\u2028\U0001f600", "plain-word_1.2@x:y,z/w=+%"]:
        assert read_back(agent_cli.shown(v)) == [v], v
