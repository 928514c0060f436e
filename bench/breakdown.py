"""Where a warm turn's time goes, stage by stage, from what the host already records.

Why a module of its own: the host gains no code for it. After the warm phase the bench
reads, read-only, the rows the host and the agent wrote for those turns (each carries a
millisecond UTC timestamp), the agent's log, the fake model's request log and its own
send/reply times, lines them up per turn (by the message id the bench sent and the ids
derived from it), and reports each stage's mean and p50 over the turns:

  sent       the bench client wrote the message to cli.sock             (bench clock)
  stored     inbound_events.received_at: the channel stored the event   (nanoclaw.db)
  routed     messages_in.timestamp: the router wrote it to the session  (inbound.db)
  claimed    the agent took the batch: its log's "batch claimed" line   (agent log)
             (the claim itself commits beside the model request)
  model      the fake model had the request: /_fake/requests received_at
  answered   messages_out.timestamp: the agent began writing the reply  (outbound.db)
  committed  the reply row committed: the agent log's "reply written"   (agent log)
  queued     channel_outbox.created_at: delivery queued the send        (nanoclaw.db)
  replied    the bench client had the reply frame                       (bench clock)

A stage is the time between two neighbouring points. A point nobody recorded in any turn
is dropped (its two stages merge, and the output says which point is missing and why); a
point missing in only some turns leaves those turns' stages untimed, counted in
"unaccounted" (client-measured turn minus the stages timed). The host's stamps and the
log's are whole milliseconds, truncated, so each is read as the middle of its
millisecond (+0.5 ms: no bias against the exact client and fake times) and each stage
is good to about 1 ms; the mean over many turns is better than that. `compute` and
`lines` are pure (tests feed them made-up turns); `collect` does the reading.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import re
import sqlite3
import statistics
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# (point, where it comes from), in the order a turn passes them
POINTS: list[tuple[str, str]] = [
    ("sent", "client sent"),
    ("stored", "inbound_events.received_at"),
    ("routed", "messages_in.timestamp"),
    ("claimed", "agent log: batch claimed"),
    ("model", "fake model got the request"),
    ("answered", "messages_out.timestamp"),
    ("committed", "agent log: reply written"),
    ("queued", "channel_outbox.created_at"),
    ("replied", "client got the reply"),
]
# the stage that ends at each point
STAGE_NAMES = {
    "stored": "channel in",
    "routed": "router",
    "claimed": "agent claim",
    "model": "agent -> model request",
    "answered": "model answer -> reply row",
    "committed": "reply row commit",
    "queued": "delivery",
    "replied": "channel out",
}
# extra intervals, off the main chain (not summed)
ASIDES: list[tuple[str, str, str]] = [
    ("router: row written -> event marked routed", "routed", "routed_at"),
    ("channel: send queued -> marked sent (stored)", "queued", "sent_at"),
]
WHY_MISSING = {
    "claimed": "the agent's log has no 'batch claimed' line for these rows (processing_ack"
               " keeps only the completion time, so no row records the claim)",
    "committed": "the agent's log has no 'reply written' line for these replies (no row"
                 " records the commit; messages_out.timestamp is taken before it)",
    "model": "the fake model's request log has no received_at, or no request carried"
             " these messages",
}


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"timed": 0, "mean_ms": None, "p50_ms": None}
    return {"timed": len(values), "mean_ms": round(statistics.fmean(values), 3),
            "p50_ms": round(statistics.median(values), 3)}


def compute(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage mean and p50 (ms) over `turns`: each a dict point -> epoch seconds (None
    or absent when not recorded), optionally "turn_ms" (the client's own measure of the
    whole turn; else replied - sent), and the aside points ("routed_at", "sent_at")."""
    names = [p for p, _ in POINTS]
    absent = [p for p in names if all(t.get(p) is None for t in turns)]
    chain = [p for p in names if p not in absent]
    stages = []
    for a, b in itertools.pairwise(chain):
        skipped = names[names.index(a) + 1:names.index(b) + 1]
        label = " + ".join(STAGE_NAMES[p] for p in skipped)
        stages.append({"stage": label, "from": a, "to": b})
    per_stage: list[list[float]] = [[] for _ in stages]
    totals, unaccounted = [], []
    for t in turns:
        total = t.get("turn_ms")
        if total is None and t.get("sent") is not None and t.get("replied") is not None:
            total = (t["replied"] - t["sent"]) * 1000
        timed = 0.0
        for i, s in enumerate(stages):
            a, b = t.get(s["from"]), t.get(s["to"])
            if a is not None and b is not None:
                per_stage[i].append((b - a) * 1000)
                timed += (b - a) * 1000
        if total is not None:
            totals.append(total)
            unaccounted.append(total - timed)
    for s, vals in zip(stages, per_stage):
        s.update(_stats(vals))
    asides = []
    for label, a, b in ASIDES:
        vals = [(t[b] - t[a]) * 1000 for t in turns
                if t.get(a) is not None and t.get(b) is not None]
        asides.append({"stage": label, "from": a, "to": b, **_stats(vals)})
    return {"turns": len(turns), "stages": stages, "asides": asides,
            "total_ms": _stats(totals), "unaccounted_ms": _stats(unaccounted),
            "not_recorded": {p: WHY_MISSING.get(p, "not recorded") for p in absent}}


