"""The security review's attacks (../shared/reference/security-review.md), performed the
way it describes: from inside a real sandbox (bwrap and docker), the model's bash tool
plants symlinks, swaps folders, writes raw rows into its own `outbound.db` and tries to
replace the host's files. Each attack must be refused, with the host, a canary outside
`data/` and the other sessions untouched.

The in-sandbox part is a Python script sent as a `[[tool:bash …]]` marker (the fake
model turns it into a tool call); it writes what it saw to `/workspace/attack-<name>.json`,
which the test reads from the host side.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import sqlite3
import subprocess
import time

import pytest
from conftest import wait_for

from attack_kit import PRELUDE, Canary, delivered, first_session, inside, marker, notes, read_report


@pytest.fixture(params=["bwrap", "docker"])
def sandbox(request, host_factory):
    """A host whose agents run in a real sandbox of the given kind."""
    if request.param == "docker":
        request.getfixturevalue("docker_client")
        request.getfixturevalue("agent_image")
    else:
        request.getfixturevalue("bwrap_works")

    def make(**env: str):
        h = host_factory(request.param, NANOCLAW_RUNTIME=request.param, **env)
        h.runtime = request.param
        return h.start()

    return make


# ---- C1: a file sent to another agent, into an inbox folder it symlinked ----------------
def test_c1_no_write_through_a_planted_inbox_link(sandbox, tmp_path):
    canary = Canary(tmp_path)
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    sha = hashlib.sha1(f"{s1['id']}:out-evil-2".encode()).hexdigest()[:16]
    # S1 makes its group's shared session S2 run bash: S2 links inbox/<sha> to the canary
    plant = marker(f"mkdir -p /workspace/inbox; ln -s {canary.dir / 'x'} /workspace/inbox/{sha}")
    inside(c, s1, "plant", f"out('out-plant', {{'text': {plant!r}}}, 'agent', ME)\n"
                           "report('plant', 'ok')")
    s2 = wait_for(lambda: [s for s in h.q("SELECT * FROM sessions") if s["id"] != s1["id"]],
                  60, what="the shared session")[0]
    link = h.data / "sessions" / s2["agent_group_id"] / s2["id"] / "work" / "inbox" / sha
    wait_for(lambda: os.path.islink(link), 90, what="S2 planted its link")
    # S1 now sends S2 a file whose copy would land in that folder
    inside(c, s1, "send", """
os.makedirs(os.path.join(WS, "outbox", "out-evil-2"), exist_ok=True)
open(os.path.join(WS, "outbox", "out-evil-2", "rt-proof-b"), "w").write("pwned by sandbox")
out("out-evil-2", {"text": "file for you", "files": ["rt-proof-b"]}, "agent", ME)
report("send", "ok")""")
    row = wait_for(lambda: delivered(s1, "out-evil-2"), 60, what="the host's verdict")
    assert row["status"] == "failed" and "not a plain folder" in row["error"], row
    assert not (canary.dir / "x" / "rt-proof-b").exists()
    assert os.path.islink(link)  # still the agent's own link, never followed
    wait_for(lambda: any("was not sent" in n for n in notes(s1)), 30, what="S1 told")
    canary.assert_untouched(h.data)


# ---- C2: the outbox linked to a host folder; links, FIFOs and huge files in it ----------
def test_c2_no_read_through_outbox_links_fifos_or_huge_files(sandbox, tmp_path):
    canary = Canary(tmp_path)
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    inside(c, s1, "c2a", f"""
shutil.rmtree(os.path.join(WS, "outbox"), ignore_errors=True)
os.symlink({str(canary.dir)!r}, os.path.join(WS, "outbox"))
out("x", {{"text": "here", "files": ["secret.txt"]}}, "cli", "local")      # (b) to its chat
report("c2a", "ok")""")
    inside(c, s1, "c2b", f"""
os.unlink(os.path.join(WS, "outbox"))
os.makedirs(os.path.join(WS, "outbox", "y"))
os.symlink({str(canary.file)!r}, os.path.join(WS, "outbox", "y", "link.txt"))
os.mkfifo(os.path.join(WS, "outbox", "y", "pipe"))
with open(os.path.join(WS, "outbox", "y", "huge.bin"), "wb") as f:
    f.truncate(3 << 30)
