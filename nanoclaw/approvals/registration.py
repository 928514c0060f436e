"""Letting new people and new chats in (reference §10): an unknown sender on a
`request_approval` chat, or a mention in a chat no agent is wired to, becomes a card to
an approver. Allow/connect adds the member (and the wiring) and replays the original
message through the router; deny/reject forgets the request (a rejected chat is
marked `denied_at` and stays quiet). Only the chosen approver or an admin may decide.

"Connect new agent" asks the one who clicked for a name: their next direct message is
taken as it (`take_name`, which the router runs before anything else) and never reaches
an agent; the new agent group is created and the chat connected to it.

Each decision is one transaction (a `Store` method): checked first, then the approval is
closed and its effect written, all or nothing, so a failure leaves the approval open to
be decided again. An approval is opened together with its cards (`Store.open_…`), so
none is stored without its approver being asked. The approved message is replayed after the commit through the caller's
router (`replay`), which knows which channels keep threads.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from nanoclaw.approvals import requests as approvals
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.errors import NotAllowed, NotFound, Refused
from nanoclaw.log import logger
from nanoclaw.util import new_id, parse_iso, utcnow

ALLOW = [{"label": "Allow", "selectedLabel": "Allowed", "value": "allow"},
         {"label": "Deny", "selectedLabel": "Denied", "value": "deny"}]
CHANNEL_PREFIX = "chan-"
NAMING_TTL = 3600.0  # a "Connect new agent" click waits this long for the name

Replay = Callable[[dict[str, Any]], object]  # routes an `inbound_events`-shaped row


class StillOpen(Refused):
    """A decision that cannot be applied as asked: nothing was written and the approval
    stays open. The message (one line) says why, for the one who decided."""


def ask_sender(store: Store, ev_row: dict[str, Any], mg: dict[str, Any], agent_group_id: str,
               uid: str, name: str | None) -> bool:
    """Ask an approver to let `uid` talk to the agent; False if already asked or nobody can."""
    if store.sender_asked(mg["id"], uid):
        return False
    pick = approvals.choose(store, agent_group_id, mg["channel_type"])
    if pick is None:
        logger.warning("no approver for sender {} in {}", uid, mg["platform_id"])
        return False
    approver, addr = pick
    rid = new_id("snd")
    ag = store.agent_group(agent_group_id)
    question = (f"{name or uid} wants to talk to {ag['name'] if ag else agent_group_id}"
                f" in {mg['name'] or mg['platform_id']}. Allow?")
    return store.open_sender_approval(
        {"id": rid, "messaging_group_id": mg["id"], "agent_group_id": agent_group_id,
         "sender_identity": uid, "sender_name": name, "original_message": json.dumps(ev_row),
         "approver_user_id": approver, "created_at": utcnow(), "title": "New sender",
         "options_json": json.dumps(ALLOW)},
        approvals.card_sends(store, rid, addr, "New sender", question, ALLOW))


def ask_channel(store: Store, ev_row: dict[str, Any], mg: dict[str, Any]) -> bool:
    """Ask an owner/global admin which agent (if any) this new chat should talk to."""
    if mg["denied_at"] or store.chat_asked(mg["id"]):
        return False
    agents = store.agent_groups()
    pick = approvals.choose(store, None, mg["channel_type"])
    if not agents or pick is None:
        return False
    approver, addr = pick
    options = _chat_options(agents)
    return store.open_channel_approval(
        {"messaging_group_id": mg["id"], "original_message": json.dumps(ev_row),
         "approver_user_id": approver, "created_at": utcnow(), "title": "New chat",
         "options_json": json.dumps(options)},
        approvals.card_sends(store, CHANNEL_PREFIX + mg["id"], addr, "New chat",
                             _chat_question(mg), options))


def _chat_options(agents: list[dict[str, Any]]) -> list[dict[str, str]]:
    options = [{"label": f"Connect to {a['name']}", "selectedLabel": f"Connected to {a['name']}",
                "value": f"connect:{a['id']}"} for a in agents]
    options.append({"label": "Connect new agent", "selectedLabel": "Naming a new agent",
                    "value": "new"})
    options.append({"label": "Reject", "selectedLabel": "Rejected", "value": "reject"})
    return options


def _chat_question(mg: dict[str, Any]) -> str:
    return (f"A new {'group' if mg['is_group'] else 'direct'} chat on {mg['channel_type']}"
            f" ({mg['platform_id']}) mentioned the assistant.")


def decide(store: Store, settings: Settings, card_id: str, option: str,
           clicker: str | None, replay: Replay) -> str:
    """Decide a sender or chat approval; `replay` routes the approved message (the
    caller's router, which knows the threaded channels; passed in, as `routing` imports
    this module, review M4).

    Raises NotFound (unknown or already decided), NotAllowed (this clicker may
    not decide) or StillOpen (cannot be applied; nothing written, still open)."""
    if card_id.startswith(CHANNEL_PREFIX):
        return _decide_channel(store, settings, card_id[len(CHANNEL_PREFIX):], option, clicker,
                               replay)
    row = store.sender_approval(card_id)
    if row is None:
        raise NotFound(f"no open approval {card_id!r}")
    if not approvals.may_decide(store, clicker, row["approver_user_id"], row["agent_group_id"]):
        logger.warning("{} may not decide sender approval {}; ignored", clicker, card_id)
        raise NotAllowed(f"{clicker} may not decide this approval")
    if option not in ("allow", "approve"):
        if not store.deny_sender(card_id):
            raise NotFound(f"no open approval {card_id!r}")
        return "denied"
    if not store.admit_sender(card_id, clicker):  # closed and member added together
        raise NotFound(f"no open approval {card_id!r}")
    _replay(store, settings, row["original_message"], replay)
    return "allowed"


def _decide_channel(store: Store, settings: Settings, mg_id: str, option: str,
                    clicker: str | None, replay: Replay) -> str:
    row = store.channel_approval(mg_id)
    if row is None:
        raise NotFound(f"no open approval for chat {mg_id!r}")
    if not approvals.may_decide(store, clicker, row["approver_user_id"], None):
        logger.warning("{} may not decide channel approval {}; ignored", clicker, mg_id)
        raise NotAllowed(f"{clicker} may not decide this approval")
    mg = store.messaging_group_by_id(mg_id)
    if option == "new" and mg is not None and clicker:
        return _ask_name(store, row, mg, clicker)
    if not option.startswith("connect:") or mg is None:
        if not store.refuse_chat(mg_id):
            raise NotFound(f"no open approval for chat {mg_id!r}")
        return "rejected"
    ag = option.split(":", 1)[1]
    done = store.connect_chat(mg_id, ag, _wiring(mg), _sender(row, mg), clicker)
    if done == "closed":
        raise NotFound(f"no open approval for chat {mg_id!r}")
    if done == "no agent":
        # Kept open, not rejected: the chat did nothing wrong, an agent was removed after
        # the card went out. The one who clicked chooses again on a fresh card.
        _ask_again(store, row, mg, clicker)
        raise StillOpen(f"Not connected: the agent {_agent_named(row, option, ag)} no longer"
                        " exists (it was removed after this card was sent). The chat's"
                        " request is still open: choose again on the new card.")
    _replay(store, settings, row["original_message"], replay)
    return "connected"


def _agent_named(row: dict[str, Any], option: str, ag: str) -> str:
    """How the card named the agent of a `connect:` option: 'name' (id), or just the id."""
    try:
        opts = json.loads(row["options_json"] or "[]")
    except ValueError:
        opts = []
    for o in opts if isinstance(opts, list) else []:
        if isinstance(o, dict) and o.get("value") == option:
            label = str(o.get("label") or "")
            if label.startswith("Connect to "):
                return f"{label[len('Connect to '):]!r} ({ag})"
    return repr(ag)


def _ask_again(store: Store, row: dict[str, Any], mg: dict[str, Any],
               clicker: str | None) -> None:
    """A fresh card for a chat approval that stays open, offering today's agents: the
    card clicked is already marked as answered on the platform, so without a new one
    the approval could only be decided from the terminal."""
    options = _chat_options(store.agent_groups())
    addr = approvals.dm_address(store, clicker or row["approver_user_id"] or "")
    asks = approvals.card_sends(store, CHANNEL_PREFIX + mg["id"], addr, "New chat",
                                _chat_question(mg), options, again=new_id("a")) if addr else []
    store.reoffer_chat(mg["id"], options, asks)


def _ask_name(store: Store, row: dict[str, Any], mg: dict[str, Any], clicker: str) -> str:
    """Remember who names the new agent; ask them in their direct chat."""
    addr = approvals.dm_address(store, clicker)
    text = (f"What should the new agent for {mg['name'] or mg['platform_id']} be called?"
            " Send me its name here.")
    store.start_naming(mg["id"], clicker, [
        {"idem_key": f"name-ask:{mg['id']}:{channel}:{new_id('n')}", "channel_type": channel,
         "platform_id": platform_id, "kind": "chat", "content": {"text": text}}
        for channel, platform_id in (approvals.mirrors(store, addr) if addr else [])])
    return "naming"


def take_name(store: Store, settings: Settings, uid: str, mg: dict[str, Any],
              text: str, replay: Replay) -> bool:
    """A direct message from someone naming a new agent: create it, connect the waiting
    chat (one transaction), replay its message. True when the message was taken (it goes
    no further)."""
    if mg["is_group"]:
        return False
    row = store.naming_for(uid)
    if row is None:
        return False
    if time.time() - parse_iso(row["naming_at"]) > NAMING_TTL:  # asked too long ago: forget
        store.forget_naming(row["messaging_group_id"])
        return False
    from nanoclaw.agents.groups import ensure_group_folder, normalise_name

    reply = (mg["channel_type"], mg["platform_id"])
    name = normalise_name(text) if text.strip() else ""
    if not name or (name == "agent" and text.strip().lower() != "agent"):
        store.enqueue_send(f"name-bad:{new_id('n')}", *reply, None, "chat",
                           {"text": "That is not a usable name: use letters, digits, - or _."})
        return True
    chat = store.messaging_group_by_id(row["messaging_group_id"])
    if chat is None:
        store.drop_channel_approval(row["messaging_group_id"])
        return True
    made = store.create_agent_for_chat(chat["id"], uid, name, settings.provider, settings.model,
                                       _wiring(chat), _sender(row, chat))
    if made is None:  # decided meanwhile (another click, or the terminal): nothing written
        store.enqueue_send(f"name-late:{new_id('n')}", *reply, None, "chat",
                           {"text": "That chat was already decided; no agent was created."})
        return True
    ag, folder = made
    ensure_group_folder(settings, folder, name)  # after the commit: a re-run only adds it
    logger.info("agent group {} ({}) created by {} for chat {}", ag, name, uid, chat["id"])
    store.enqueue_send(f"name-done:{chat['id']}:{ag}", *reply, None, "chat",
                       {"text": f"Agent {name!r} created (groups/{folder}) and connected to"
                                f" {chat['name'] or chat['platform_id']}."})
    _replay(store, settings, row["original_message"], replay)
    return True


def _wiring(mg: dict[str, Any]) -> dict[str, Any]:
    """The registration defaults for a newly connected chat (`Store.wire`'s arguments)."""
    group = bool(mg["is_group"])
    return {"destination": (mg["name"] or mg["platform_id"]).lower()[:40],
            "engage_mode": "mention-sticky" if group else "pattern",
            "engage_pattern": None if group else ".", "sender_scope": "known",
            "ignored": "accumulate", "session_mode": "shared"}


def _sender(row: dict[str, Any], mg: dict[str, Any]) -> str | None:
    """The user who sent the message the approval keeps: admitted with the chat."""
    sender = json.loads(json.loads(row["original_message"])["payload"]).get("sender_id")
    if not sender:
        return None
    return sender if ":" in sender else f"{mg['channel_type']}:{sender}"


def _replay(store: Store, settings: Settings, original: str, replay: Replay) -> None:
    """Route the approved message, after the decision's commit."""
    replay(json.loads(original))
