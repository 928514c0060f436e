"""Who may talk to which agent, and which commands need an admin (reference §5).

Checks run on the host only; nothing the container says about identity is trusted.
The command gate normalises the first token (Unicode NFKC, case-folded, surrounding
space removed) so `/CLEAR`, ` /clear` and full-width look-alikes are judged as `/clear`.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from nanoclaw.store import Store

DROPPED = frozenset({"/help", "/login", "/logout", "/doctor", "/config", "/remote-control"})
ADMIN_ONLY = frozenset({"/clear", "/compact", "/context", "/cost", "/files"})


def is_owner(store: Store, uid: str) -> bool:
    return store.q1("SELECT 1 AS x FROM user_roles WHERE user_id=? AND role='owner'", (uid,)) is not None


def is_admin(store: Store, uid: str, agent_group_id: str) -> bool:
    """Owner, global admin, or admin of this agent group."""
    return store.q1(
        "SELECT 1 AS x FROM user_roles WHERE user_id=? AND (role='owner' OR (role='admin' AND"
        " (agent_group_id IS NULL OR agent_group_id=?)))", (uid, agent_group_id)) is not None


def can_access(store: Store, uid: str | None, agent_group_id: str) -> bool:
    """unknown → deny; owner/global admin/group admin/member → allow; else deny."""
    if not uid:
        return False
    if is_admin(store, uid, agent_group_id):
        return True
    return store.q1("SELECT 1 AS x FROM agent_group_members WHERE user_id=? AND agent_group_id=?",
                    (uid, agent_group_id)) is not None


def command_of(text: str) -> str | None:
    t = unicodedata.normalize("NFKC", text).strip()
    if not t.startswith("/"):
        return None
    return t.split(None, 1)[0].casefold()


def command_gate(store: Store, text: str, uid: str | None, agent_group_id: str) -> str | None:
    """None: pass to the agent; "drop": swallow silently; other text: the denial reply."""
    cmd = command_of(text)
    if cmd is None:
        return None
    if cmd in DROPPED:
        return "drop"
    if cmd in ADMIN_ONLY and not (uid and is_admin(store, uid, agent_group_id)):
        return f"Permission denied: {cmd} requires admin access."
    return None


def may_send(store: Store, session: dict[str, Any], channel_type: str | None,
             platform_id: str | None) -> bool:
    """May something be sent to this chat on behalf of this session? Its own chat, or a
    chat its agent group has a destination for (the ACL). Applies to the agent's output
    and to every message the host writes for the session alike."""
    if not channel_type or not platform_id:
        return False
    if store.own_chat(session) == (channel_type, platform_id):
        return True
    return store.q1(
        "SELECT 1 AS x FROM agent_destinations d JOIN messaging_groups m ON m.id=d.target_id"
        " WHERE d.agent_group_id=? AND d.target_type='channel' AND m.channel_type=?"
        " AND m.platform_id=?", (session["agent_group_id"], channel_type, platform_id)) is not None
