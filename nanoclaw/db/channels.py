"""The central-DB statements a channel runner runs on its own behalf: the cards it sent,
its DM chats, its parked sends. A mixin of `Store` (one class per DB file, split by
table group so no file grows past a screenful of intents)."""

from __future__ import annotations

import json
from typing import Any

from nanoclaw.db.rows import Queries
from nanoclaw.util import utcnow


class ChannelQueries(Queries):

    def sent_cards(self, channel_type: str, card_id: str, host_only: bool) -> list[dict[str, Any]]:
        """The cards queued to this channel under a card id, newest first; `host_only`:
        only the host's own (no session), never one an agent wrote."""
        only = " AND session_id IS NULL" if host_only else ""
        return self._rows(
            "SELECT platform_id, content FROM channel_outbox WHERE channel_type=? AND"
            f" json_extract(content, '$.questionId')=?{only} ORDER BY id DESC",
            (channel_type, card_id))

    def due_sends_at(self, channel_type: str, now: str, limit: int = 100) -> list[dict[str, Any]]:
        """This channel's pending sends due at `now` (an ISO stamp: the runner's clock),
        oldest first."""
        return self._rows(
            "SELECT * FROM channel_outbox WHERE channel_type=? AND status='pending'"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT ?",
            (channel_type, now, limit))

    def chat_history(self, channel_type: str, limit: int) -> list[dict[str, Any]]:
        """A channel's recent conversation, newest first: what users said (`dir` 'in':
        inbound events, `body` their payload) and what was sent ('out': sent rows,
        `body` their content), each with `at`, `platform_id`, `id` and `kind`."""
        return self._rows(
            "SELECT * FROM (SELECT received_at AS at, platform_id, 'in' AS dir, message_id AS id,"
            " kind, payload AS body FROM inbound_events WHERE channel_type=? UNION ALL"
            " SELECT COALESCE(sent_at, created_at), platform_id, 'out', idem_key, kind, content"
            " FROM channel_outbox WHERE channel_type=? AND status='sent')"
            " ORDER BY at DESC LIMIT ?", (channel_type, channel_type, limit))

    def send_untried_now(self, channel_type: str, platform_id: str | None = None) -> None:
        """Sends not yet tried (for one chat, or all) are due now: the channel is back."""
        with_pid = " AND platform_id=?" if platform_id else ""
        args: tuple = (channel_type, platform_id) if platform_id else (channel_type,)
        self.conn.execute(
            "UPDATE channel_outbox SET next_attempt_at=NULL WHERE channel_type=? AND"
            f" status='pending' AND attempts=0{with_pid}", args)

    def park_send(self, send_id: int, until: str) -> None:
        """Put a send off without counting an attempt (the channel is not connected)."""
        self.conn.execute("UPDATE channel_outbox SET next_attempt_at=? WHERE id=?",
                          (until, send_id))

    def dm_chat(self, user_id: str, channel_type: str) -> str | None:
        """The platform id of a user's DM chat on a channel, once a send resolved it."""
        row = self._row("SELECT m.platform_id FROM user_dms d JOIN messaging_groups m ON"
                      " m.id=d.messaging_group_id WHERE d.user_id=? AND d.channel_type=?",
                      (user_id, channel_type))
        return row["platform_id"] if row else None

    def remember_dm(self, user_id: str, channel_type: str, messaging_group_id: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO user_dms (user_id, channel_type, messaging_group_id,"
            " resolved_at) VALUES (?,?,?,?)", (user_id, channel_type, messaging_group_id,
                                              utcnow()))

    def is_wired(self, channel_type: str, platform_id: str) -> bool:
        """Whether a chat talks to any agent."""
        return self._row(
            "SELECT 1 AS x FROM messaging_groups m JOIN messaging_group_agents w ON"
            " w.messaging_group_id=m.id WHERE m.channel_type=? AND m.platform_id=?",
            (channel_type, platform_id)) is not None

    def providers_in_use(self) -> list[str]:
        """Every agent group's provider (its container config's, else its own)."""
        return [str(r["p"]) for r in self._rows(
            "SELECT DISTINCT COALESCE(NULLIF(c.provider, ''), g.agent_provider) AS p"
            " FROM agent_groups g LEFT JOIN container_configs c ON c.agent_group_id = g.id")
            if r["p"]]

    def sent_card(self, channel_type: str, card_id: str, platform_id: str | None,
                  host_only: bool) -> dict[str, Any] | None:
        """The card this channel sent under a host card id (its outbound content), or
        None. Given the chat a click came from, only a card sent to that chat or to a
        cold DM (`@dm:<handle>`) that a send resolved to it (H3: a click resolves to the
        card it was made on, never to another card's options)."""
        for r in self.sent_cards(channel_type, card_id, host_only):
            sent_to = r["platform_id"]
            if platform_id is None or sent_to == platform_id:
                return json.loads(r["content"])
            if sent_to.startswith("@dm:"):
                handle = sent_to[4:]
                uid = handle if ":" in handle else f"{channel_type}:{handle}"
                if self.dm_chat(uid, channel_type) == platform_id:
                    return json.loads(r["content"])
        return None

    def inbound_seen(self, channel_type: str, platform_id: str, message_id: str) -> bool:
        """Whether this platform event is stored already (a redelivery)."""
        return self._exists("SELECT 1 FROM inbound_events WHERE channel_type=? AND"
                            " platform_id=? AND message_id=?",
                            (channel_type, platform_id, message_id))

    def inbound_payload(self, channel_type: str, platform_id: str,
                        message_id: str) -> dict[str, Any] | None:
        """What a chat's message carried, as stored (email finds the subject it answers)."""
        row = self._row("SELECT payload FROM inbound_events WHERE channel_type=? AND"
                        " platform_id=? AND message_id=?", (channel_type, platform_id, message_id))
        try:
            got = json.loads(row["payload"]) if row else None
        except ValueError:
            return None
        return got if isinstance(got, dict) else None

    def recent_texts(self, n: int = 100) -> list[str]:
        """What people said last: the text of the last `n` chat events (doctor's CJK
        check)."""
        out = []
        for (payload,) in self.conn.execute("SELECT payload FROM inbound_events WHERE"
                                            " kind='chat' ORDER BY id DESC LIMIT ?", (n,)):
            try:
                text = json.loads(payload).get("text")
            except (ValueError, AttributeError):
                continue
            if isinstance(text, str):
                out.append(text)
        return out

    def last_inbound_id(self, channel_type: str, platform_id: str) -> str | None:
        """The platform id of the last message a chat sent us."""
        row = self._row("SELECT message_id FROM inbound_events WHERE channel_type=? AND"
                        " platform_id=? AND kind='chat' ORDER BY id DESC LIMIT 1",
                        (channel_type, platform_id))
        return row["message_id"] if row else None

    def sent_content(self, channel_type: str, platform_message_id: str) -> dict[str, Any] | None:
        """What we sent as this platform message (a reply or reaction names it)."""
        row = self._row("SELECT content FROM channel_outbox WHERE channel_type=? AND"
                        " platform_message_id=? ORDER BY id DESC LIMIT 1",
                        (channel_type, platform_message_id))
        try:
            return json.loads(row["content"]) if row else None
        except ValueError:
            return None

    def latest_sent_question(self, channel_type: str, platform_id: str) -> dict[str, Any] | None:
        """The last question card sent to a chat (a bare number answers it); one still
        marked pending counts, as the answer can outrun the send's own bookkeeping."""
        row = self._row("SELECT content FROM channel_outbox WHERE channel_type=? AND"
                        " platform_id=? AND status IN ('pending', 'sent') AND"
                        " json_extract(content, '$.type')='ask_question' ORDER BY id DESC"
                        " LIMIT 1", (channel_type, platform_id))
        try:
            return json.loads(row["content"]) if row else None
        except ValueError:
            return None

    def sent_card_message_id(self, channel_type: str, question_id: str,
                             platform_id: str) -> str | None:
        """The platform message id of the card sent to a chat under that id (to edit it)."""
        row = self._row("SELECT platform_message_id FROM channel_outbox WHERE channel_type=?"
                        " AND platform_id=? AND status='sent' AND"
                        " json_extract(content, '$.questionId')=? ORDER BY id DESC LIMIT 1",
                        (channel_type, platform_id, question_id))
        return row["platform_message_id"] if row else None

    def card_answered(self, channel_type: str, platform_id: str, question_id: str) -> bool:
        """Whether a click (or a number) answering this card in that chat is stored."""
        return self._exists("SELECT 1 FROM inbound_events WHERE channel_type=? AND"
                            " platform_id=? AND kind='action' AND"
                            " json_extract(payload, '$.question_id')=?",
                            (channel_type, platform_id, question_id))