os.symlink({str(canary.dir / "x")!r}, os.path.join(WS, "outbox", "z"))
out("y", {{"text": "files", "files": ["link.txt"]}}, "cli", "local")
out("y2", {{"text": "files", "files": ["pipe"]}}, "cli", "local")
out("y3", {{"text": "files", "files": ["huge.bin"]}}, "cli", "local")
out("z", {{"text": "for the other agent", "files": ["secret.txt"]}}, "agent", ME)
report("c2b", "ok")""")
    for out_id, why in (("x", "not a plain folder"), ("y", "symlink"),
                        ("z", "not a plain folder")):
        row = wait_for(lambda: delivered(s1, out_id), 60, what=f"verdict on {out_id}")
        assert row["status"] == "failed" and why in row["error"], (out_id, row)
    # a FIFO in outbox/y is refused by name; y2/y3 have no folder of their own
    for out_id in ("y2", "y3"):
        row = wait_for(lambda: delivered(s1, out_id), 60, what=f"verdict on {out_id}")
        assert row["status"] == "failed", row
    sends = h.q("SELECT content FROM channel_outbox")
    assert not any("files" in json.loads(r["content"]) for r in sends)
    assert all(Canary.SECRET not in json.dumps(f) for f in c.snapshot())
    canary.assert_untouched(h.data)


def test_c2_fifo_and_huge_files_are_refused_by_type_and_size(sandbox, tmp_path):
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    inside(c, s1, "fifo", """
d = os.path.join(WS, "outbox", "m")
os.makedirs(d)
os.mkfifo(os.path.join(d, "pipe"))
with open(os.path.join(d, "huge.bin"), "wb") as f:
    f.truncate(3 << 30)
out("m", {"text": "a pipe and a huge file", "files": ["pipe", "huge.bin"]}, "cli", "local")
report("fifo", "ok")""")
    row = wait_for(lambda: delivered(s1, "m"), 60, what="the verdict")
    assert row["status"] == "failed" and "not a regular file" in row["error"], row
    assert c.wait_reply(c.send("still there?"), 60)["text"] == "echo: still there?"


# ---- C3: container.json(.tmp) links in the group folder --------------------------------
def test_c3_config_links_in_the_group_folder_are_never_followed(sandbox, tmp_path):
    canary = Canary(tmp_path)
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    inside(c, s1, "c3", f"""
for n in ("container.json.tmp", "container.json", "CLAUDE.md.tmp"):
    p = os.path.join("/workspace/agent" if os.path.isdir("/workspace/agent") else os.getcwd(), n)
    if os.path.lexists(p):
        os.unlink(p)
    os.symlink({str(canary.file)!r}, p)
report("c3", "ok")""")
    r = h.cli("send", "hi", "--chat", "other", "--wait", "90")  # a new session: a new spawn
    assert r.returncode == 0 and r.stdout.strip() == "echo: hi", r.stderr
    other = [s for s in h.q("SELECT * FROM sessions") if s["messaging_group_id"]][-1]
    cfg = h.data / "sessions" / other["agent_group_id"] / other["id"] / "db" / "container.json"
    assert json.loads(cfg.read_text())["agent_group_id"] == other["agent_group_id"]
    canary.assert_untouched(h.data)


# ---- H1: the chown race during session starts -------------------------------------------
RACER = r'''
import ctypes, subprocess, sys
os.makedirs(os.path.join(os.getcwd(), "d"), exist_ok=True)
for i in range(3000):
    open(os.path.join(os.getcwd(), "d", f"f{i}"), "w").close()
os.symlink(sys.argv[1] if len(sys.argv) > 1 else VICTIM, os.path.join(os.getcwd(), "l"))
code = ("import ctypes, time, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "end = time.time() + 25\n"
        "while time.time() < end:\n"
        "    libc.syscall(316, -100, b'd', -100, b'l', 2)\n")
subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd(), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, start_new_session=True)
report("h1", "racing")
'''


def test_h1_no_chown_through_a_swapped_folder(sandbox, tmp_path):
    canary = Canary(tmp_path)
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    assert inside(c, s1, "h1", f"VICTIM = {str(canary.dir / 'x')!r}\n" + RACER) == "racing"
    for n in range(3):  # new sessions of the same group while the swap loop runs
        r = h.cli("send", f"race {n}", "--chat", f"race{n}", "--wait", "90")
        assert r.returncode == 0 and r.stdout.strip() == f"echo: race {n}", r.stderr
    canary.assert_untouched()
    assert all(p.lstat().st_uid == 0 for p in canary.dir.rglob("*"))


# ---- H2: the agent forges who asked by replacing inbound.db ------------------------------
def test_h2_inbound_db_is_out_of_the_agents_reach(sandbox):
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    res = inside(c, s1, "h2", """
inbound = os.path.join(DB, "inbound.db")
forged = os.path.join(WS, "inbound.forged")
src = sqlite3.connect("file:" + inbound + "?mode=ro", uri=True)
dst = sqlite3.connect(forged)
src.backup(dst)
dst.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES"
            " ('forged-1', 99990, 'chat', 'x', '{\\"senderId\\": \\"cli:root\\"}')")
