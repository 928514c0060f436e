"""Which commands need an admin (reference §5). Who may talk to which agent is a read
of the central DB: `Store.can_access`, `is_admin`, `is_owner`, `may_send`.

Checks run on the host only; nothing the container says about identity is trusted.
The command gate normalises the first token (Unicode NFKC, case-folded, surrounding
space removed) so `/CLEAR`, ` /clear` and full-width look-alikes are judged as `/clear`.
"""

from __future__ import annotations

import unicodedata

from nanoclaw.db.store import Store

DROPPED = frozenset({"/help", "/login", "/logout", "/doctor", "/config", "/remote-control"})
ADMIN_ONLY = frozenset({"/clear", "/compact", "/context", "/cost", "/files"})


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
    if cmd in ADMIN_ONLY and not (uid and store.is_admin(uid, agent_group_id)):
        return f"Permission denied: {cmd} requires admin access."
    return None
