"""The docker runtime against a real engine: inside a running agent container there is no
credential (environment, files, /proc), no other session, no network but the broker's
socket, no root and no writable root fs; limits, labels and mounts are as designed;
extra mounts follow the allowlist; orphans of this install go, other installs' stay."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from conftest import ROOT, SECRET, containers_of, install_label, wait_for

from nanoclaw.config import Settings

PROBE = (Path(__file__).parent / "sandbox_probe.py").read_text()
ENCODED = base64.b64encode(SECRET.encode()).decode()[::-1]


@pytest.fixture
def dhost(host_factory, docker_client, agent_image):
    made = []

    def make(name="d", **env):  # the cold path (the warm pool: test_docker_warm.py)
        h = host_factory(name, NANOCLAW_RUNTIME="docker", **{"NANOCLAW_WARM_POOL": "0", **env})
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()
        for c in containers_of(docker_client, h.data, all=True):
            c.remove(force=True)


def probe(container, *forbidden: str) -> dict:
    r = container.exec_run(["python", "-c", PROBE, ENCODED, *forbidden])
    assert r.exit_code == 0, r.output.decode()
    return json.loads(r.output.decode().strip().splitlines()[-1])


def test_inside_a_running_agent_container(dhost, docker_client):
    h = dhost().start()
    alice, bob = h.client("alice"), h.client("bob")
    alice.wait_reply(alice.send("hi from alice"), 60)
    bob.wait_reply(bob.send("hi from bob"), 60)
    sessions = h.q("SELECT id, agent_group_id FROM sessions ORDER BY created_at")
    assert len(sessions) == 2
    by_session = {c.labels["nanoclaw.session"]: c for c in containers_of(docker_client, h.data)}
    assert set(by_session) == {s["id"] for s in sessions}
    for mine, other in (sessions, sessions[::-1]):
        c = by_session[mine["id"]]
        other_dir = h.data / "sessions" / other["agent_group_id"] / other["id"]
        seen = probe(c, other["id"], str(h.data))
        assert seen["scanned"] > 10
        assert not seen["env_has_secret"] and seen["token"]
        assert seen["proc_hits"] == [] and seen["file_hits"] == []
        assert seen["forbidden_paths"] == [] and seen["forbidden_exist"] == []
        assert not Path(str(other_dir)).is_relative_to("/workspace")
        assert seen["uid"] == 61000 and seen["cap_eff"] == "0000000000000000"
        assert seen["net"] == ["lo"]  # network none: the broker socket is the only way out
        assert not seen["root_writable"] and not seen["etc_writable"]
        assert seen["workspace_writable"]
        env = c.attrs["Config"]["Env"]
        assert not any(SECRET in e for e in env)
        assert f"ANTHROPIC_API_KEY={seen['token']}" in env


def test_container_settings_labels_and_mounts(dhost, docker_client):
    h = dhost(NANOCLAW_CONTAINER_MEMORY="512m", NANOCLAW_CONTAINER_PIDS="256",
              NANOCLAW_CONTAINER_CPUS="1.5").start()
    assert h.cli("send", "hi", "--wait", "60").returncode == 0
    s = h.q("SELECT * FROM sessions")[0]
    (c,) = containers_of(docker_client, h.data)
    install = install_label(h.data).split("=", 1)[1]
    assert c.name == f"nanoclaw-{install}-{s['id']}"
    assert c.labels["nanoclaw.session"] == s["id"] and c.id == s["container_id"]
    hc = c.attrs["HostConfig"]
    assert hc["Memory"] == 512 * 1024 * 1024 and hc["PidsLimit"] == 256
    assert hc["NanoCpus"] == 1_500_000_000 and hc["ReadonlyRootfs"] and hc["CapDrop"] == ["ALL"]
    assert hc["NetworkMode"] == "none" and "no-new-privileges" in hc["SecurityOpt"]
    assert c.attrs["Config"]["User"] == "61000:61000"
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in c.attrs["Mounts"]}
    group = h.q("SELECT folder FROM agent_groups WHERE id=?", (s["agent_group_id"],))[0]
    folder = h.data / "sessions" / s["agent_group_id"] / s["id"]
    assert mounts == {
        "/workspace": (str(folder / "work"), True),
        "/workspace/.session": (str(folder / "db"), False),
        "/workspace/.session/outbound.db": (str(folder / "db" / "outbound.db"), True),
        "/workspace/.session/outbound.db-journal": (str(folder / "db" / "outbound.db-journal"),
                                                    True),
        "/etc/passwd": (str(h.data / "run" / "sandbox-etc" / "passwd"), False),
        "/etc/group": (str(h.data / "run" / "sandbox-etc" / "group"), False),
        "/workspace/agent": (str(h.base / "groups" / group["folder"]), True),
        "/workspace/global": (str(h.base / "groups" / "global"), False),
        "/app/agent_runner": (str(ROOT / "container" / "agent_runner"), False),
        "/app/sandbox_entry.py": (str(ROOT / "container" / "sandbox_entry.py"), False),
        "/app/CLAUDE.md": (str(ROOT / "container" / "CLAUDE.md"), False),
        "/app/skills": (str(ROOT / "container" / "skills"), False),
        "/run/nanoclaw": (str(h.data / "broker"), False),
    }


def test_extra_mounts_follow_the_allowlist(dhost, docker_client, tmp_path):
    shared = tmp_path / "shared"
    (shared / "notes").mkdir(parents=True)
    (shared / "notes" / "a.txt").write_text("hello from the host")
    (shared / ".ssh").mkdir()
    (shared / ".ssh" / "id_ed25519").write_text("PRIVATE")
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({"allowedRoots": [{"path": str(shared),
                                                   "allowReadWrite": True}]}))
    h = dhost(NANOCLAW_MOUNT_ALLOWLIST=str(allow)).start()
    conn = h.db()
    conn.execute("UPDATE container_configs SET additional_mounts=?", (json.dumps([
        {"hostPath": str(shared / "notes"), "readonly": False},
        {"hostPath": str(shared / ".ssh"), "containerPath": "keys"}]),))
    conn.commit()
    conn.close()
    assert h.cli("send", "hi", "--wait", "60").returncode == 0
    (c,) = containers_of(docker_client, h.data)
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in c.attrs["Mounts"]}
    assert mounts["/workspace/extra/notes"] == (str(shared / "notes"), True)
    assert not any(".ssh" in src for src, _ in mounts.values())
    r = c.exec_run(["cat", "/workspace/extra/notes/a.txt"])
    assert r.output == b"hello from the host"
    assert c.exec_run(["ls", "/workspace/extra/keys"]).exit_code != 0
    errors = (h.base / "logs" / "nanoclaw.error.log").read_text()
    assert f"extra mount {shared / '.ssh'} refused: the path contains '.ssh'" in errors


def test_orphans_of_this_install_go_other_installs_stay(dhost, docker_client, agent_image):
    h = dhost()
    ours = docker_client.containers.run(agent_image, ["sleep", "300"], detach=True,
                                        network_mode="none",
                                        labels=dict([install_label(h.data).split("=", 1)]))
    theirs = docker_client.containers.run(agent_image, ["sleep", "300"], detach=True,
                                          network_mode="none",
                                          labels={"nanoclaw.install": "0ther1ns"})
    try:
        h.start()
        # the low-level list: `containers.list` inspects each container after listing, and
        # fails on one removed in between (the very removal this waits for)
        wait_for(lambda: ours.id not in {c["Id"] for c in docker_client.api.containers(all=True)},
                 30, what="our orphan removed")
        theirs.reload()
        assert theirs.status == "running"
        assert "stopped 1 orphaned agent(s)" in (h.base / "logs" / "nanoclaw.error.log").read_text()
    finally:
        theirs.remove(force=True)


def test_host_network_mode_reaches_the_broker_by_tcp(dhost, docker_client):
    h = dhost(NANOCLAW_CONTAINER_NETWORK="host").start()
    r = h.cli("send", "over tcp", "--wait", "60")
    assert r.stdout.strip() == "echo: over tcp", r.stderr
    (c,) = containers_of(docker_client, h.data)
    assert c.attrs["HostConfig"]["NetworkMode"] == "host"
    assert "/run/nanoclaw" not in {m["Destination"] for m in c.attrs["Mounts"]}


def test_a_namesake_running_container_is_adopted_not_doubled(docker_client, agent_image,
                                                             tmp_path):
    from nanoclaw.db import session as sessiondb
    from nanoclaw.runtime.base import SpawnSpec
    from nanoclaw.runtime.docker import DockerRuntime

    settings = Settings(data_dir=tmp_path / "data", image=agent_image)
    sessiondb.create(str(tmp_path / "s"), settings.agent_owner())
    (tmp_path / "g").mkdir()
    spec = SpawnSpec(session_id="sess-twice", agent_group_id="ag", session_dir=tmp_path / "s",
                     group_dir=tmp_path / "g", global_dir=tmp_path / "global",
                     runner_dir=ROOT / "container", log_path=tmp_path / "logs" / "1.log",
                     install_id=f"t{int(time.time()) % 10**7}", command=["sleep", "300"])
    first, second = DockerRuntime(settings), DockerRuntime(settings)  # e.g. old and new worker
    a = first.spawn(spec)
    try:
        assert second.spawn(spec) == a
        assert first.exit_code(a) is None
        first.stop(a)
        assert second.exit_code(a) == -1  # gone; its output kept
        assert (tmp_path / "logs" / "1.log").exists()
    finally:
        first.cleanup_orphans(spec.install_id, set())


def test_explicit_docker_without_the_image_is_a_clear_config_error(docker_client, tmp_path):
    from nanoclaw import runtime

    settings = Settings(data_dir=tmp_path, image="nanoclaw-agent:no-such-tag")
    with pytest.raises(ValueError, match="nanoclaw-agent:no-such-tag is missing"):
        runtime.select("docker", settings)


def test_doctor_knows_whether_the_image_matches_its_recipe(docker_client, agent_image,
                                                         tmp_path):
    import io

    from nanoclaw.cli.doctor import image_freshness

    ok, line = image_freshness(Settings(data_dir=tmp_path / "data", image=agent_image))
    assert ok is True and "up to date" in line  # built by `make image` from container/
    stale = "nanoclaw-agent:doctor-stale-test"  # the same image, labelled by another recipe
    docker_client.images.build(fileobj=io.BytesIO(
        f"FROM {agent_image}\nLABEL nanoclaw.image-hash=0123456789abcdef\n".encode()),
        tag=stale, rm=True)
    try:
        ok, line = image_freshness(Settings(data_dir=tmp_path / "data", image=stale))
        assert ok is None and "0123456789abcdef" in line and "make image" in line
    finally:
        docker_client.images.remove(stale)
    ok, line = image_freshness(Settings(data_dir=tmp_path / "data", image="nanoclaw-agent:none"))
    assert ok is None and "cannot inspect" in line
