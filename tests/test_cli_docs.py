"""The command line: every verb and every admin operation is documented in the README's
command table, and `ncl` knows every operation the registry offers agents; service
install writes a unit that systemd restarts; doctor says what is wrong in plain words."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from conftest import ROOT

from nanoclaw.cli import admin
from nanoclaw.cli import agent as agent_cli
from nanoclaw.cli.main import build_parser


def _verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_every_command_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in _verbs() if f"nanoclaw {v}" not in readme]
    assert not missing, f"commands missing from README.md: {missing}"
    assert readme.lstrip().startswith("# ")
    head = readme.split("\n\n", 2)[1]
    assert "make run" in head and "make test" in head


def _command_rows() -> dict[str, str]:
    """The README's command table: each row's first cell by its verb."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `nanoclaw ([a-z-]+)([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2).replace("\\|", "|")  # Markdown's escaped |
    return rows


def test_every_operation_is_in_the_command_table():
    """Walks the registry: `nanoclaw VERB` has a row, and its first cell names each of
    the verb's operations (`groups list|add|remove|update`)."""
    rows = _command_rows()
    assert admin.OPS, "the registry is empty"
    missing = []
    for (verb, op) in admin.OPS:
        cell = rows.get(verb)
        if cell is None or (op and not re.search(rf"(^|[\s|\[]){re.escape(op)}($|[\s|\]])",
                                                 cell)):
            missing.append(f"nanoclaw {verb}{' ' + op if op else ''}")
    assert not missing, f"operations missing from README.md's command table: {missing}"


def test_ncl_knows_every_operation_offered_to_agents():
    """What the registry offers agents, `ncl` lists (in the global scope) and parses,
    and the README's `ncl` table names its verb; what it never offers, it does not list."""
    def listed(scope: str) -> list[str]:
        return [line.split("   (")[0].strip() for line in
                agent_cli.usage(scope).splitlines()[1:]]

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The agent's `ncl`", 1)[1].split("\n#", 1)[0]
    for o in admin.OPS.values():
        offered = o.never is None
        assert (o.words in listed("global")) == offered, o.words
        assert (o.words in listed("group")) == (offered and o.group_scope), o.words
        if offered:
            text = agent_cli.op_parser(o, "ag-own", "global").format_help()
            assert text.startswith(f"usage: ncl {o.words}"), text
            assert f"`{o.verb}`" in section or f"`{o.words}`" in section, \
                f"README's ncl section does not name {o.words}"


def _cli(tmp_path, *args, **env):
    e = {**os.environ, "NANOCLAW_DATA_DIR": str(tmp_path / "data"),
         "NANOCLAW_LOGS_DIR": str(tmp_path / "logs"), **env}
    return subprocess.run([sys.executable, "-m", "nanoclaw", *args], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=60)


def test_service_install_writes_a_restarting_unit(tmp_path):
    r = _cli(tmp_path, "service", "install", XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "cfg" / "systemd" / "user" / "nanoclaw.service").read_text()
    assert "Restart=always" in unit
    assert f"ExecStart={sys.executable} -m nanoclaw run" in unit
    assert _cli(tmp_path, "service", "uninstall",
                XDG_CONFIG_HOME=str(tmp_path / "cfg")).returncode == 0
    assert not (tmp_path / "cfg" / "systemd" / "user" / "nanoclaw.service").exists()


def test_doctor_and_status_without_a_host(tmp_path):
    r = _cli(tmp_path, "doctor")
    assert r.returncode == 1
    assert "host is not running" in r.stdout
    s = _cli(tmp_path, "status")
    assert s.returncode == 3 and "host: not running" in s.stdout


def test_admin_verbs_give_one_line_for_unknown_ids(host):
    for args in (["groups", "remove", "nope"], ["wire", "remove", "w-nope"],
                 ["roles", "grant", "cli:ghost", "admin"], ["members", "add", "cli:ghost", "x"],
                 ["destinations", "list", "nope"], ["approvals", "approve", "appr-x"],
                 ["tasks", "pause", "task-x"]):
        r = host.cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert r.stderr.startswith("nanoclaw: ")
