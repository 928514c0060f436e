"""Approvals (reference §10): who is asked, how the card reaches them, and what a click
does. Every click is checked: only the chosen approver or an admin of the agent group
may decide (the original's generic path did not check the clicker).

Three kinds share one card format (an `ask_question` card whose question id is the
approval id): agent requests (`pending_approvals`: install_packages, add_mcp_server),
unknown senders (`pending_sender_approvals`) and unknown chats
(`pending_channel_approvals`). The terminal answers them too:
`nanoclaw approvals list|approve|reject`.

Card ids are the host's (security review H3). An approval card's id is its approval id,
`appr-…`, `snd-…` or `chan-…` (`CARD_PREFIXES`); an agent's question card goes out under
a host-made `q-…` id (delivery, `Store.open_question_card`), whatever `questionId` the
agent wrote. So no card an agent can make carries an approval's id, a click carrying
one is only ever a decision (`cards.click`: the option must be one of that card's, and the
clicker its approver or an admin), and a click on a question card only ever answers
its agent.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from nanoclaw.config import Settings
from nanoclaw.db.session import SessionInbound, of
from nanoclaw.db.store import Store
from nanoclaw.errors import NotAllowed, NotFound, Refused
from nanoclaw.log import logger
from nanoclaw.util import iso, new_id, utcnow

APPROVE = [{"label": "Approve", "selectedLabel": "Approved", "value": "approve"},
           {"label": "Reject", "selectedLabel": "Rejected", "value": "reject"}]
EXPIRY = 24 * 3600.0


def pick_approvers(store: Store, agent_group_id: str | None) -> list[str]:
    """Scoped admins, then global admins, then owners; no duplicates."""
    return store.approvers(agent_group_id)


def dm_address(store: Store, user_id: str) -> tuple[str, str] | None:
    """(channel_type, platform_id) of a user's DM: the cache, else the channel's own
    convention (the terminal's owner chat; a platform user id elsewhere)."""
    ch, _, handle = user_id.partition(":")
    known = store.user_dm(user_id)
    if known:
        return known
    if not handle:
        return None
    if ch == "cli":
        return "cli", "local"
    return ch, f"@dm:{handle}"  # the channel worker resolves it with the adapter's open_dm


def choose(store: Store, agent_group_id: str | None, prefer_channel: str | None
           ) -> tuple[str, tuple[str, str]] | None:
    """The approver and their DM, preferring one on the same channel type."""
    cands = [(u, dm_address(store, u)) for u in pick_approvers(store, agent_group_id)]
    cands = [(u, a) for u, a in cands if a]
    for u, a in cands:
        if a[0] == prefer_channel:
            return u, a
    return cands[0] if cands else None


def send_card(store: Store, card_id: str, address: tuple[str, str], title: str, question: str,
              options: list[dict[str, str]], again: str | None = None) -> None:
    """Queue the card to `address` and its mirrors, once per card id; `again` (a fresh
    token) sends it once more, for an approval that stays open after a click."""
    store.enqueue_sends(card_sends(store, card_id, address, title, question, options, again))


def card_sends(store: Store, card_id: str, address: tuple[str, str], title: str, question: str,
          options: list[dict[str, str]], again: str | None = None) -> list[dict[str, Any]]:
    """The sends that ask a card's question (`send_card`'s), for a `Store` method that
    opens the approval and queues its cards in one transaction."""
    key = f"card:{card_id}" + (f":{again}" if again else "")
    return [{"idem_key": key + (f":{channel}" if n else ""), "channel_type": channel,
             "platform_id": platform_id, "thread_id": None, "kind": "chat-sdk",
             "content": {"type": "ask_question", "questionId": card_id, "title": title,
                         "question": question, "options": options}}
            for n, (channel, platform_id) in enumerate(mirrors(store, address))]


def mirrors(store: Store, address: tuple[str, str]) -> list[tuple[str, str]]:
    """Where a message to this DM goes: the local owner's terminal chat also reaches their
    web chat once they have used it (the page is the same person; the first answer wins)."""
    out = [address]
    if address == ("cli", "local") and store.messaging_group("web", "local") is not None:
        out.append(("web", "local"))
    return out


def may_decide(store: Store, clicker: str | None, approver: str | None,
               agent_group_id: str | None) -> bool:
    if not clicker:
        return False
    if clicker == approver:
        return True
    if agent_group_id:
        return store.is_admin(clicker, agent_group_id)
    return store.is_owner(clicker)


# ---- agent requests ---------------------------------------------------------------------
# Handlers run on approval: (store, settings, approval row, payload) -> note for the agent.
# The row's `decided_by` names who approved.
ON_APPROVE: dict[str, Callable[[Store, Settings, dict[str, Any], dict[str, Any]], str]] = {}


def on_approve(action: str,
               handler: Callable[[Store, Settings, dict[str, Any], dict[str, Any]], str]) -> None:
    """Register what runs when an admin approves `action`. One handler per action: a
    second, different one is a bug, refused at import rather than silently ignored."""
    if ON_APPROVE.get(action, handler) is not handler:
        raise ValueError(f"approval action {action!r} has a handler already")
    ON_APPROVE[action] = handler


def request(store: Store, settings: Settings, session: dict[str, Any], action: str,
            payload: dict[str, Any], title: str, question: str) -> str:
    """Queue an approval card for an agent's request; returns the approval id.

    Raises Refused when nobody can approve (the caller tells the agent)."""
    own = store.own_chat(session)
    pick = choose(store, session["agent_group_id"], own[0] if own else None)
    if pick is None:
        raise Refused("no admin or owner can be reached to approve this")
    approver, addr = pick
    aid = new_id("appr")
    store.open_request(
        {"approval_id": aid, "session_id": session["id"], "request_id": payload.get("requestId"),
         "action": action, "payload": json.dumps(payload), "created_at": utcnow(),
         "agent_group_id": session["agent_group_id"], "channel_type": addr[0],
         "platform_id": addr[1], "expires_at": iso(time.time() + EXPIRY), "title": title,
         "options_json": json.dumps(APPROVE), "approver_user_id": approver},
        card_sends(store, aid, addr, title, question, APPROVE))
    logger.info("approval {} for {} asked of {}", aid, action, approver)
    return aid


def tell_agent(store: Store, settings: Settings, session_id: str, text: str) -> None:
    s = store.session(session_id)
    if s is None:
        return
    SessionInbound(of(settings, s)).note(text)
    store.request_container(s["id"], "wake", "host note")


def card_options(store: Store, card_id: str) -> list[str] | None:
    """The option values an open approval's card offered; None when unknown (no such
    open approval, or a card recorded without its options)."""
    if card_id.startswith("chan-"):
        row = store.channel_approval(card_id[len("chan-"):])
    elif card_id.startswith("snd-"):
        row = store.sender_approval(card_id)
    else:
        row = store.pending_request(card_id)
    try:
        opts = json.loads(row["options_json"]) if row and row["options_json"] else None
    except ValueError:
        return None
    if not isinstance(opts, list):
        return None
    return [str(o.get("value")) for o in opts if isinstance(o, dict)]


def decide(store: Store, settings: Settings, approval_id: str, option: str,
           clicker: str | None) -> str:
    """Decide an agent's request (`appr-…`); returns what happened (one line). Sender and
    chat approvals are `registration`'s; `cards.decide` picks which by the card id.

    Raises NotAllowed for a clicker who may not decide, NotFound for an unknown
    or already decided approval."""
    row = store.pending_request(approval_id)
    if row is None:
        raise NotFound(f"no open approval {approval_id!r}")
    return _decide_request(store, settings, row, option, clicker)


def _decide_request(store: Store, settings: Settings, row: dict[str, Any], option: str,
                    clicker: str | None) -> str:
    if not may_decide(store, clicker, row["approver_user_id"], row["agent_group_id"]):
        logger.warning("{} may not decide approval {}; ignored", clicker, row["approval_id"])
        raise NotAllowed(f"{clicker} may not decide this approval")
    payload = json.loads(row["payload"] or "{}")
    approved = option == "approve"
    if not store.decide_request(row["approval_id"], approved, clicker):
        raise NotFound(f"no open approval {row['approval_id']!r}")  # decided meanwhile
    row = {**row, "decided_by": clicker}
    if not approved:
        tell_agent(store, settings, row["session_id"], f"Your request {row['action']!r} was"
                   " rejected by an admin.")
        return "rejected"
    handler = ON_APPROVE.get(row["action"])
    try:
        if handler is None:
            raise RuntimeError(f"no handler for {row['action']!r}")
        note = handler(store, settings, row, payload)
    except Exception as e:
        logger.error("approved {} failed: {}", row["action"], e)
        tell_agent(store, settings, row["session_id"], f"Your request {row['action']!r} was"
                   f" approved but failed: {e}")
        return "approved, but it failed"
    tell_agent(store, settings, row["session_id"], note)
    return "approved"


def expire(store: Store, settings: Settings, now: float) -> int:
    rows = store.expire_requests(iso(now))
    for r in rows:
        tell_agent(store, settings, r["session_id"],
                   f"Your request {r['action']!r} expired without an answer.")
    return len(rows)


def pending(store: Store) -> list[dict[str, Any]]:
    """Every open approval of every kind, for `nanoclaw approvals list`: the request
    whole (what the approver sees is what runs), as its one-line JSON."""
    out = [{"id": r["approval_id"], "kind": r["action"], "about": r["payload"],
            "created_at": r["created_at"]}
           for r in store.open_requests()]
    out += [{"id": r["id"], "kind": "sender", "about": f"{r['sender_identity']} →"
             f" {r['agent_group_id']}", "created_at": r["created_at"]}
            for r in store.open_sender_approvals()]
    out += [{"id": f"chan-{r['messaging_group_id']}", "kind": "channel",
             "about": r["messaging_group_id"], "created_at": r["created_at"]}
            for r in store.open_channel_approvals()]
    return out
