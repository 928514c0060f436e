"""Extra mounts: granted only under an allowed root; credentials, keys, home directories
and NanoClaw's own state are refused with a clear reason, whatever the allowlist says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoclaw.agents.mounts import BLOCKED, Allowlist, MountError, check, resolve


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "projects"
    (root / "site").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({"allowedRoots": [{"path": str(root), "allowReadWrite": True},
                                                  {"path": str(tmp_path / "ro")}]}))
    return tmp_path, root, Allowlist.load(allow)


def test_allowed_mount_read_only_by_default_and_rw_on_request(tree):
    tmp, root, allow = tree
    m = check({"hostPath": str(root / "site")}, allow, [])
    assert (m.source, m.target, m.writable) == (root / "site", "/workspace/extra/site", False)
    m = check({"hostPath": str(root / "site"), "containerPath": "web", "readonly": False},
              allow, [])
    assert (m.target, m.writable) == ("/workspace/extra/web", True)


def test_read_write_only_where_the_root_allows_it(tree):
    tmp, _, allow = tree
    (tmp / "ro" / "docs").mkdir(parents=True)
    m = check({"hostPath": str(tmp / "ro" / "docs"), "readonly": False}, allow, [])
    assert not m.writable


@pytest.mark.parametrize("pattern", BLOCKED)
def test_every_blocked_pattern_is_refused(tree, pattern):
    _, root, allow = tree
    bad = root / f"x{pattern}y"
    bad.mkdir()
    with pytest.raises(MountError, match=f"contains '{pattern}'"):
        check({"hostPath": str(bad)}, allow, [])


def test_a_symlink_into_a_blocked_folder_is_refused(tree):
    _, root, allow = tree
    (root / ".ssh").mkdir()
    (root / "innocent").symlink_to(root / ".ssh")
    with pytest.raises(MountError, match="'.ssh'"):
        check({"hostPath": str(root / "innocent")}, allow, [])


def test_home_directories_and_their_parents_are_refused(tree):
    _, _, allow = tree
    allow.roots.append(type(allow.roots[0])(Path("/"), True))
    home = Path.home().resolve()
    with pytest.raises(MountError, match="it is the home directory"):
        check({"hostPath": str(home)}, allow, [])
    with pytest.raises(MountError, match="it holds the home directory"):
        check({"hostPath": "/"}, allow, [])


def test_outside_the_allowed_roots_or_overlapping_nanoclaw_is_refused(tree):
    tmp, root, allow = tree
    with pytest.raises(MountError, match="not under an allowed root"):
        check({"hostPath": str(tmp / "elsewhere")}, allow, [])
    with pytest.raises(MountError, match="overlaps NanoClaw's own"):
        check({"hostPath": str(root)}, allow, [root / "site" / "data"])
    with pytest.raises(MountError, match="no such file"):
        check({"hostPath": str(root / "missing")}, allow, [])
    with pytest.raises(MountError, match="bad containerPath"):
        check({"hostPath": str(root / "site"), "containerPath": "../etc"}, allow, [])


def test_resolve_grants_the_good_and_explains_the_bad(tree):
    tmp, root, _ = tree
    (root / ".aws").mkdir()
    requests = json.dumps([{"hostPath": str(root / "site")}, {"hostPath": str(root / ".aws")},
                           str(tmp / "elsewhere")])
    mounts, problems = resolve(requests, tmp / "allow.json", [])
    assert [m.target for m in mounts] == ["/workspace/extra/site"]
    assert len(problems) == 2 and "'.aws'" in problems[0] and "allowed root" in problems[1]


def test_no_allowlist_means_no_extra_mounts(tree):
    tmp, root, _ = tree
    mounts, problems = resolve([{"hostPath": str(root / "site")}], tmp / "nope.json", [])
    assert mounts == [] and "not under an allowed root" in problems[0]
    (tmp / "broken.json").write_text("{oops")
    mounts, problems = resolve([{"hostPath": str(root / "site")}], tmp / "broken.json", [])
    assert mounts == [] and "unreadable" in problems[0]
    assert resolve("[]", tmp / "nope.json", []) == ([], [])