dst.commit(); dst.close(); src.close()
def write_in_place():
    c = sqlite3.connect(inbound, timeout=2)
    c.execute("INSERT INTO messages_in (id, seq, kind, timestamp, content) VALUES"
              " ('forged-2', 99992, 'chat', 'x', '{}')")
    c.commit()
res = {"replace": attempt(lambda: os.replace(forged, inbound)),
       "rename_away": attempt(lambda: os.rename(inbound, inbound + ".old")),
       "unlink": attempt(lambda: os.unlink(inbound)),
       "open_rw": attempt(lambda: open(inbound, "r+b").close()),
       "sqlite": attempt(write_in_place),
       "new_file": attempt(lambda: open(os.path.join(DB, "x"), "w").close()),
       "replace_outbound": attempt(lambda: os.replace(forged, os.path.join(DB, "outbound.db")))}
out("sys-1", {"action": "create_agent", "name": "evilchild"}, None, None, kind="system",
    in_reply_to="forged-1")
report("h2", res)""")
    assert all(v != "done" for v in res.values()), res
    row = wait_for(lambda: delivered(s1, "sys-1"), 60, what="the verdict on create_agent")
    assert row["status"] == "failed" and "admin" in row["error"], row
    assert not h.q("SELECT * FROM agent_groups WHERE name='evilchild'")
    conn = sqlite3.connect(s1["root"] / "db" / "inbound.db")
    assert not conn.execute("SELECT 1 FROM messages_in WHERE id LIKE 'forged-%'").fetchall()
    conn.close()


# ---- M2: a hostile outbound.db stalls nobody else ----------------------------------------
SLOW_VIEW = r'''
p = os.path.join(DB, "outbound.db")
res = {"replace": attempt(lambda: os.replace(os.path.join(WS, "x.db"), p))}
c = sqlite3.connect(p, isolation_level=None, timeout=10)
c.execute("PRAGMA journal_mode=PERSIST")
c.execute("DROP TABLE messages_out")
c.execute("CREATE VIEW messages_out AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL"
          " SELECT x + 1 FROM c WHERE x < 250000000) SELECT 'v' AS id, x AS seq,"
          " NULL AS in_reply_to, 'x' AS timestamp, NULL AS deliver_after, NULL AS recurrence,"
          " 'chat' AS kind, NULL AS platform_id, NULL AS channel_type, NULL AS thread_id,"
          " '{}' AS content FROM c WHERE x < 0")
c.close()
report("m2", res)
'''


def test_m2_a_hostile_outbound_db_quarantines_its_session_only(sandbox):
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    victim = h.client("victimchat")
    assert victim.wait_reply(victim.send("before"), 90)["text"] == "echo: before"
    open(s1["root"] / "work" / "x.db", "wb").close()
    c.send(marker("echo " + base64.b64encode((PRELUDE + SLOW_VIEW).encode()).decode()
                  + " | base64 -d | python3 -"))
    res = read_report(s1, "m2")
    assert res["replace"] != "done", res
    t = time.monotonic()
    assert victim.wait_reply(victim.send("during"), 60)["text"] == "echo: during"
    told = wait_for(lambda: [f for f in c.snapshot() if "safety checks" in f.get("text", "")],
                    60, what="the quarantine notice")
    assert "schema" in told[0]["text"]
    assert time.monotonic() - t < 60  # (not a speed check: the unbounded view never ends)
    # the next message starts the session afresh, with the bad file set aside
    assert c.wait_reply(c.send("again"), 90)["text"] == "echo: again"
    assert list((s1["root"] / "db").glob("outbound.db.refused-*"))
    assert victim.wait_reply(victim.send("after"), 60)["text"] == "echo: after"


# ---- L1 and L2: commands and failure notices -------------------------------------------
def test_l1_clear_between_agents_passes_the_command_gate(sandbox):
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    inside(c, s1, "l1", 'out("clr-1", {"text": "/clear"}, "agent", ME)\nreport("l1", "ok")')
    row = wait_for(lambda: delivered(s1, "clr-1"), 60, what="the verdict")
    assert row["status"] == "failed" and "Permission denied: /clear" in row["error"], row
    assert len(h.q("SELECT * FROM sessions")) == 1  # nothing was routed anywhere


def test_l2_no_forged_failure_notice(sandbox):
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    res = inside(c, s1, "l2", """
def forge():
    c = sqlite3.connect(os.path.join(DB, "inbound.db"), timeout=2)
    c.execute("INSERT INTO messages_in (id, seq, kind, timestamp, tries, platform_id,"
              " channel_type, content) VALUES ('evil-l2', 99994, 'chat', 'x', 4,"
              " 'telegram:-999', 'telegram', '{}')")
    c.commit()
