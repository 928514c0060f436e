"""The bench's pure parts: the warm-turn breakdown, the comparison with the previous run,
the targets, and how the process tree is split into host, agents and spares (zygote
included). No host, no processes: made-up rows and a made-up process table."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import pytest

from bench import breakdown, report
from bench.procfs import classify

T0 = 1_800_000_000.0


def ms(v: float, abs: float = 2e-3) -> object:  # noqa: A002 - pytest.approx's name
    """A breakdown figure: rounded to the microsecond, from epoch-second floats."""
    return pytest.approx(v, abs=abs)


def turn(offsets_ms: dict[str, float | None], turn_ms: float | None = None) -> dict:
    """A turn whose points are T0 + offset (None: not recorded)."""
    t = {k: (None if v is None else T0 + v / 1000) for k, v in offsets_ms.items()}
    if turn_ms is not None:
        t["turn_ms"] = turn_ms
    return t


FULL = {"sent": 0, "stored": 1, "routed": 3, "claimed": 5, "model": 8, "answered": 12,
        "committed": 13, "queued": 16, "replied": 18, "routed_at": 4, "sent_at": 17}


def test_breakdown_stages_mean_p50_and_unaccounted():
    slow = dict(FULL, model=10, answered=14, committed=15, queued=18, replied=20,
                sent_at=19)
    bd = breakdown.compute([turn(FULL, 18.0), turn(FULL, 18.0), turn(slow, 20.5)])
    by = {s["stage"]: s for s in bd["stages"]}
    assert list(by) == ["channel in", "router", "agent claim", "agent -> model request",
                        "model answer -> reply row", "reply row commit", "delivery",
                        "channel out"]
    assert by["router"]["mean_ms"] == ms(2.0)
    assert by["agent -> model request"]["mean_ms"] == ms((3 + 3 + 5) / 3)
    assert by["agent -> model request"]["p50_ms"] == ms(3.0)
    assert all(s["timed"] == 3 for s in bd["stages"])
    # the stages chain from send to reply; only the client's own extra 0.5 ms is left
    assert bd["unaccounted_ms"]["mean_ms"] == ms(0.5 / 3)
    assert bd["total_ms"]["p50_ms"] == ms(18.0)
    assert bd["not_recorded"] == {}
    asides = {a["from"] + ">" + a["to"]: a for a in bd["asides"]}
    assert asides["routed>routed_at"]["mean_ms"] == ms(1.0)
    assert asides["queued>sent_at"]["mean_ms"] == ms(1.0)


def test_breakdown_merges_a_point_nobody_recorded_and_says_so():
    no_claim = dict(FULL, claimed=None)
    bd = breakdown.compute([turn(no_claim, 18.0), turn(no_claim, 18.0)])
    names = [s["stage"] for s in bd["stages"]]
    assert "agent claim + agent -> model request" in names
    merged = next(s for s in bd["stages"] if s["from"] == "routed")
    assert merged["to"] == "model" and merged["mean_ms"] == ms(5.0)
    assert "claimed" in bd["not_recorded"] and "log" in bd["not_recorded"]["claimed"]
    text = "\n".join(breakdown.lines(bd))
    assert "not timed" in text and "agent log: batch claimed" in text


def test_breakdown_point_missing_in_one_turn_goes_to_unaccounted():
    partial = dict(FULL, model=None)
    bd = breakdown.compute([turn(FULL, 18.0), turn(partial, 18.0)])
    by = {s["stage"]: s for s in bd["stages"]}
    assert by["agent -> model request"]["timed"] == 1
    assert by["model answer -> reply row"]["timed"] == 1
    # the second turn lost 3 + 4 ms of timed stages
    assert bd["unaccounted_ms"]["mean_ms"] == ms(7.0 / 2)
    assert "1 timed" in "\n".join(breakdown.lines(bd))


def test_breakdown_lines_when_nothing_to_break_down():
    assert "not available" in breakdown.lines({"turns": 0, "error": "boom"})[0]
    assert "boom" in breakdown.lines({"turns": 0, "error": "boom"})[0]


def test_agent_log_parse_and_model_matching():
    log = ("2026-12-06 10:53:32,946 INFO agent_runner batch claimed n=2 first_seq=6 last_seq=8\n"
           "2026-12-06 10:53:32,957 INFO agent_runner reply written id=out-1 seq=9 channel=cli\n"
           "2026-12-06 10:53:32,958 INFO agent_runner batch completed n=1 replies=1\n")
    claims, written = breakdown.parse_agent_log(log)
    assert set(claims) == {6, 7, 8}
    assert written["out-1"] - claims[6] == pytest.approx(0.011, abs=1e-6)
    body = lambda text: {"messages": [  # noqa: E731
        {"role": "user", "content": "<message id=\"2\">warm 1</message>"},
        {"role": "assistant", "content": [{"type": "text", "text": "echo"}]},
        {"role": "user", "content": [{"type": "text", "text": f"<message>{text}</message>"}]}]}
    reqs = [{"received_at": T0 + 0.010, "body": body("warm 10")},
            {"received_at": T0 + 0.020, "body": body("warm 1")},
            {"body": body("warm 2")}]  # no receive time: unusable
    sends = [{"id": "m1", "text": "warm 1", "sent": T0},
             {"id": "m10", "text": "warm 10", "sent": T0},
             {"id": "m2", "text": "warm 2", "sent": T0}]
    got = breakdown.model_times(sends, reqs)
    assert got == {"m1": pytest.approx(T0 + 0.020), "m10": pytest.approx(T0 + 0.010)}


def _db(path: Path, ddl: str, rows: list[tuple[str, tuple]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(ddl)
    for sql, args in rows:
        conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_collect_lines_up_rows_of_one_turn(tmp_path):
    iso = "2027-01-15T08:00:00.{:03d}Z"
    t0 = breakdown.iso_s(iso.format(0))
    data, logs = tmp_path / "data", tmp_path / "logs"
    _db(data / "nanoclaw.db",
        "CREATE TABLE inbound_events (message_id TEXT, received_at TEXT, routed_at TEXT);"
        "CREATE TABLE channel_outbox (id INTEGER PRIMARY KEY, message_out_id TEXT,"
        " in_reply_to TEXT, created_at TEXT, sent_at TEXT);",
        [("INSERT INTO inbound_events VALUES (?,?,?)", ("m-1", iso.format(2), iso.format(5))),
         ("INSERT INTO channel_outbox (message_out_id, in_reply_to, created_at, sent_at)"
          " VALUES (?,?,?,?)", ("out-1", "m-1:ag-1", iso.format(17), iso.format(18)))])
    sess = data / "sessions" / "ag-1" / "sess-1" / "db"
    _db(sess / "inbound.db", "CREATE TABLE messages_in (id TEXT, seq INT, timestamp TEXT);",
        [("INSERT INTO messages_in VALUES (?,?,?)", ("m-1:ag-1", 4, iso.format(4)))])
    _db(sess / "outbound.db", "CREATE TABLE messages_out (id TEXT, timestamp TEXT);",
        [("INSERT INTO messages_out VALUES (?,?)", ("out-1", iso.format(12)))])
    # the agent logs in local time; write what this machine's local clock would show
    local = lambda ms: dt.datetime.fromtimestamp(t0 + ms / 1000).strftime(  # noqa: E731
        "%Y-%m-%d %H:%M:%S,") + f"{ms:03d}"
    (logs / "containers" / ".warm").mkdir(parents=True)
    (logs / "containers" / ".warm" / "1.log").write_text(
        f"{local(7)} INFO agent_runner batch claimed n=1 first_seq=4 last_seq=4\n"
        f"{local(14)} INFO agent_runner reply written id=out-1 seq=5 channel=cli\n")
    sends = [{"id": "m-1", "text": "warm 0", "sent": t0, "replied": t0 + 0.020,
              "turn_ms": 20.0}]
    reqs = [{"received_at": t0 + 0.009, "body": {"messages": [
        {"role": "user", "content": "<message>warm 0</message>"}]}}]
    bd = breakdown.breakdown(data, logs, sends, reqs)
    pts = bd["points_ms"][0]
    # host and log stamps are truncated to the ms: read as the middle of it (+0.5)
    assert pts == {"id": "m-1", "sent": 0.0, "stored": 2.5, "routed": 4.5, "claimed": 7.5,
                   "model": 9.0, "answered": 12.5, "committed": 14.5, "queued": 17.5,
                   "replied": 20.0, "routed_at": 5.5, "sent_at": 18.5}
    assert bd["unaccounted_ms"]["mean_ms"] == ms(0.0)
    assert bd["not_recorded"] == {}


def test_collect_without_rows_reports_everything_untimed(tmp_path):
    sends = [{"id": "m-1", "text": "x", "sent": T0, "replied": T0 + 0.01, "turn_ms": 10.0}]
    bd = breakdown.breakdown(tmp_path / "data", tmp_path / "logs", sends, [])
    assert [s["stage"] for s in bd["stages"]][0].startswith("channel in + router")
    assert set(bd["not_recorded"]) == {"stored", "routed", "claimed", "model", "answered",
                                       "committed", "queued"}
    assert bd["unaccounted_ms"]["mean_ms"] == ms(0.0)


# --- the comparison with the previous run --------------------------------------------------

def test_compare_marks_regressions_in_the_bad_direction_only():
    old = {"timestamp": "2026-12-01T10:00:00+00:00", "params": {"quick": False},
           "figures": {"warm_turn_ms_p50": 20.0, "throughput_msg_s": 100.0,
                       "host_pss_mb": 100.0, "agent_pss_mb_mean": 45.0,
                       "agents_live": 26, "agents_per_gb": 22.0, "gone_figure": 1.0}}
    now = {"warm_turn_ms_p50": 23.0,      # +15% slower: regression
           "throughput_msg_s": 85.0,      # -15% fewer: regression (higher is better)
           "host_pss_mb": 105.0,          # +5%: within the noise
           "agent_pss_mb_mean": 20.0,     # better
           "agents_live": 9,              # a count: never a regression
           "agents_per_gb": 51.2,         # better
           "cold_turn_ms_p50": 90.0}      # new: no before
    cmp = report.compare(old, now, "old.json")
    rows = {r["figure"]: r for r in cmp["rows"]}
    assert cmp["before_timestamp"] == "2026-12-01T10:00:00+00:00"
    assert rows["warm_turn_ms_p50"]["change_pct"] == pytest.approx(15.0)
    assert cmp["regressions"] == ["warm_turn_ms_p50", "throughput_msg_s"]
    assert not rows["host_pss_mb"]["regression"]
    assert not rows["agents_live"]["regression"] and rows["agents_live"]["change_pct"] < -50
    assert rows["cold_turn_ms_p50"]["before"] is None
    assert rows["cold_turn_ms_p50"]["change_pct"] is None
    assert rows["gone_figure"]["now"] is None and not rows["gone_figure"]["regression"]
    text = "\n".join(report.compare_lines(cmp, quick=True))
    assert "that was a full run, this one is quick" in text
    warm_line = next(ln for ln in text.splitlines() if ln.startswith("warm turn p50"))
    assert "+15.0%" in warm_line and "worse" in warm_line
    pss_line = next(ln for ln in text.splitlines() if ln.startswith("host PSS after load"))
    assert "+5.0%" in pss_line and "worse" not in pss_line
    assert "2 figure(s) worse" in text


def test_compare_ignores_changes_below_the_resolution():
    old = {"figures": {"host_idle_cpu_pct": 0.333}, "idle": {"tick_resolution_pct": 0.333}}
    floors = report.noise(old)
    one_tick = report.compare(old, {"host_idle_cpu_pct": 0.666}, "x", floors=floors)
    assert one_tick["rows"][0]["change_pct"] == pytest.approx(100.0)
    assert one_tick["regressions"] == []
    more = report.compare(old, {"host_idle_cpu_pct": 1.0}, "x", floors=floors)
    assert more["regressions"] == ["host_idle_cpu_pct"]


def test_compare_without_a_previous_file(tmp_path):
    old, why = report.load_previous(tmp_path / "results.json")
    assert old is None and "no previous results" in why
    cmp = report.compare(old, {"warm_turn_ms_p50": 9.0}, str(tmp_path), why)
    assert cmp["rows"] == [] and "no previous results" in cmp["note"]
    assert "no previous results" in report.compare_lines(cmp)[0]
    (tmp_path / "bad.json").write_text("{not json")
    assert report.load_previous(tmp_path / "bad.json")[0] is None


def test_compare_derives_figures_of_an_old_file_without_them():
    old = {"warm_turn_ms": {"p50": 10.0}}
    cmp = report.compare(old, {"warm_turn_ms_p50": 10.5}, "x")
    assert [r["figure"] for r in cmp["rows"]] == ["warm_turn_ms_p50"]
    assert cmp["rows"][0]["change_pct"] == pytest.approx(5.0)


def test_publish_compares_with_the_file_it_overwrites(tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"timestamp": "before", "figures": {"warm_turn_ms_p50": 8.0}}))
    results = {"timestamp": "now", "warm_turn_ms": {"p50": 12.0, "p99": 20.0},
               "concurrent_cold_start": {"chats": 20, "wall_ms": 900.0,
                                         "turn_ms": {"count": 20, "p50": 700.0, "max": 880.0}},
               "agent_memory": {"agents": 20, "pss_mb_mean_per_agent": 25.6,
                                "agents_per_gb": 40.0}}
    assert report.publish(results, [], out)
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["compare"]["before_timestamp"] == "before"
    assert written["compare"]["regressions"] == ["warm_turn_ms_p50"]
    assert written["figures"]["concurrent_first_reply_ms_p50"] == 700.0
    assert written["figures"]["concurrent_first_reply_ms_max"] == 880.0
    assert written["figures"]["agents_per_gb"] == 40.0
    assert written["targets"]["warm_turn_ms_p50"]["verdict"] == "MISSES"
    assert written["targets"]["concurrent_first_reply_ms_p50"]["verdict"] == "meets"
    assert written["targets"]["throughput_msg_s"]["verdict"] == "n/a"
    assert "+50.0%" in printed and "compared with" in printed


def test_targets_are_design_section_9():
    assert report.TARGETS["warm_turn_ms_p50"] == (10, "le")
    assert report.TARGETS["warm_turn_ms_p99"] == (25, "le")
    assert report.TARGETS["concurrent_first_reply_ms_max"] == (2000, "le")
    assert report.TARGETS["throughput_msg_s"] == (200, "ge")
    assert report.TARGETS["host_idle_cpu_pct"] == (0.2, "le")
    v = report.verdicts({"throughput_msg_s": 200.0, "agent_pss_mb_mean": 20.01})
    assert v["throughput_msg_s"]["verdict"] == "meets"
    assert v["agent_pss_mb_mean"]["verdict"] == "MISSES"


# --- host, agents, spares --------------------------------------------------------------

def _table(procs: dict[int, tuple[int, str, bool, str]]):
    """pid -> (ppid, comm, waiting runner?, cwd) as classify's arguments."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in procs.items():
        children.setdefault(ppid, []).append(pid)
    return (children, lambda p: procs[p][1], lambda p: procs[p][2], lambda p: procs[p][3])


