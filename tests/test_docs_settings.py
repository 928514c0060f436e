"""The README's settings table is `nanoclaw.config.Settings`, row for row.

Why: a setting nobody can find is a setting nobody can use, and a wrong default in the
docs is worse than none. The table between `<!-- settings:start -->` and
`<!-- settings:end -->` must have exactly one row per field of `Settings`, naming the
environment variable(s) the field is read from and its declared default; the meaning
column is written by hand and only has to name every value a choice field accepts.

Pure: reads README.md and the `Settings` class, starts nothing. Run this file as a script
(`python tests/test_docs_settings.py`) to print the table as `Settings` renders it, with
the meanings the README already has (TODO where it has none).
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

from pydantic import AliasChoices, AliasPath
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"
HEADER = ("setting", "default", "meaning")
EMPTY = "(empty)"  # how the table shows an empty-string default
CODE = re.compile(r"`([^`]+)`")

if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


# ---- what Settings declares ---------------------------------------------------------------
def env_names(name: str, field: FieldInfo, prefix: str) -> tuple[str, ...]:
    """The environment names a field is read from: its validation alias(es), else its
    alias, else the prefix plus its name in upper case."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return (alias,)
    if isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str)]
        if len(names) != len(alias.choices):  # an AliasPath: not one environment name
            raise AssertionError(f"Settings.{name}: an alias path cannot be documented")
        return tuple(names)
    if isinstance(alias, AliasPath):
        raise AssertionError(f"Settings.{name}: an alias path cannot be documented")
    if field.alias:
        return (field.alias,)
    return (f"{prefix}{name}".upper(),)


