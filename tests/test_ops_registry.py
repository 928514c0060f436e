"""The registry of admin operations (`nanoclaw/cli/ops.py`): the terminal's parser has
every operation in it, and the agent's parser built from it fills in the own group and
writes the command out so that reading it again gives the same command."""

from __future__ import annotations

import pytest

from nanoclaw.cli import admin, ops
from nanoclaw.cli import agent_args as aa
from nanoclaw.cli.main import build_parser


def test_the_terminal_parser_has_every_operation_and_runs_it():
    parser = build_parser()
    for (verb, name), o in admin.OPS.items():
        argv = [verb, *([name] if name else [])]
        for a in o.args:  # the required ones, with a plausible value
            if a.positional and a.kw.get("nargs") != "?":
                argv.append(a.kw.get("choices", ["x"])[0])
            elif a.kw.get("required"):
                argv += [a.flags[-1], "x"]
        ns = parser.parse_args(argv)
        assert ns.fn.op is o, argv


def test_a_declaration_must_name_its_own_fields():
    ops.verb("zz-test", "a test verb")
    try:
        with pytest.raises(ValueError, match="no argument 'group'"):
            ops.op("zz-test", "x", read=True, own="group")(lambda a, s, t: None)
        ops.op("zz-test", "y", read=True)(lambda a, s, t: None)
        with pytest.raises(ValueError, match="declared twice"):
            ops.op("zz-test", "y", read=True)(lambda a, s, t: None)
    finally:
        ops.OPS.pop(("zz-test", "y"), None)
        ops.VERBS.pop("zz-test")



def test_a_new_operation_is_the_terminals_until_it_opts_in_for_agents():
    """Deny by default: an operation an agent may ask for says so (`agent=True`); one
    added without it is refused to every agent, whatever its scope."""
    ops.verb("zz-new", "a test verb")
    try:
        ops.op("zz-new", "plain", read=True)(lambda a, s, t: None)
        ops.op("zz-new", "shared", read=True, agent=True)(lambda a, s, t: None)
        with pytest.raises(aa.Refused, match="zz-new plain is for the terminal only"):
            aa._operation(["zz-new", "plain"])
        assert aa._operation(["zz-new", "shared"])[0].name == "shared"
    finally:
        ops.OPS.pop(("zz-new", "plain"), None)
        ops.OPS.pop(("zz-new", "shared"), None)
        ops.VERBS.pop("zz-new")
    offered = {o.words for o in ops.OPS.values() if o.never is None}
    assert "approvals approve" not in offered and "init-first-agent" not in offered
    assert "groups update" in offered

def test_refs_include_the_own_field():
    for o in admin.OPS.values():
        if o.own:
            assert o.own in o.refs, o.words
        if o.group_scope:  # group scope is only ever about the agent's own group
            assert o.own, o.words


@pytest.mark.parametrize("words, args, scope, want", [
    ("members add", ["u1"], "group", ["u1", "ag-own"]),
    ("members add", ["-"], "group", ["-", "ag-own"]),
    ("destinations add", ["main", "--chat", "cli:local", "peer"], "global",
     ["main", "peer", "--chat", "cli:local"]),
    ("destinations add", ["peer", "--agent", "x"], "group", ["ag-own", "peer", "--agent", "x"]),
    ("groups update", ["--cli-s=global"], "group", ["ag-own", "--cli-scope", "global"]),
    ("groups update", ["--name=-x", "--model", "a", "--model", "b"], "group",
     ["ag-own", "--name=-x", "--model", "a", "--model", "b"]),
    ("groups list", [], "group", ["--group", "ag-own"]),
    ("groups list", [], "global", []),
    ("wire add", ["--channel", "c", "--chat", "x", "--agent", "a", "--group", "--priority",
                  "-3"], "global",
     ["--channel", "c", "--chat", "x", "--agent", "a", "--group", "--priority=-3"]),
])
def test_the_command_is_written_out_whole_and_reads_back_the_same(words, args, scope, want):
    o = ops.OPS[tuple(words.split())]
    p = aa.op_parser(o, "ag-own", scope)
    ns = p.parse_intermixed_args(args)
    line = aa.canonical(o, ns, p.given)
    assert line == [*words.split(), *want]
    again = aa.op_parser(o, "ag-own", scope)
    ns2 = again.parse_intermixed_args(line[2:])
    assert vars(ns2) == vars(ns)
    assert aa.canonical(o, ns2, again.given) == line


def test_a_bad_argument_is_one_refused_line():
    o = ops.OPS[("groups", "update")]
    with pytest.raises(aa.Refused, match=r"^ncl groups update: unrecognized arguments: a\\nb$"):
        aa.op_parser(o, "ag-own", "group").parse_intermixed_args(["x", "a\nb"])