def lines(bd: dict[str, Any]) -> list[str]:
    """The printed form of `compute`'s result."""
    if not bd or not bd.get("turns"):
        why = (bd or {}).get("error") or "no warm turns to break down"
        return [f"\nwarm turn by stage: not available ({why})"]
    src = dict(POINTS)

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v + 0.0:.2f}".replace("-0.00", "0.00")

    rows = [(s["stage"], f"{src[s['from']]} -> {src[s['to']]}", num(s["mean_ms"]),
             num(s["p50_ms"]), "" if s["timed"] == bd["turns"] else f"{s['timed']} timed")
            for s in bd["stages"]]
    rows.append(("unaccounted", "turn minus the stages timed",
                 num(bd["unaccounted_ms"]["mean_ms"]), num(bd["unaccounted_ms"]["p50_ms"]), ""))
    rows.append(("whole turn", "as the bench client measured it",
                 num(bd["total_ms"]["mean_ms"]), num(bd["total_ms"]["p50_ms"]), ""))
    head = ("stage", "from -> to", "mean", "p50", "")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    out = [(f"\nwarm turn by stage ({bd['turns']} turns, ms; host stamps are whole ms, so"
            " +-1 ms per stage):"),
           (f"  {head[0].ljust(w[0])}  {head[1].ljust(w[1])}  {head[2].rjust(w[2])}"
            f"  {head[3].rjust(w[3])}")]
    for r in rows:
        out.append(f"  {r[0].ljust(w[0])}  {r[1].ljust(w[1])}  {r[2].rjust(w[2])}"
                   f"  {r[3].rjust(w[3])}  {r[4]}".rstrip())
    for a in bd.get("asides", []):
        if a["timed"]:
            out.append(f"  aside, {a['stage']}: mean {num(a['mean_ms'])}, p50 {num(a['p50_ms'])}")
    for p, why in bd.get("not_recorded", {}).items():
        out.append(f"  not timed: '{src[p]}' ({p}): {why}")
    return out


# --- reading what the host wrote --------------------------------------------------------

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d{3})\S* .*?"
                       r"(?:batch claimed n=\d+ first_seq=(\d+) last_seq=(\d+)"
                       r"|reply written id=(\S+))")


HALF_MS = 0.0005  # a truncated millisecond stamp, read as the middle of its millisecond


def _mid(t: float | None) -> float | None:
    return None if t is None else t + HALF_MS