def test_classify_warm_pool_spare_agents_and_workers():
    procs = {
        10: (1, "python", False, "/srv"),              # the host
        11: (10, "nc-router", False, "/srv"),
        12: (10, "nc-containers", False, "/srv"),
        20: (12, "python", False, "/g/main"),          # an agent (process runtime)
        21: (20, "node", False, "/g/main"),            # ... and its child
        30: (12, "bwrap", False, "/srv"),              # a bwrap agent: runner handed over
        31: (30, "python", False, "/workspace"),
        40: (12, "bwrap", False, "/srv"),              # a bwrap warm-pool spare
        41: (40, "python", True, "/"),
        50: (12, "python", True, "/"),                 # a process-runtime spare
    }
    host, agents, spares = classify(10, *_table(procs))
    assert host == {10: "host", 11: "router", 12: "containers"}
    assert agents == {20: "agent:20", 21: "agent:20/node", 30: "agent:30",
                      31: "agent:30/python"}
    assert spares == {40: "spare", 41: "spare", 50: "spare"}


def test_classify_zygote_children_are_agents_and_the_zygote_a_spare():
    procs = {
        10: (1, "python", False, "/srv"),
        12: (10, "nc-containers", False, "/srv"),
        60: (12, "python", True, "/"),                 # the zygote
        61: (60, "python", False, "/g/a"),             # forked, handed session a
        62: (61, "node", False, "/g/a"),               # ... a tool it runs
        63: (60, "python", False, "/g/b"),             # forked, handed session b
        64: (60, "python", True, "/"),                 # forked, not handed over yet
        70: (12, "bwrap", False, "/srv"),              # a zygote inside a sandbox
        71: (70, "python", True, "/"),
        72: (71, "python", False, "/workspace/group"),
    }
    host, agents, spares = classify(10, *_table(procs))
    assert set(host) == {10, 12}
    assert agents == {61: "agent:61", 62: "agent:61/node", 63: "agent:63",
                      72: "agent:72"}
    assert spares == {60: "spare", 64: "spare", 70: "spare", 71: "spare"}
    roots = {label.split("/")[0] for label in agents.values()}
    assert roots == {"agent:61", "agent:63", "agent:72"}
