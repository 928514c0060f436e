"""Approvals: an agent's requests (`pending_approvals`), unknown senders
(`pending_sender_approvals`) and unknown chats (`pending_channel_approvals`), and the
decisions that close them. A mixin of `Store`.

An approval is opened together with its cards (the `channel_outbox` rows that ask the
approver), so there is never an approval nobody was asked about, nor a card for an
approval that was not stored. A decision that writes several rows is one transaction
built from the `_…` statements in `rows.py`: checked first, then closed and its effect
written, all or nothing; a failure leaves the approval open to be decided again.
"""

from __future__ import annotations

import json
from typing import Any

from nanoclaw.db.central import atomic
from nanoclaw.db.rows import (Queries, _add_member, _free_folder, _insert_agent_group,
                              _insert_send, _wire_rows)
from nanoclaw.util import utcnow

Sends = list[dict[str, Any]]  # `channel_outbox` rows: `Store.enqueue_send`'s arguments


def _queue(conn: Any, cards: Sends) -> list[str]:
    """Queue an approval's cards inside the caller's transaction; the channel types of
    the new ones (to nudge after the commit)."""
    return [s["channel_type"] for s in cards if _insert_send(conn, s)]


class ApprovalQueries(Queries):
    # ---- an agent's requests (install_packages, add_mcp_server, …) --------------------
    def open_request(self, approval: dict[str, Any], cards: Sends) -> None:
        """Store an agent's request for approval (`approval`: the `pending_approvals`
        columns) and queue its cards, together."""
        with atomic(self.conn):
            self.conn.execute(
                "INSERT INTO pending_approvals (approval_id, session_id, request_id, action,"
                " payload, created_at, agent_group_id, channel_type, platform_id, expires_at,"
                " status, title, options_json, approver_user_id) VALUES (:approval_id,"
                " :session_id, :request_id, :action, :payload, :created_at, :agent_group_id,"
                " :channel_type, :platform_id, :expires_at, 'pending', :title, :options_json,"
                " :approver_user_id)", approval)
            new = _queue(self.conn, cards)
        self._nudge_channels(new)

    def pending_request(self, approval_id: str) -> dict[str, Any] | None:
        """An agent's request while it waits for a decision."""
        return self._row("SELECT * FROM pending_approvals WHERE approval_id=? AND"
                         " status='pending'", (approval_id,))

    def decide_request(self, approval_id: str, approved: bool, by: str | None) -> bool:
        """Close a waiting request as approved or rejected by `by`; False (nothing
        written) when it no longer waits (decided or expired meanwhile)."""
        with atomic(self.conn):
            cur = self.conn.execute(
                "UPDATE pending_approvals SET status=?, decided_by=?, decided_at=? WHERE"
                " approval_id=? AND status='pending'",
                ("approved" if approved else "rejected", by, utcnow(), approval_id))
        return bool(cur.rowcount)

    def expire_requests(self, now_iso: str) -> list[dict[str, Any]]:
        """Close every request that waited past its expiry; returns them."""
        with atomic(self.conn):
            rows = self._rows("SELECT * FROM pending_approvals WHERE status='pending' AND"
                              " expires_at < ?", (now_iso,))
            self.conn.executemany("UPDATE pending_approvals SET status='expired' WHERE"
                                  " approval_id=?", [(r["approval_id"],) for r in rows])
        return rows

    def open_requests(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM pending_approvals WHERE status='pending'")

    def approval_card(self, card_id: str) -> dict[str, Any] | None:
        """The newest card the host queued for an approval (its content), on any channel."""
        row = self._row("SELECT content FROM channel_outbox WHERE session_id IS NULL AND"
                        " json_extract(content, '$.questionId')=? ORDER BY id DESC LIMIT 1",
                        (card_id,))
        try:
            return json.loads(row["content"]) if row else None
        except ValueError:
            return None

    # ---- unknown senders ----------------------------------------------------------------
    def sender_asked(self, messaging_group_id: str, sender: str) -> bool:
        """Whether an approval for this sender in this chat is open."""
        return self._exists("SELECT 1 FROM pending_sender_approvals WHERE"
                            " messaging_group_id=? AND sender_identity=?",
                            (messaging_group_id, sender))

    def open_sender_approval(self, approval: dict[str, Any], cards: Sends) -> bool:
        """Store an approval for an unknown sender (`approval`: the columns) and queue its
        cards, together; False (nothing written) when one is already open."""
        with atomic(self.conn):
            if self.sender_asked(approval["messaging_group_id"], approval["sender_identity"]):
                return False
            self.conn.execute(
                "INSERT INTO pending_sender_approvals (id, messaging_group_id, agent_group_id,"
                " sender_identity, sender_name, original_message, approver_user_id,"
                " created_at, title, options_json) VALUES (:id, :messaging_group_id,"
                " :agent_group_id, :sender_identity, :sender_name, :original_message,"
                " :approver_user_id, :created_at, :title, :options_json)", approval)
            new = _queue(self.conn, cards)
        self._nudge_channels(new)
        return True

    def sender_approval(self, approval_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM pending_sender_approvals WHERE id=?", (approval_id,))

    def open_sender_approvals(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM pending_sender_approvals")

    def admit_sender(self, approval_id: str, added_by: str | None) -> bool:
        """Close a sender approval as allowed and make the sender a member, together;
        False (nothing written) when it was already closed."""
        with atomic(self.conn):
            row = self.conn.execute("SELECT sender_identity, agent_group_id FROM"
                                    " pending_sender_approvals WHERE id=?",
                                    (approval_id,)).fetchone()
            if row is None:
                return False
            self.conn.execute("DELETE FROM pending_sender_approvals WHERE id=?", (approval_id,))
            _add_member(self.conn, row[0], row[1], added_by)
        return True

    def deny_sender(self, approval_id: str) -> bool:
        """Close a sender approval as denied; False when it was already closed."""
        with atomic(self.conn):
            cur = self.conn.execute("DELETE FROM pending_sender_approvals WHERE id=?",
                                    (approval_id,))
        return bool(cur.rowcount)

    # ---- unknown chats ------------------------------------------------------------------
    def chat_asked(self, messaging_group_id: str) -> bool:
        """Whether an approval for this chat is open."""
        return self._exists("SELECT 1 FROM pending_channel_approvals WHERE"
                            " messaging_group_id=?", (messaging_group_id,))

    def open_channel_approval(self, approval: dict[str, Any], cards: Sends) -> bool:
        """Store an approval for a new chat (`approval`: the columns) and queue its cards,
        together; False (nothing written) when one is already open."""
        with atomic(self.conn):
            if self.chat_asked(approval["messaging_group_id"]):
                return False
            self.conn.execute(
                "INSERT INTO pending_channel_approvals (messaging_group_id, agent_group_id,"
                " original_message, approver_user_id, created_at, title, options_json)"
                " VALUES (:messaging_group_id, NULL, :original_message, :approver_user_id,"
                " :created_at, :title, :options_json)", approval)
            new = _queue(self.conn, cards)
        self._nudge_channels(new)
        return True

    def channel_approval(self, messaging_group_id: str) -> dict[str, Any] | None:
        return self._row("SELECT * FROM pending_channel_approvals WHERE messaging_group_id=?",
                         (messaging_group_id,))

    def open_channel_approvals(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM pending_channel_approvals")

    def reoffer_chat(self, messaging_group_id: str, options: list[dict[str, str]],
                     cards: Sends) -> None:
        """A chat approval that stays open offers `options` from now on, on fresh cards."""
        with atomic(self.conn):
            self.conn.execute("UPDATE pending_channel_approvals SET options_json=? WHERE"
                              " messaging_group_id=?", (json.dumps(options), messaging_group_id))
            new = _queue(self.conn, cards)
        self._nudge_channels(new)

    def start_naming(self, messaging_group_id: str, by: str, asks: Sends) -> None:
        """"Connect new agent": the chat's approval waits for `by`'s next direct message
        (the name), and the asks for it are queued, together."""
        with atomic(self.conn):
            self.conn.execute("UPDATE pending_channel_approvals SET naming_by=?, naming_at=?"
                              " WHERE messaging_group_id=?", (by, utcnow(), messaging_group_id))
            new = _queue(self.conn, asks)
        self._nudge_channels(new)

    def naming_for(self, user_id: str) -> dict[str, Any] | None:
        """The chat approval waiting for this user to name a new agent (the oldest)."""
        return self._row("SELECT * FROM pending_channel_approvals WHERE naming_by=? ORDER BY"
                         " naming_at LIMIT 1", (user_id,))

    def forget_naming(self, messaging_group_id: str) -> None:
        """The approval no longer waits for a name (asked too long ago); it stays open."""
        with atomic(self.conn):
            self.conn.execute("UPDATE pending_channel_approvals SET naming_by=NULL,"
                              " naming_at=NULL WHERE messaging_group_id=?", (messaging_group_id,))

    def drop_channel_approval(self, messaging_group_id: str) -> None:
        """Forget a chat's approval (the chat itself is gone)."""
        with atomic(self.conn):
            self.conn.execute("DELETE FROM pending_channel_approvals WHERE messaging_group_id=?",
                              (messaging_group_id,))

    def refuse_chat(self, messaging_group_id: str) -> bool:
        """Close a chat's approval as rejected and mark the chat denied (it stays quiet);
        False (nothing written) when it was already closed."""
        with atomic(self.conn):
            cur = self.conn.execute("DELETE FROM pending_channel_approvals WHERE"
                                    " messaging_group_id=?", (messaging_group_id,))
            if not cur.rowcount:
                return False
            self.conn.execute("UPDATE messaging_groups SET denied_at=? WHERE id=?",
                              (utcnow(), messaging_group_id))
        return True

    def connect_chat(self, messaging_group_id: str, agent_group_id: str,
                     wiring: dict[str, Any], member: str | None,
                     added_by: str | None) -> str:
        """Close a chat's approval by wiring the chat to an existing agent (`wiring`: the
        keyword arguments of `wire`) and admitting `member`, all or nothing. Checked first,
        inside the same transaction: "no agent" (the agent group is gone) and "closed"
        (already decided) write nothing and leave the approval as it was; else
        "connected" (a chat wired to the agent meanwhile, say from the terminal, keeps
        that wiring)."""
        with atomic(self.conn):
            if self.conn.execute("SELECT 1 FROM agent_groups WHERE id=?",
                                 (agent_group_id,)).fetchone() is None:
                return "no agent"
            cur = self.conn.execute("DELETE FROM pending_channel_approvals WHERE"
                                    " messaging_group_id=?", (messaging_group_id,))
            if not cur.rowcount:
                return "closed"
            if not self.conn.execute("SELECT 1 FROM messaging_group_agents WHERE"
                                     " messaging_group_id=? AND agent_group_id=?",
                                     (messaging_group_id, agent_group_id)).fetchone():
                _wire_rows(self.conn, messaging_group_id, agent_group_id, **wiring)
            if member:
                _add_member(self.conn, member, agent_group_id, added_by)
        return "connected"

    def create_agent_for_chat(self, messaging_group_id: str, named_by: str, name: str,
                              provider: str, model: str, wiring: dict[str, Any],
                              member: str | None) -> tuple[str, str] | None:
        """"Connect new agent", once named: close the chat's approval (only while it still
        waits for `named_by`'s name), create agent group `name` in a free folder, wire the
        chat to it and admit `member`, all or nothing. (id, folder), or None (nothing
        written) when the approval no longer waits for this name. The folder on disk is
        the caller's, after the commit."""
        with atomic(self.conn):
            cur = self.conn.execute("DELETE FROM pending_channel_approvals WHERE"
                                    " messaging_group_id=? AND naming_by=?",
                                    (messaging_group_id, named_by))
            if not cur.rowcount:
                return None
            folder = _free_folder(self.conn, name)
            ag = _insert_agent_group(self.conn, name, folder, provider, model, name)
            _wire_rows(self.conn, messaging_group_id, ag, **wiring)
            if member:
                _add_member(self.conn, member, ag, named_by)
        return ag, folder
