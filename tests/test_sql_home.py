"""SQL lives in `nanoclaw/db/` (review §2, habit 7): every statement on the central DB is
a `Store` method named for its intent, every statement on a session DB a method of
`SessionInbound` or `SessionOutbound`. This walks the host's code with `ast` and fails on
an SQL statement written anywhere else: a string literal (or the text of an f-string)
that starts, after whitespace, with a statement keyword followed by the shape of a
statement (`SELECT … FROM`, `INSERT INTO`, `UPDATE … SET`, `DELETE FROM`, `CREATE
TABLE`, `PRAGMA x`, …; any case). Docstrings are prose and are not read. It is shown to
catch such lines.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = "nanoclaw/db/*"

# Not the central DB nor a session DB: the WhatsApp bridge's own device store
# (whatsmeow's SQLite file), read to see whether the phone is paired. Nothing else.
STILL_CONVERTING = [
    "nanoclaw/channels/whatsapp_client.py",
]

STATEMENT = re.compile(r"""\s*(
    SELECT\s.*?\bFROM\b | SELECT\s+(\d|\*|COUNT\s*\(|MAX\s*\(|MIN\s*\(|COALESCE\s*\()
  | (INSERT|REPLACE)\s+(OR\s+\w+\s+)?INTO\b
  | UPDATE\s+\w+\s+SET\b
  | DELETE\s+FROM\b
  | CREATE\s+(UNIQUE\s+|TEMP\s+|TEMPORARY\s+|VIRTUAL\s+)?(TABLE|INDEX|VIEW|TRIGGER)\b
  | PRAGMA\s+\w+
)""", re.IGNORECASE | re.VERBOSE | re.DOTALL)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are bare statements (docstrings, comments-as-strings)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str)}


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # f"SELECT * FROM {table}": the literal parts
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def statements(source: str, filename: str = "<snippet>") -> list[str]:
    tree = ast.parse(source, filename)
    skip = _docstrings(tree)
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or id(node) in inner:
            continue
        text = _text(node)
        if text is not None and STATEMENT.match(text):
            out.append(f"{filename}:{node.lineno}: {text.strip()[:80]!r}")
    return out


def _host_files() -> list[Path]:
    return sorted((ROOT / "nanoclaw").rglob("*.py"))


def test_sql_is_written_only_in_nanoclaw_db():
    files = _host_files()
    assert len(files) > 50  # the walk sees the whole host
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if fnmatch.fnmatch(rel, HOME) or any(fnmatch.fnmatch(rel, p) for p in STILL_CONVERTING):
            continue
        bad += statements(path.read_text(), rel)
    assert bad == [], "\n".join(["move these into a Store or session-DB method:", *bad])


def test_the_walk_catches_statements():
    caught = [
        'store.q1("SELECT 1 AS x FROM agent_destinations WHERE agent_group_id=?", (ag,))',
        'conn.execute("  select * from messages_in where id=?", (mid,))',
        'store.conn.execute("DELETE FROM workers WHERE name=?", (name,))',
        'c.execute("INSERT OR IGNORE INTO pending_approvals (approval_id) VALUES (?)", (a,))',
        'conn.execute("update messages_in set status=\'failed\'")',
        'store.q(f"SELECT * FROM sessions WHERE {where}")',
        'conn.execute("SELECT COALESCE(MAX(seq), 0)")',
        'conn.executescript("\\nCREATE TABLE IF NOT EXISTS t (id TEXT)")',
        'conn.execute("PRAGMA trusted_schema=OFF")',
        'x = ("REPLACE INTO user_dms (user_id) "\n     "VALUES (?)")',
    ]
    for line in caught:
        assert statements(line), line
    fine = [
        'def f():\n    """Select the rows from the chat; update its name; delete it."""',
        'text.encode(errors="replace")',
        'VERBS = ["create", "update", "delete", "select"]',
        'msg = "Replace a small JSON file atomically"',
        'label = "Update the packages from the list"',
    ]
    for line in fine:
        assert not statements(line), line