def default_text(value: object) -> str:
    """A default as the table shows it (inside backticks, or EMPTY)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if value == "":
        return EMPTY
    return str(value)


def declared() -> dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """field name → (environment names, default as shown, accepted choices if a Literal)."""
    from nanoclaw.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    out = {}
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
        elif field.default is PydanticUndefined:
            value = None  # required: no default to document
        else:
            value = field.default
        choices = ()
        if typing.get_origin(field.annotation) is typing.Literal:
            choices = tuple(str(c) for c in typing.get_args(field.annotation))
        out[name] = (env_names(name, field, prefix), "(required)" if value is None
                     else default_text(value), choices)
    return out


def render_row(names: tuple[str, ...], default: str, meaning: str = "TODO") -> str:
    shown = default if default in (EMPTY, "(required)") else f"`{default}`"
    return f"| {' or '.join(f'`{n}`' for n in names)} | {shown} | {meaning} |"


# ---- what the README says -----------------------------------------------------------------
def _cells(line: str) -> list[str]:
    """A table row's cells; `\\|` is a pipe inside a cell, as in GitHub's tables."""
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)]


def documented(text: str) -> list[tuple[int, tuple[str, ...], str, str]]:
    """(line number, environment names, default as shown, meaning) of every table row."""
    assert text.count(START) == 1 and text.count(END) == 1, (
        f"README.md must hold the settings table between exactly one {START} and one {END}")
    head, _, rest = text.partition(START)
    body, _, _ = rest.partition(END)
    assert END not in head, f"{END} comes before {START} in README.md"
    first = head.count("\n") + 1
    lines = [(first + i, line) for i, line in enumerate(body.split("\n")) if line.strip()]
    assert len(lines) >= 2 and tuple(_cells(lines[0][1])) == HEADER, (
        f"the settings table must start with the header | {' | '.join(HEADER)} |")
    assert set(lines[1][1].replace("|", "").strip()) <= set("-: "), (
        f"README.md line {lines[1][0]}: the header's separator row is missing")
    rows = []
    for no, line in lines[2:]:
        cells = _cells(line)
        assert line.lstrip().startswith("|") and len(cells) == 3, (
            f"README.md line {no}: not a 3-column table row: {line!r}")
        setting, default, meaning = cells
        names = tuple(CODE.findall(setting))
        assert names, f"README.md line {no}: the setting column names no `VARIABLE`"
        if default not in (EMPTY, "(required)"):
            m = re.fullmatch(r"`([^`]*)`", default)
            assert m, (f"README.md line {no}: the default must be one `value` or {EMPTY},"
                       f" not {default!r}")
            default = m.group(1)
        assert meaning, f"README.md line {no}: {names[0]} has no meaning"
        rows.append((no, names, default, meaning))
    return rows


def problems(text: str) -> list[str]:
    """Every way the table differs from Settings, one line each (empty: they agree)."""
    want = declared()
    by_names = {frozenset(n): (field, d, c) for field, (n, d, c) in want.items()}
    out, seen = [], {}
    for no, names, default, meaning in documented(text):
        key = frozenset(names)
        if len(key) != len(names):
            out.append(f"line {no}: {' / '.join(names)} names a variable twice")
        if key in seen:
            out.append(f"line {no}: {' / '.join(names)} is documented twice"
                       f" (also line {seen[key]})")
            continue
        seen[key] = no
        if key not in by_names:
            near = [f for f, (n, _, _) in want.items() if key & set(n)]
            if near:
                out.append(f"line {no}: {' / '.join(names)} does not match Settings."
                           f"{near[0]}, which is read from {' or '.join(want[near[0]][0])}")
            else:
                out.append(f"line {no}: extra row {' / '.join(names)}: Settings has no"
                           " such field")
            continue
        field, want_default, choices = by_names[key]
        if default != want_default:
            out.append(f"line {no}: {' / '.join(names)} default is {default!r} in the README"
                       f" but {want_default!r} in Settings.{field};"
                       f" the row should start: {render_row(want[field][0], want_default, '…')}")
        named = set(CODE.findall(meaning))
        missing = [c for c in choices if c not in named]
        if missing:
            out.append(f"line {no}: {' / '.join(names)} accepts {', '.join(choices)}; the"
                       f" meaning does not name {', '.join(f'`{c}`' for c in missing)}")
    for field, (names, default, _) in want.items():
        if frozenset(names) not in seen:
            out.append(f"missing row for Settings.{field}; add:"
                       f" {render_row(names, default)}")
    return out


# ---- tests --------------------------------------------------------------------------------
def test_every_setting_has_one_true_row_in_the_readme():
    found = problems(README.read_text())
    assert not found, ("README.md's settings table does not match nanoclaw.config.Settings"
                       " (print the expected table: python tests/test_docs_settings.py):\n  "
                       + "\n  ".join(found))


def test_env_names_follow_the_prefix_or_the_alias():
    names = {n for ns, _, _ in declared().values() for n in ns}
    assert "NANOCLAW_DATA_DIR" in names and "ANTHROPIC_API_KEY" in names
    assert {"NANOCLAW_TIMEZONE", "TZ"} <= names
    assert "NANOCLAW_ANTHROPIC_API_KEY" not in names


def test_a_drifted_table_is_caught():
    """The check itself: a missing, extra or wrong row each fails, naming the row."""
    text = README.read_text()
    head, _, rest = text.partition(START)
    body, _, tail = rest.partition(END)
    rows = body.split("\n")
    line_of = {name: i for i, line in enumerate(rows) for name in CODE.findall(line)[:1]}

    dropped = "\n".join(r for i, r in enumerate(rows) if i != line_of["NANOCLAW_SWEEP_INTERVAL"])
    found = problems(head + START + dropped + END + tail)
    assert any("missing row for Settings.sweep_interval" in p for p in found), found

    extra = body.rstrip("\n") + "\n| `NANOCLAW_NO_SUCH_THING` | `1` | nothing |\n"
    found = problems(head + START + extra + END + tail)
    assert any("extra row NANOCLAW_NO_SUCH_THING" in p for p in found), found

    i = line_of["NANOCLAW_SEND_ATTEMPTS"]
    wrong = rows[:i] + [rows[i].replace("| `5` |", "| `6` |", 1)] + rows[i + 1:]
    found = problems(head + START + "\n".join(wrong) + END + tail)
    assert any("NANOCLAW_SEND_ATTEMPTS default is '6'" in p for p in found), found

    i = line_of["NANOCLAW_RUNTIME"]
    vague = rows[:i] + ["| `NANOCLAW_RUNTIME` | `auto` | which sandbox |"] + rows[i + 1:]
    found = problems(head + START + "\n".join(vague) + END + tail)
    assert any("does not name" in p and "`docker`" in p for p in found), found


if __name__ == "__main__":
    meanings = {frozenset(n): m for _, n, _, m in documented(README.read_text())}
    print(START)
    print(f"| {' | '.join(HEADER)} |\n|---|---|---|")
    for names, default, _ in declared().values():
        print(render_row(names, default, meanings.get(frozenset(names), "TODO")))
    print(END)
