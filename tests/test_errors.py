"""The host's errors carry the meaning; the built-ins never do.

Why: when `LookupError` meant "no open approval" and `PermissionError` "may not decide",
a `KeyError` from a bug inside a decision reached the clicker as "This was already
decided" and the chat was left neither connected nor refused (review §2, habit 8). Now
the domain raises `nanoclaw.errors` (NotFound, NotAllowed, Refused …) and a bug stays a
bug: it is logged by the worker as a crash of that event, never told as a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_decisions_atomic import chat_card, env, mention, notices, owner_clicks  # noqa: F401

from nanoclaw import errors

ROOT = Path(__file__).resolve().parent.parent
# where a handler decides something for a user: no built-in lookup or permission error
# may be caught there as a signal (parsing outside input elsewhere may catch KeyError)
DOMAIN = ("approvals", "routing", "delivery", "lifecycle", "agents/groups.py",
          "agents/scheduling.py", "db", "cli/ops")
SIGNALS = {"LookupError", "KeyError", "PermissionError"}


def _caught(path: Path, name: str | None = None) -> list[str]:
    name = name or str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            kinds = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {k.id for k in kinds if isinstance(k, ast.Name)}
            if names & SIGNALS:
                out.append(f"{name}:{node.lineno} catches "
                           f"{', '.join(sorted(names & SIGNALS))}")
    return out


def domain_files() -> list[Path]:
    pkg = ROOT / "nanoclaw"
    return [p for p in sorted(pkg.rglob("*.py"))
            if str(p.relative_to(pkg)).startswith(DOMAIN)]


def test_no_domain_code_catches_a_builtin_as_a_signal():
    files = domain_files()
    assert len(files) > 30  # the walk sees the domain
    assert [c for p in files for c in _caught(p)] == []


def test_the_walk_sees_such_a_catch(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("try:\n    pass\nexcept (LookupError, ValueError):\n    pass\n")
    assert _caught(bad, "probe.py") == ["probe.py:3 catches LookupError"]


def test_every_host_error_is_one_family():
    for cls in (errors.ConfigError, errors.DataError, errors.NotFound, errors.NotAllowed,
                errors.Refused):
        assert issubclass(cls, errors.NanoclawError) and not issubclass(cls, LookupError)


def test_a_bug_inside_a_decision_is_not_told_as_already_decided(env, monkeypatch):  # noqa: F811
    store, s, r, ag = env
    assert r.route(mention("telegram:-300", "b1")) == []
    card = chat_card(store)

    def broken(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(type(store), "connect_chat", broken)
    with pytest.raises(KeyError, match="a bug"):
        r.route(owner_clicks(card["questionId"], f"connect:{ag}", "b2"))
    assert not any("already decided" in n for n in notices(store))