def iso_s(stamp: str | None) -> float | None:
    """Epoch seconds of the host's stamps (util.iso: UTC, milliseconds, Z)."""
    if not stamp:
        return None
    try:
        return _dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _ro(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True,
                           timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def _rows(path: Path, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
    try:
        conn = _ro(path)
    except sqlite3.Error:
        return []
    try:
        return conn.execute(sql, tuple(args)).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def parse_agent_log(text: str) -> tuple[dict[int, float], dict[str, float]]:
    """(inbound seq -> first claim time, reply id -> 'reply written' time) from one agent
    log, the times as logged (the agent's local time, taken as this machine's)."""
    claims: dict[int, float] = {}
    written: dict[str, float] = {}
    for ln in text.splitlines():
        m = _LOG_LINE.match(ln)
        if not m:
            continue
        try:
            t = _dt.datetime.strptime(m[1].replace(",", ".").replace("T", " "),
                                      "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        if m[2]:
            for seq in range(int(m[2]), int(m[3]) + 1):
                claims.setdefault(seq, t)
        else:
            written.setdefault(m[4], t)
    return claims, written


def last_user_text(body: Any) -> str:
    """The text of the last user message of a Messages API request body."""
    msgs = body.get("messages") if isinstance(body, dict) else None
    for m in reversed(msgs or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return "\n".join(str(b.get("text", "")) for b in c if isinstance(b, dict))
            return str(c)
    return ""


def model_times(sends: list[dict[str, Any]], requests: list[dict[str, Any]]
                ) -> dict[str, float]:
    """Message id -> when the fake received the first request (after its send) whose last
    user message carries that message's text (whole: "warm 1" is not in "warm 10")."""
    out: dict[str, float] = {}
    reqs = sorted((r for r in requests if isinstance(r.get("received_at"), (int, float))),
                  key=lambda r: r["received_at"])
    texts = [(r["received_at"], last_user_text(r.get("body"))) for r in reqs]
    for s in sends:
        pat = re.compile(r"(?<![\w-])" + re.escape(s["text"]) + r"(?![\w-])")
        for t, text in texts:
            if t >= s["sent"] - 0.002 and pat.search(text):
                out[s["id"]] = t
                break
    return out


def collect(data: Path, logs: Path, sends: list[dict[str, Any]],
            requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict of points per send (Chat.last: id, text, sent, replied, turn_ms), read
    read-only from the central DB, every session's inbound/outbound DBs, the agents' logs
    (logs/containers/**.log) and the fake's request log."""
    ids = [s["id"] for s in sends]
    marks = ",".join("?" * len(ids))
    central = data / "nanoclaw.db"
    events = {r["message_id"]: r for r in _rows(
        central, f"SELECT message_id, received_at, routed_at FROM inbound_events"
                 f" WHERE message_id IN ({marks})", ids)}
    outbox: dict[str, sqlite3.Row] = {}
    for r in _rows(central, "SELECT message_out_id, in_reply_to, created_at, sent_at"
                            " FROM channel_outbox WHERE in_reply_to IS NOT NULL ORDER BY id"):
        outbox.setdefault(r["in_reply_to"].partition(":")[0], r)
    rows_in: dict[str, tuple[str, sqlite3.Row]] = {}   # message id -> (session, row)
    rows_out: dict[str, tuple[str, sqlite3.Row]] = {}  # messages_out id -> (session, row)
    for db in sorted((data / "sessions").glob("*/*/db")):
        sid = db.parent.name
        for r in _rows(db / "inbound.db", "SELECT id, seq, timestamp FROM messages_in"):
            rows_in.setdefault(r["id"].partition(":")[0], (sid, r))
        for r in _rows(db / "outbound.db", "SELECT id, timestamp FROM messages_out"):
            rows_out[r["id"]] = (sid, r)
    # the agents' logs: each file belongs to the session whose replies it wrote
    claims: dict[tuple[str, int], float] = {}
    written: dict[str, float] = {}
    for f in sorted((logs / "containers").glob("**/*.log")):
        try:
            c, w = parse_agent_log(f.read_text(errors="replace"))
        except OSError:
            continue
        owner = next((rows_out[o][0] for o in w if o in rows_out), None)
        written.update({k: v for k, v in w.items() if k not in written})
        if owner is not None:
            for seq, t in c.items():
                claims.setdefault((owner, seq), t)
    # the log's clock is local time of the agent: find its offset from UTC by the replies
    # (logged just after the row stamped in UTC), to the quarter hour
    diffs = sorted(written[o] - iso_s(rows_out[o][1]["timestamp"]) for o in written
                   if o in rows_out and iso_s(rows_out[o][1]["timestamp"]) is not None)
    shift = round(diffs[len(diffs) // 2] / 900) * 900 if diffs else 0
    model = model_times(sends, requests)
    turns = []
    for s in sends:
        mid = s["id"]
        ev, ob = events.get(mid), outbox.get(mid)
        sid, rin = rows_in.get(mid, (None, None))
        out_id = ob["message_out_id"] if ob is not None else None
        rout = rows_out.get(out_id, (None, None))[1] if out_id else None
        claim = claims.get((sid, rin["seq"])) if sid and rin is not None else None
        commit = written.get(out_id) if out_id else None
        turns.append({
            "id": mid, "turn_ms": s.get("turn_ms"), "sent": s["sent"],
            "stored": _mid(iso_s(ev["received_at"])) if ev is not None else None,
            "routed": _mid(iso_s(rin["timestamp"])) if rin is not None else None,
            "claimed": None if claim is None else _mid(claim - shift),
            "model": model.get(mid),
            "answered": _mid(iso_s(rout["timestamp"])) if rout is not None else None,
            "committed": None if commit is None else _mid(commit - shift),
            "queued": _mid(iso_s(ob["created_at"])) if ob is not None else None,
            "replied": s["replied"],
            "routed_at": _mid(iso_s(ev["routed_at"])) if ev is not None else None,
            "sent_at": _mid(iso_s(ob["sent_at"])) if ob is not None else None,
        })
    return turns


def breakdown(data: Path, logs: Path, sends: list[dict[str, Any]],
              requests: list[dict[str, Any]]) -> dict[str, Any]:
    """`collect` then `compute`; the raw points stay in the result (rounded, relative to
    each turn's send) so a surprising mean can be looked into."""
    turns = collect(data, logs, sends, requests)
    out = compute(turns)
    keys = [p for p, _ in POINTS] + [b for _, _, b in ASIDES]
    out["points_ms"] = [
        {"id": t["id"], **{k: (None if t.get(k) is None else round((t[k] - t["sent"]) * 1000, 2))
                           for k in keys}} for t in turns]
    return out
