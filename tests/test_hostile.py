"""`nanoclaw/hostile.py`, the one door to an agent's folders: every entry the agent could
have swapped (a symlink to a host file, a FIFO, a hard link, a huge file, a folder swapped
for a link mid-walk) is refused or handled without touching anything outside."""

from __future__ import annotations

import ctypes
import os
import stat
import threading

import pytest

from nanoclaw import hostile


@pytest.fixture
def ground(tmp_path):
    (tmp_path / "agent").mkdir()
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret.txt").write_text("host secret")
    return tmp_path / "agent", canary


def test_links_on_the_way_are_refused_never_followed(ground):
    agent, canary = ground
    (agent / "outbox").symlink_to(canary)
    (agent / "inbox").mkdir()
    (agent / "inbox" / "abc").symlink_to(canary)
    (agent / "file").symlink_to(canary / "secret.txt")
    with hostile.Folder.open(agent) as f:
        for rel in ("outbox/secret.txt", "file"):
            with pytest.raises(hostile.Refused):
                f.read(rel)
        with pytest.raises(hostile.Refused):
            f.write("inbox/abc/new.txt", b"pwned")
        with pytest.raises(hostile.Refused):
            f.write("outbox/new.txt", b"pwned", create_dirs=True)
        f.write("file", b"mine")  # replaces the link itself, not its target
        assert f.read("file") == b"mine"
    assert sorted(os.listdir(canary)) == ["secret.txt"]
    assert (canary / "secret.txt").read_text() == "host secret"
    assert not (agent / "file").is_symlink()


def test_the_folder_itself_a_link_is_refused(ground):
    agent, canary = ground
    os.rmdir(agent)
    agent.symlink_to(canary)
    with pytest.raises(hostile.Refused):
        hostile.Folder.open(agent)


def test_fifo_device_hardlink_and_huge_files_are_refused_without_blocking(ground):
    agent, canary = ground
    os.mkfifo(agent / "fifo")
    os.link(canary / "secret.txt", agent / "hard")
    with open(agent / "huge", "wb") as fh:
        fh.truncate(3 << 30)  # sparse: costs no disk
    with hostile.Folder.open(agent) as f:
        for rel, why in (("fifo", "not a regular file"), ("hard", "hard links"),
                         ("huge", "larger than")):
            with pytest.raises(hostile.Refused, match=why):
                f.read(rel)
        with pytest.raises(hostile.Refused):
            f.read("missing")


def test_bad_names_are_refused(ground):
    agent, _ = ground
    with hostile.Folder.open(agent) as f:
        for rel in ("../canary/secret.txt", "a/../../x", "", "/", "a\0b"):
            with pytest.raises(hostile.Refused):
                f.read(rel)


def test_copy_between_folders_and_ownership(ground, tmp_path):
    agent, canary = ground
    (agent / "outbox" / "m1").mkdir(parents=True)
    (agent / "outbox" / "m1" / "report.txt").write_text("ok")
    other = tmp_path / "other"
    other.mkdir()
    owner = (54321, 54321) if os.geteuid() == 0 else None
    with hostile.Folder.open(agent) as src, hostile.Folder.open(other) as dst:
        assert src.copy_to("outbox/m1/report.txt", dst, "inbox/x/report.txt", owner=owner) == 2
    copied = other / "inbox" / "x" / "report.txt"
    assert copied.read_text() == "ok"
    if owner:
        assert (copied.stat().st_uid, (other / "inbox" / "x").stat().st_uid) == (54321, 54321)


def test_remove_and_mount_points_never_leave_the_folder(ground):
    agent, canary = ground
    (agent / "agent").symlink_to(canary)
    (agent / "deep").mkdir()
    (agent / "deep" / "link").symlink_to(canary)
    with hostile.Folder.open(agent) as f:
        assert f.ensure_mount_point("agent", True)  # the link is replaced by a folder
        assert not f.ensure_mount_point("agent", True)  # a plain folder stays
        assert f.remove("deep") and not f.remove("deep")
        os.mkfifo(agent / "extra")
        assert f.ensure_mount_point("extra/notes", True)
    assert (agent / "agent").is_dir() and not (agent / "agent").is_symlink()
    assert stat.S_ISDIR(os.lstat(agent / "extra").st_mode)
    assert os.listdir(canary) == ["secret.txt"]


def test_sockets_only_through_checked_inodes(ground):
    import socket

    agent, canary = ground
    target = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    target.bind(str(canary / "victim.sock"))
    (agent / "s.sock").symlink_to(canary / "victim.sock")
    with hostile.Folder.open(agent) as f:
        with f.socket_address("s.sock") as addr:
            assert addr is None
    target.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_adopt_never_chowns_through_a_folder_swapped_for_a_link(ground):
    """H1: the agent swaps a folder and a symlink to a host folder (renameat2
    RENAME_EXCHANGE) in a loop while the host hands the tree over; the host folder's
    files keep their owner."""
    agent, canary = ground
    victim = canary / "secret.txt"
    d = agent / "d"
    d.mkdir()
    for i in range(2000):
        (d / f"f{i}").touch()
    (agent / "l").symlink_to(canary)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()
    swaps = [0]

    def race() -> None:
        while not stop.is_set():
            if libc.syscall(316, -100, str(d).encode(), -100, str(agent / "l").encode(), 2) == 0:
                swaps[0] += 1

    t = threading.Thread(target=race)
    t.start()
    try:
        for round_ in range(6):
            uid = 60000 + round_
            with hostile.Folder.open(agent) as f:
                f.adopt(uid, uid)
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 0
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.stat(canary).st_uid == 0
