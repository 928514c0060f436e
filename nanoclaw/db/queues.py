"""The queues between workers in the central DB: platform events a channel stored for
the router (`inbound_events`), sends delivery queued for a channel (`channel_outbox`),
and the agents' question cards waiting for a click (`pending_questions`). A method that
queues work nudges the worker that takes it, after the commit. A mixin of `Store`."""

from __future__ import annotations

import json
from typing import Any

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import Queries, _insert_send
from nanoclaw.util import new_id, utcnow


class QueueQueries(Queries):
    # ---- agents' question cards (H3) ---------------------------------------------------
    def open_question_card(self, session_id: str, message_out_id: str, question_id: Any,
                           channel_type: str, platform_id: str, thread_id: str | None,
                           title: Any, options: Any, created_at: str) -> str:
        """Name an agent's question card with a host id (`q-…`) and remember whose it is;
        the same message asks once (a redelivery gets the same card id). The agent's own
        `questionId` is kept only to hand back with the answer: a card id is never
        something the agent chose, so it cannot name an approval or another card."""
        with atomic(self.conn):
            row = self.conn.execute(
                "SELECT card_id FROM pending_questions WHERE session_id=? AND message_out_id=?",
                (session_id, message_out_id)).fetchone()
            if row is not None:
                return row[0]
            card_id = new_id("q")
            self.conn.execute(
                "INSERT INTO pending_questions (card_id, question_id, session_id,"
                " message_out_id, platform_id, channel_type, thread_id, title, options_json,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (card_id, str(question_id or card_id), session_id, message_out_id, platform_id,
                 channel_type, thread_id, None if title is None else str(title),
                 json.dumps(options if isinstance(options, list) else []), created_at))
        return card_id

    def question_card(self, card_id: str) -> dict[str, Any] | None:
        """The open question card with this host card id."""
        return self._row("SELECT * FROM pending_questions WHERE card_id=?", (card_id,))

    def question_cards_asking(self, channel_type: str, platform_id: str,
                              question_id: str) -> list[dict[str, Any]]:
        """Open cards sent to one chat under an agent's own question id (for a click that
        names that id instead of the card's)."""
        return self._rows("SELECT * FROM pending_questions WHERE channel_type=? AND"
                          " platform_id=? AND question_id=?",
                          (channel_type, platform_id, question_id))

    def close_question_card(self, card_id: str) -> None:
        with atomic(self.conn):
            self.conn.execute("DELETE FROM pending_questions WHERE card_id=?", (card_id,))

    # ---- inbound events (channel → router) --------------------------------------------
    def enqueue_inbound(self, channel_type: str, platform_id: str, message_id: str,
                        payload: dict[str, Any], thread_id: str | None = None,
                        kind: str = "chat") -> tuple[int, bool]:
        """Store a platform event durably; (row id, False) if it was already stored."""
        with atomic(self.conn):
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO inbound_events (channel_type, platform_id, thread_id,"
                " message_id, kind, payload, received_at) VALUES (?,?,?,?,?,?,?)",
                (channel_type, platform_id, thread_id, message_id, kind, json.dumps(payload),
                 utcnow()))
            new = bool(cur.rowcount)
            row_id = cur.lastrowid if new else self.conn.execute(
                "SELECT id FROM inbound_events WHERE channel_type=? AND platform_id=?"
                " AND message_id=?", (channel_type, platform_id, message_id)).fetchone()[0]
        if new:
            self.nudge("router")
        return row_id, new  # type: ignore[return-value]

    def pending_inbound(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM inbound_events WHERE status='pending' ORDER BY id"
                          " LIMIT ?", (limit,))

    def mark_routed(self, event_id: int) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE inbound_events SET status='routed', routed_at=? WHERE id=?",
                              (utcnow(), event_id))

    def mark_inbound_error(self, event_id: int, error: str, final: bool) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "UPDATE inbound_events SET attempts=attempts+1, error=?, status=? WHERE id=?",
                (error, "failed" if final else "pending", event_id))

    # ---- channel outbox (delivery → channel) ------------------------------------------
    def enqueue_send(self, idem_key: str, channel_type: str, platform_id: str,
                     thread_id: str | None, kind: str, content: dict[str, Any],
                     session_id: str | None = None, message_out_id: str | None = None,
                     in_reply_to: str | None = None) -> bool:
        send = {"idem_key": idem_key, "channel_type": channel_type, "platform_id": platform_id,
                "thread_id": thread_id, "kind": kind, "content": content,
                "session_id": session_id, "message_out_id": message_out_id,
                "in_reply_to": in_reply_to}
        return bool(self.enqueue_sends([send]))

    def enqueue_sends(self, sends: list[dict[str, Any]]) -> int:
        """Queue several sends together (`enqueue_send`'s arguments as dicts), all or
        none; returns how many were new (a repeated idempotency key is skipped)."""
        with atomic(self.conn):
            new = [s["channel_type"] for s in sends if _insert_send(self.conn, s)]
        self._nudge_channels(new)
        return len(new)

    def due_sends(self, channel_type: str, limit: int = 100) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM channel_outbox WHERE channel_type=? AND status='pending'"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT ?",
            (channel_type, utcnow(), limit))

    def next_send_due(self, channel_type: str) -> str | None:
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM channel_outbox WHERE channel_type=?"
            " AND status='pending'", (channel_type,)).fetchone()
        return row[0]

    def begin_send(self, send_id: int) -> None:
        """An attempt is about to call the platform: from now until its result is stored,
        the send may have reached the platform (`attempt_at`, kept from the first)."""
        with atomic(self.conn):
            self.conn.execute("UPDATE channel_outbox SET attempt_at=COALESCE(attempt_at, ?)"
                              " WHERE id=?", (utcnow(), send_id))

    def record_part(self, send_id: int, platform_message_id: str) -> None:
        """One more part of a split send reached the platform (stored before the next)."""
        with atomic(self.conn):
            self.conn.execute("UPDATE channel_outbox SET parts=json_insert("
                              "COALESCE(parts, '[]'), '$[#]', ?) WHERE id=?",
                              (platform_message_id, send_id))

    def mark_sent(self, send_id: int, platform_message_id: str | None) -> None:
        with atomic(self.conn):
            self.conn.execute(
                "UPDATE channel_outbox SET status='sent', platform_message_id=?, sent_at=?,"
                " attempts=attempts+1, attempt_at=NULL WHERE id=?",
                (platform_message_id, utcnow(), send_id))
        self.nudge("delivery")  # it records the result in the session

    def mark_send_error(self, send_id: int, error: str, next_attempt_at: str | None) -> None:
        """Retry at next_attempt_at, or fail for good when it is None."""
        with atomic(self.conn):
            self.conn.execute(
                "UPDATE channel_outbox SET attempts=attempts+1, error=?, next_attempt_at=?,"
                " status=?, attempt_at=CASE WHEN ? THEN attempt_at END WHERE id=?",
                (error, next_attempt_at, "pending" if next_attempt_at else "failed",
                 next_attempt_at is not None, send_id))
        if next_attempt_at is None:
            self.nudge("delivery")  # it tells the agent

    def unrecorded_sends(self, limit: int = 200) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM channel_outbox WHERE recorded=0 AND status IN"
                          " ('sent','failed') ORDER BY id LIMIT ?", (limit,))

    def mark_recorded(self, send_id: int) -> None:
        with atomic(self.conn):
            self.conn.execute("UPDATE channel_outbox SET recorded=1 WHERE id=?", (send_id,))
