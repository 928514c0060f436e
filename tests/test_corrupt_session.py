"""A session DB the host finds damaged (`inbound.db`: not a database, or a malformed
page) is quarantined: its agent is stopped, the file set aside under a name that says
so, the chat told in one clear message, and the conversation carries on from the
message that found it; every other session carries on untouched."""

from __future__ import annotations

from pathlib import Path

from conftest import wait_for

from fakes.hosts import error_log


def _inbound(h, chat: str) -> Path:
    row = h.q("SELECT s.* FROM sessions s JOIN messaging_groups m ON m.id=s.messaging_group_id"
              " WHERE m.platform_id=?", (chat,))[0]
    (db,) = list((h.base / "data").rglob(f"{row['id']}/db/inbound.db"))
    return db


def test_a_damaged_inbound_db_is_set_aside_the_chat_told_and_others_carry_on(host_factory):
    h = host_factory("corrupt").start()
    a, b = h.client("alpha"), h.client("beta")
    a.wait_reply(a.send("hello a"))
    b.wait_reply(b.send("hello b"))
    db = _inbound(h, "alpha")
    with open(db, "r+b") as f:  # the header and the first pages: no longer a database
        f.write(b"\x00garbage" * 512)
    mid = a.send("are you there")
    try:
        notice = wait_for(lambda: next((r for r in a.snapshot()
                                        if "damaged" in r.get("text", "")), None), 60,
                          what="the chat told")
    except AssertionError:
        raise AssertionError(error_log(h)[-3000:]) from None
    assert "inbound.db" in notice["text"] and "set aside" in notice["text"]
    assert a.wait_reply(mid, 60)["text"] == "echo: are you there"  # carries on from it
    aside = list(db.parent.glob("inbound.db.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"\x00garbage")
    b.wait_reply(b.send("still fine b"))  # the other session never noticed
    assert a.wait_reply(a.send("and after"), 60)["text"] == "echo: and after"
    assert "quarantined" in error_log(h) and len([r for r in a.snapshot()
                                                  if "damaged" in r.get("text", "")]) == 1