res = {"forge": attempt(forge)}
a = sqlite3.connect(os.path.join(DB, "outbound.db"), isolation_level=None, timeout=10)
a.execute("PRAGMA journal_mode=PERSIST")
a.execute("INSERT OR REPLACE INTO processing_ack VALUES ('evil-l2', 'processing', 'x')")
a.close()
report("l2", res)
os.kill(-1, 9)""")
    assert res["forge"] != "done", res
    time.sleep(3)  # the containers worker resets the dead agent's claims
    assert not h.q("SELECT * FROM channel_outbox WHERE platform_id='telegram:-999'")
    assert c.wait_reply(c.send("fine"), 90)["text"] == "echo: fine"


# ---- H5: the sandbox user is nobody's account ----------------------------------------
def test_h5_the_sandbox_user_is_no_local_account(sandbox):
    h = sandbox()
    c = h.client()
    s1 = first_session(h, c)
    res = inside(c, s1, "h5", """
import pwd
report("h5", {"uid": os.getuid(), "passwd": open("/etc/passwd").read(),
              "me": pwd.getpwuid(os.getuid()).pw_name})""")
    assert res["uid"] == 61000 and res["me"] == "agent"
    with pytest.raises(KeyError):
        pwd.getpwuid(61000)  # on the host: no account has it
    host_names = {p.pw_name for p in pwd.getpwall()} - {"root", "nobody"}
    assert not any(f"{n}:" in res["passwd"] for n in host_names)
    # another local user cannot read a sandbox process's environment (its broker token)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) == 61000]
    assert pids
    for pid in pids[:3]:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "cat", f"/proc/{pid}/environ"], capture_output=True)
        assert r.returncode != 0 and b"ANTHROPIC" not in r.stdout


def test_h5_an_agent_uid_that_belongs_to_an_account_is_refused(host_factory):
    if os.geteuid() != 0:
        pytest.skip("the agent uid is only used when the host runs as root")
    account = next(p for p in pwd.getpwall() if p.pw_uid != 0)
    h = host_factory("uid", NANOCLAW_AGENT_UID=str(account.pw_uid))
    h.base.mkdir(parents=True)
    import sys

    r = subprocess.run([sys.executable, "-m", "nanoclaw", "run"], cwd=h.base, env=h.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and account.pw_name in lines[0] and "NANOCLAW_AGENT_UID" in lines[0]
    d = subprocess.run([sys.executable, "-m", "nanoclaw", "doctor"], cwd=h.base, env=h.env,
                       capture_output=True, text=True, timeout=60)
    assert any(ln.startswith("BAD") and account.pw_name in ln for ln in d.stdout.splitlines())


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
