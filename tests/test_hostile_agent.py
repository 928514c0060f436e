"""The hostile-agent contract, on every runtime (process, bwrap, docker): while the host
serves the session, its agent replaces every file and folder the host touches in its
session and group folders — with symlinks (to a canary outside `data/`, to `/`, to
another session), FIFOs, huge files and a hostile SQLite file. Afterwards the canary is
unchanged and unread, nothing outside the session changed owner, the other session was
answered on time throughout, no worker crashed, and the attacked session starts afresh.

In the process runtime the agent is the host's own user (no isolation, by design): its
own runner reads its memory as that user, so there it links no memory file to the
canary and leaves the host's `db/` alone; in the sandboxes it does both, and fails at
the second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import wait_for

from attack_kit import Canary, delivered, first_session, inside

SWAP = r'''
G = os.environ.get("NANOCLAW_GROUP_DIR") or os.getcwd()

def clear(p):
    if os.path.islink(p) or (os.path.lexists(p) and not os.path.isdir(p)):
        os.unlink(p)
    elif os.path.isdir(p):
        shutil.rmtree(p)

def swap(p, kind, target=None):
    try:
        clear(p)
        if kind == "link":
            os.symlink(target, p)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "huge":
            with open(p, "wb") as f:
                f.truncate(3 << 30)
        return "done"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

res = {}
# files to send first: a huge one, a FIFO, a link to the canary
for oid, name, kind, target in (("m", "huge.bin", "huge", None), ("m2", "pipe", "fifo", None),
                                ("m3", "note.txt", "link", CANARY_FILE)):
    os.makedirs(os.path.join(WS, "outbox", oid), exist_ok=True)
    res[oid] = swap(os.path.join(WS, "outbox", oid, name), kind, target)
out("m", {"text": "files", "files": ["huge.bin"]}, "cli", "local")
out("m2", {"text": "files", "files": ["pipe"]}, "cli", "local")
out("m3", {"text": "files", "files": ["note.txt"]}, "agent", ME)
time.sleep(1)
# every entry of ours the host touches
for name, kind, target in ((".heartbeat", "link", CANARY_FILE), ("inbox", "link", OTHER_INBOX),
                           (".nudge-host.sock", "link", CANARY_FILE),
                           (".nudge-agent.sock", "fifo", None), ("extra", "link", CANARY_DIR),
                           ("global", "link", "/"), ("agent", "link", CANARY_DIR)):
    res["ws:" + name] = swap(os.path.join(WS, name), kind, target)
for name, kind, target in ((("CLAUDE.md", "link", CANARY_FILE),) if SANDBOXED else ()) + (
                           ("container.json", "link", CANARY_FILE),
                           ("container.json.tmp", "link", CANARY_FILE),
                           ("conversations", "fifo", None)):
    res["group:" + name] = swap(os.path.join(G, name), kind, target)
if SANDBOXED:
    res["db:inbound"] = attempt(lambda: (os.unlink(os.path.join(DB, "inbound.db")),
                                         os.symlink(CANARY_FILE, os.path.join(DB, "inbound.db"))))
    res["db:journal"] = attempt(lambda: os.unlink(os.path.join(DB, "outbound.db-journal")))
    res["db:config"] = attempt(lambda: open(os.path.join(DB, "container.json"), "w").close())
out("m4", {"text": "to my own chat after the swaps"}, "cli", "local")
report("swap", res)
'''

POISON = r'''
c = sqlite3.connect(os.path.join(DB, "outbound.db"), isolation_level=None, timeout=10)
c.execute("PRAGMA journal_mode=PERSIST")
c.execute("CREATE TRIGGER t AFTER INSERT ON processing_ack BEGIN"
          " SELECT randomblob(100000000); END")
c.execute("CREATE TABLE big (x)")
c.close()
report("poison", "ok")
'''


@pytest.fixture(params=["process", "bwrap", "docker"])
def make_host(request, host_factory):
    if request.param == "docker":
        request.getfixturevalue("docker_client")
        request.getfixturevalue("agent_image")
    elif request.param == "bwrap":
        request.getfixturevalue("bwrap_works")
    return lambda: host_factory(request.param, NANOCLAW_RUNTIME=request.param), request.param


def _owners(*tops: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for top in tops:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            st = p.lstat()
            out[str(p)] = (st.st_uid, st.st_gid)
    return out


def test_a_hostile_agent_leaves_the_host_and_other_sessions_untouched(make_host, tmp_path):
    factory, runtime = make_host
    canary = Canary(tmp_path)
    h = factory().start()
    victim = h.client("victim")
    assert victim.wait_reply(victim.send("before"), 90)["text"] == "echo: before"
    attacker = h.client()
    s = first_session(h, attacker)
    (v,) = [x for x in h.q("SELECT * FROM sessions") if x["id"] != s["id"]]
    vroot = h.data / "sessions" / v["agent_group_id"] / v["id"]
    outside = [canary.dir, vroot, h.base / "groups" / "global", h.data / "nanoclaw.db",
               Path("/etc/passwd"), Path("/etc/shadow")]
    owners = _owners(*outside)

    consts = (f"CANARY_FILE = {str(canary.file)!r}\nCANARY_DIR = {str(canary.dir)!r}\n"
              f"OTHER_INBOX = {str(vroot / 'work' / 'inbox')!r}\n"
              f"SANDBOXED = {runtime != 'process'}\n")
    res = inside(attacker, s, "swap", consts + SWAP)
    assert all(v == "done" for k, v in res.items() if k.startswith("group:")), res
    if runtime != "process":
        assert all(v != "done" for k, v in res.items() if k.startswith("db:")), res
    for out_id, why in (("m", "larger than"), ("m2", "not a regular file"), ("m3", "symlink")):
        row = wait_for(lambda: delivered(s, out_id), 60, what=f"the verdict on {out_id}")
        assert row["status"] == "failed" and why in row["error"], (out_id, row)
    assert victim.wait_reply(victim.send("during"), 60)["text"] == "echo: during"

    # the host touches all of it now: nudges, heartbeat checks, a new message, a restart
    attacker.send("are you there?")
    inside(attacker, s, "poison", POISON)
    told = wait_for(lambda: [f for f in attacker.snapshot()
                             if "safety checks" in f.get("text", "")], 60,
                    what="the quarantine notice")
    assert "schema" in told[0]["text"]
    assert victim.wait_reply(victim.send("meanwhile"), 60)["text"] == "echo: meanwhile"
    again = attacker.wait_reply(attacker.send("afresh"), 120)
    assert again["text"] == "echo: afresh"
    assert victim.wait_reply(victim.send("after"), 60)["text"] == "echo: after"

    canary.assert_untouched(h.data, h.base / "logs")
    after = _owners(*outside)
    # nothing the test saw changed hands (a host journal may come and go between looks)
    assert {p: after.get(p, o if p.endswith("-journal") else None)
            for p, o in owners.items()} == owners
    # new files since: the host's own (the victim's inbound.db-journal, written when its
    # later messages went in) or the victim agent's in its own work/; nothing else
    new = {p: o for p, o in after.items() if p not in owners}
    assert all(o[0] == os.geteuid() or p.startswith(str(vroot / "work")) for p, o in new.items()), new
    cfg = s["root"] / "db" / "container.json"
    assert json.loads(cfg.read_text())["agent_group_id"] == s["agent_group_id"]
    if runtime != "process":  # the sandboxes' mount point is a plain folder again
        assert not os.path.islink(s["root"] / "work" / "agent")
    crashed = [w["name"] for w in h.workers() if w["restarts"]]
    assert crashed == [], crashed
    assert "worker crashed" not in (h.base / "logs" / "nanoclaw.error.log").read_text()
